"""The partition of the diffusion timestep range [0, T) into K intervals.

This is the only place where a timestep is mapped to its interval: calibration, training,
export and the runtime scheduler all call :meth:`Intervals.index`, so they cannot disagree.

Interval k covers ``boundaries[k] <= t < boundaries[k + 1]``. Timesteps outside [0, T)
(a scheduler that emits ``T`` itself, or a slightly negative float) belong to the nearest
end interval, so every timestep has exactly one interval.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .errors import QPDeployError


@dataclass(frozen=True)
class Intervals:
    """K contiguous timestep intervals ``[b0, b1), [b1, b2), ..., [b_{K-1}, T)`` with b0 = 0."""

    boundaries: tuple[int, ...]

    def __post_init__(self):
        b = tuple(int(x) for x in self.boundaries)
        object.__setattr__(self, "boundaries", b)
        if len(b) < 2:
            raise QPDeployError(f"intervals need at least two boundaries (0 and T), got {list(b)}")
        if b[0] != 0:
            raise QPDeployError(f"interval boundaries must start at 0, got {list(b)}")
        if any(hi <= lo for lo, hi in zip(b, b[1:])):
            raise QPDeployError(f"interval boundaries must strictly increase, got {list(b)}")

    @classmethod
    def uniform(cls, k: int, num_train_timesteps: int = 1000) -> "Intervals":
        """K intervals of (nearly) equal length over [0, num_train_timesteps)."""
        if not 1 <= k <= num_train_timesteps:
            raise QPDeployError(f"number of intervals must be in 1..{num_train_timesteps}, got {k}")
        return cls(tuple(round(i * num_train_timesteps / k) for i in range(k + 1)))

    @classmethod
    def parse(cls, text: str) -> "Intervals":
        """Parse ``"0,300,600,1000"`` (explicit boundaries)."""
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError as exc:
            raise QPDeployError(f"boundaries must be comma-separated integers like 0,500,1000, got {text!r}") from exc
        return cls(values)

    @property
    def k(self) -> int:
        """Number of intervals."""
        return len(self.boundaries) - 1

    @property
    def num_train_timesteps(self) -> int:
        """T, the end of the last interval."""
        return self.boundaries[-1]

    def bounds(self, k: int) -> tuple[int, int]:
        """``(lo, hi)`` of interval k: it holds the timesteps ``lo <= t < hi``."""
        return self.boundaries[k], self.boundaries[k + 1]

    def index(self, t):
        """Interval index of timestep(s) t.

        Args:
            t: a python int or float, or a tensor of any shape and numeric dtype.

        Returns:
            An int for a scalar, else a long tensor of t's shape on t's device. No host
            synchronisation happens for tensors, so this is safe inside a traced graph.
        """
        inner = self.boundaries[1:-1]
        if isinstance(t, (int, float)):
            return min(bisect.bisect_right(inner, t), self.k - 1)
        import torch

        t = torch.as_tensor(t).contiguous()
        edges = torch.tensor(inner, dtype=torch.float64 if t.is_floating_point() else torch.long, device=t.device)
        if t.is_floating_point():
            t = t.to(torch.float64)
        # right=True: a timestep equal to a boundary belongs to the interval it opens.
        return torch.bucketize(t, edges, right=True).clamp_(max=self.k - 1)

    def to_json(self) -> dict:
        """JSON-able form, read back by :meth:`from_json`."""
        return {"boundaries": list(self.boundaries)}

    @classmethod
    def from_json(cls, data: dict) -> "Intervals":
        """Inverse of :meth:`to_json`."""
        try:
            return cls(tuple(data["boundaries"]))
        except (KeyError, TypeError) as exc:
            raise QPDeployError(f"malformed intervals record: {data!r}") from exc

    def __str__(self) -> str:
        return " ".join(f"[{lo},{hi})" for lo, hi in zip(self.boundaries, self.boundaries[1:]))
