"""Timestep strategies of scale training, one registry for every stage.

A strategy says how many trainable scale sets a pack has, which set each timestep interval
uses at inference (or the post-training scales), which timesteps training draws, how many
samples a micro-batch holds by default and which export layout suits it. Training, packs,
configs, the exporter and the CLI ask the registry, so a new strategy is one new class that
registers itself with :func:`register` (torchao's handler registry is the model).

The paper's three (see docs/design.md):

- ``baseline``: one set over all timesteps (PEQA + DreamBooth);
- ``s1``: one set, trained and applied only in the chosen intervals;
- ``s2``: one set per interval, set k trained and used only in interval k.

No torch here: the CLI lists the registered names without importing it.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import QPDeployError

STRATEGIES: dict[str, "Strategy"] = {}
DEFAULT_BATCH = 4  # instance samples per micro-batch by default (README, "Training defaults")


def register(cls: type["Strategy"]) -> type["Strategy"]:
    """Class decorator: add a strategy to :data:`STRATEGIES` under its ``name``."""
    STRATEGIES[cls.name] = cls()
    return cls


def get_strategy(name: str) -> "Strategy":
    """The registered strategy ``name``.

    Raises:
        QPDeployError: no strategy has that name.
    """
    if name not in STRATEGIES:
        raise QPDeployError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


class Strategy:
    """The behaviour of one strategy on K intervals (``chosen``: the intervals a strategy that
    selects some, S1, trains and applies in; empty for the others)."""

    name: str = ""
    needs_chosen: bool = False  # the user must choose intervals (--s1-intervals)
    layout: str = "per-interval"  # default export layout
    balanced_intervals: bool = False  # training cycles through intervals instead of uniform timesteps
    default_intervals: int | None = None  # K when the user gives none (None: the base's partition)

    def num_sets(self, k: int) -> int:
        """Trainable scale sets of a pack."""
        return 1

    def set_map(self, k: int, chosen: Sequence[int] = ()) -> list[int]:
        """Scale-set row used in each interval; ``num_sets(k)`` means the post-training scales."""
        raise NotImplementedError

    def trained_intervals(self, k: int, chosen: Sequence[int] = ()) -> list[int]:
        """Intervals whose timesteps training draws."""
        return list(range(k))

    def default_batch(self, k: int) -> int:
        """Instance samples per micro-batch when the user gives none (the dev sweep's batch)."""
        return DEFAULT_BATCH


@register
class Baseline(Strategy):
    name = "baseline"

    def set_map(self, k, chosen=()):
        return [0] * k


@register
class S1(Strategy):
    name = "s1"
    needs_chosen = True
    layout = "masked"

    def set_map(self, k, chosen=()):
        if not chosen or any(not 0 <= i < k for i in chosen):
            raise QPDeployError(f"S1 intervals must be a non-empty subset of 0..{k - 1}, got {list(chosen)}")
        return [0 if i in chosen else 1 for i in range(k)]

    def trained_intervals(self, k, chosen=()):
        return sorted(set(chosen))


@register
class S2(Strategy):
    name = "s2"
    balanced_intervals = True
    default_intervals = 2  # the paper's best K, and the dev sweep's (README, "Training defaults")

    def num_sets(self, k):
        return k

    def set_map(self, k, chosen=()):
        return list(range(k))

    def default_batch(self, k):
        return k * -(-DEFAULT_BATCH // k)  # a multiple of K: every step trains every set equally
