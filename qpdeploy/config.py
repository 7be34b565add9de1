"""Frozen, self-validating configs, one per stage, serialized next to every artifact.

Each config is a frozen dataclass that checks itself in ``__post_init__`` and round-trips
through JSON (``to_json`` / ``from_json``). Unknown keys are refused when reading, so a
config written by a newer qpdeploy is not silently misread.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .errors import QPDeployError

# Layers kept in floating point by default: the timestep / added-condition embeddings
# and the time projections inside each resnet (tiny matmuls on a (B, C) vector whose
# error reaches every channel of the block), plus the first and last convolutions, which
# touch raw latents. NVIDIA's diffusion INT8 recipes leave the same groups unquantized.
DEFAULT_SKIP = (
    r"^time_embedding\.",
    r"^add_embedding\.",
    r"^class_embedding\.",
    r"\.time_emb_proj$",
    r"^conv_in$",
    r"^conv_out$",
)


class ConfigBase:
    """JSON round trip shared by the stage configs (tuples become lists and back)."""

    def to_json(self) -> dict:
        """A JSON-able dict of every field."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict):
        """Build the config from :meth:`to_json` output, refusing unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise QPDeployError(f"{cls.__name__} has no field(s) {', '.join(unknown)} (written by a newer qpdeploy?)")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class QuantizeConfig(ConfigBase):
    """Every setting of post-training quantization (``qpdeploy quantize``).

    Attributes:
        weight_bits: 8 (INT8) or 4 (INT4, stored packed two per byte).
        act_bits: 8 for INT8 activations, None for weight-only quantization.
        act_scales: "global" (one scale per layer input) or "per-interval" (one per
            timestep interval; free at deployment, where engines are per interval anyway).
        intervals: K (uniform) used for per-interval scales and the per-interval report.
        boundaries: explicit interval boundaries "0,300,...,T" instead of K uniform ones.
        skip: regular expressions on module names kept in floating point.
        shortcut_split: quantize the two halves of skip-connection concatenations separately.
        weight_search / act_search: "lp" (search the clipping range minimising the L_p
            error, p = ``lp_norm``) or "minmax" (no clipping).
        calib_prompts: prompts of the full-precision trajectories (None: built-in list).
        calib_steps: DDIM steps of each calibration trajectory.
        calib_samples: UNet calls (cond + uncond batches) used to calibrate, spread evenly
            over the whole schedule; ``holdout`` of the prompts are kept for the report.
        guidance: classifier-free guidance scale of the calibration trajectories.
        resolution: image size of the calibration trajectories (None: the model's own).
        sample_values: activation values kept per sample and layer for the range search.
        seed: seeds trajectories and sampling, so calibration is deterministic.
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    act_scales: str = "global"
    intervals: int = 4
    boundaries: tuple[int, ...] | None = None
    skip: tuple[str, ...] = DEFAULT_SKIP
    shortcut_split: bool = True
    weight_search: str = "lp"
    act_search: str = "lp"
    lp_norm: float = 2.4
    calib_prompts: tuple[str, ...] | None = None
    calib_steps: int = 20
    calib_samples: int = 64
    holdout: float = 0.25
    guidance: float = 7.5
    resolution: int | None = None
    sample_values: int = 1024
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.weight_bits in (4, 8), f"weight bits must be 4 or 8, got {self.weight_bits}"),
            (self.act_bits in (8, None), f"activation bits must be 8 or none, got {self.act_bits}"),
            (self.act_scales in ("global", "per-interval"), f"act scales must be global or per-interval, got {self.act_scales!r}"),
            (self.weight_search in ("lp", "minmax"), f"weight search must be lp or minmax, got {self.weight_search!r}"),
            (self.act_search in ("lp", "minmax"), f"activation search must be lp or minmax, got {self.act_search!r}"),
            (self.lp_norm > 0, f"lp norm must be positive, got {self.lp_norm}"),
            (self.intervals >= 1, f"intervals must be >= 1, got {self.intervals}"),
            (self.calib_steps >= 2, f"calibration steps must be >= 2, got {self.calib_steps}"),
            (self.calib_samples >= 1, f"calibration samples must be >= 1, got {self.calib_samples}"),
            (0 < self.holdout < 1, f"holdout fraction must be in (0, 1), got {self.holdout}"),
            (self.sample_values >= 16, f"sample values must be >= 16, got {self.sample_values}"),
            (self.calib_prompts is None or len(self.calib_prompts) >= 2, "give at least two calibration prompts"),
        ]
        for ok, message in checks:
            if not ok:
                raise QPDeployError(message)
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise QPDeployError(f"skip pattern {pattern!r} is not a valid regular expression: {exc}") from exc

    def make_intervals(self, num_train_timesteps: int):
        """The :class:`~qpdeploy.intervals.Intervals` this config describes for a model with T steps."""
        from .intervals import Intervals

        if self.boundaries is not None:
            iv = Intervals(self.boundaries)
            if iv.num_train_timesteps != num_train_timesteps:
                raise QPDeployError(
                    f"boundaries end at {iv.num_train_timesteps} but the model has {num_train_timesteps} timesteps"
                )
            return iv
        return Intervals.uniform(self.intervals, num_train_timesteps)

    def is_skipped(self, name: str) -> bool:
        """Whether module ``name`` stays in floating point."""
        return any(re.search(p, name) for p in self.skip)
