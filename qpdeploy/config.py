"""Frozen, self-validating configs, one per stage, serialized next to every artifact.

Each config is a frozen dataclass that checks itself in ``__post_init__`` (a list of
``(condition, message)`` pairs given to :func:`check_all`) and round-trips through JSON
(``to_json`` / ``from_json``) with its ``config_version``. Reading, unknown keys and a
version newer than the class's are refused, so a config written by a newer qpdeploy is not
silently misread; fields an older version lacked take their defaults, so older files still
load.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass

from .errors import QPDeployError
from .strategies import STRATEGIES, get_strategy

# Layers kept in floating point by default: the timestep / added-condition embeddings
# and the time projections inside each resnet (tiny matmuls on a (B, C) vector whose
# error reaches every channel of the block), plus the first and last convolutions, which
# touch raw latents. NVIDIA's diffusion INT8 recipes leave the same groups unquantized.
# Upper bounds checked before anything is allocated. Sizes are also checked against the model
# (qpdeploy.models.check_resolution: up to 4x its native size); these catch typos at once.
MAX_RESOLUTION = 8192
MAX_BATCH = 64
MAX_STEPS = 1000  # the diffusion schedules qpdeploy supports have at most 1000 timesteps
STRENGTH_RANGE = (0.0, 2.0)  # pack strengths (qpdeploy.pack.at_strength): 0 the base, 1 the pack, 2 twice its change


def strength_problem(value) -> str | None:
    """Why ``value`` is not a pack strength, or None: a number in :data:`STRENGTH_RANGE`, or
    a list of such numbers, one per timestep interval of the pack (low-noise interval first)."""
    low, high = STRENGTH_RANGE
    per_interval = isinstance(value, (list, tuple))
    values = value if per_interval else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high
                         for v in values):  # NaN too
        if per_interval:
            return f"pack strengths per interval must each be a number between {low:g} and {high:g}, got {list(value)}"
        return f"pack strength must be a number between {low:g} and {high:g}, got {value!r}"
    return None


def is_full_strength(value) -> bool:
    """Whether a pack strength (one number or one per interval) leaves the pack as trained."""
    return all(v == 1.0 for v in (value if isinstance(value, (list, tuple)) else [value]))


def parse_strength(text: str):
    """A pack strength as written on the command line: ``0.9`` (every interval), or one
    number per interval separated by ``/``, low-noise interval first (``1/0.5``).
    Text that is not numbers comes back as is, for :func:`strength_problem` to name."""
    parts = text.split("/")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        return text
    return values[0] if len(values) == 1 else values


DEFAULT_SKIP = (
    r"^time_embedding\.",
    r"^add_embedding\.",
    r"^class_embedding\.",
    r"\.time_emb_proj$",
    r"^conv_in$",
    r"^conv_out$",
)


ACT_SEARCHES = ("lp", "minmax", "output")
ROUNDINGS = ("nearest", "block")  # how weights round to integers (QuantizeConfig.rounding)

VERSION_KEY = "config_version"


def check_all(checks) -> None:
    """Raise the message of the first ``(condition, message)`` pair whose condition is false."""
    for ok, message in checks:
        if not ok:
            raise QPDeployError(message)


def check_patterns(patterns, what: str) -> None:
    """Raise on the first of ``patterns`` that is not a valid regular expression."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise QPDeployError(f"{what} pattern {pattern!r} is not a valid regular expression: {exc}") from exc


def matches_any(patterns, name: str) -> bool:
    """Whether any of the regular expressions ``patterns`` is found in ``name`` (a module name)."""
    return any(re.search(p, name) for p in patterns)


class ConfigBase:
    """JSON round trip shared by the stage configs (tuples become lists and back).

    ``VERSION``: bumped when a field changes meaning; adding a field with a default needs no
    bump (older files load with the default)."""

    VERSION: typing.ClassVar[int] = 1

    def to_json(self) -> dict:
        """A JSON-able dict of every field, and the ``config_version``."""
        return {VERSION_KEY: self.VERSION,
                **{f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @classmethod
    def from_json(cls, data: dict, where: str = ""):
        """Build the config from :meth:`to_json` output, refusing unknown keys and values of
        the wrong JSON type (``where``, e.g. the file read, starts the error message)."""
        where = f"{where}: " if where else ""
        if not isinstance(data, dict):
            raise QPDeployError(f"{where}{cls.__name__} must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop(VERSION_KEY, 1)  # files written before configs carried a version: 1
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= cls.VERSION:
            raise QPDeployError(f"{where}{cls.__name__} has {VERSION_KEY} {version!r}; this qpdeploy reads "
                                f"1..{cls.VERSION} (written by a newer qpdeploy?)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise QPDeployError(f"{where}{cls.__name__} has no field(s) {', '.join(unknown)} "
                                "(written by a newer qpdeploy?)")
        hints = typing.get_type_hints(cls)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        for name, value in kwargs.items():
            if not _matches(value, hints[name]):
                raise QPDeployError(f"{where}{cls.__name__}.{name} must be {_describe(hints[name])}, "
                                    f"got {value!r:.40}")
        try:
            return cls(**kwargs)
        except QPDeployError as exc:
            raise QPDeployError(f"{where}{exc}") from None

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _matches(value, hint) -> bool:
    """Whether a JSON-parsed value (arrays already made tuples) fits a field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"an array of {_describe(args[0])}"
    return {type(None): "null", int: "an integer", float: "a number", str: "a string", bool: "a boolean"}.get(
        hint, getattr(hint, "__name__", str(hint)))


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
            error, p = ``lp_norm``) or "minmax" (no clipping); ``act_search`` also "output":
            the L_p range refined against the layer's output error (its quantized weight
            applied to sampled whole input rows / conv patches).
        calib_prompts: prompts of the full-precision trajectories (None: built-in list).
        calib_steps: DDIM steps of each calibration trajectory.
        calib_samples: UNet calls (cond + uncond batches) used to calibrate, spread evenly
            over the whole schedule; ``holdout`` of the prompts are kept for the report.
        guidance: classifier-free guidance scale of the calibration trajectories (None: the
            model folder's recommended guidance, ``qpdeploy_sampling.json``, else 7.5, the
            scale Stable Diffusion samples at; a base records the value it used).
        resolution: image size of the calibration trajectories (None: the model's own).
        sample_values: activation values kept per sample and layer for the range search.
        rounding: "nearest" (round every weight to the nearest integer on its searched
            scale) or "block" (learn each weight's rounding, block by block, against the
            float block's output on the calibration calls: BRECQ with AdaRound,
            :mod:`qpdeploy.reconstruct`).
        rounding_steps: Adam steps per block of the "block" rounding.
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
    guidance: float | None = None
    resolution: int | None = None
    sample_values: int = 1024
    rounding: str = "nearest"
    rounding_steps: int = 500
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.weight_bits in (4, 8), f"weight bits must be 4 or 8, got {self.weight_bits}"),
            (self.rounding in ROUNDINGS, f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}"),
            (1 <= self.rounding_steps <= 1_000_000, f"rounding steps must be in 1..1000000, got {self.rounding_steps}"),
            (self.act_bits in (8, None), f"activation bits must be 8 or none, got {self.act_bits}"),
            (self.act_scales in ("global", "per-interval"), f"act scales must be global or per-interval, got {self.act_scales!r}"),
            (self.weight_search in ("lp", "minmax"), f"weight search must be lp or minmax, got {self.weight_search!r}"),
            (self.act_search in ACT_SEARCHES, f"activation search must be one of {', '.join(ACT_SEARCHES)}, got {self.act_search!r}"),
            (self.lp_norm > 0, f"lp norm must be positive, got {self.lp_norm}"),
            (1 <= self.intervals <= MAX_STEPS, f"intervals must be in 1..{MAX_STEPS}, got {self.intervals}"),
            (2 <= self.calib_steps <= MAX_STEPS, f"calibration steps must be in 2..{MAX_STEPS}, got {self.calib_steps}"),
            (1 <= self.calib_samples <= 100_000, f"calibration samples must be in 1..100000, got {self.calib_samples}"),
            (self.resolution is None or 1 <= self.resolution <= MAX_RESOLUTION,
             f"resolution must be in 1..{MAX_RESOLUTION}, got {self.resolution}"),
            (0 < self.holdout < 1, f"holdout fraction must be in (0, 1), got {self.holdout}"),
            (self.sample_values >= 16, f"sample values must be >= 16, got {self.sample_values}"),
            (self.calib_prompts is None or len(self.calib_prompts) >= 2, "give at least two calibration prompts"),
            (self.guidance is None or 0 <= self.guidance <= 100, f"calibration guidance must be in 0..100, got {self.guidance}"),
        ]
        check_all(checks)
        check_patterns(self.skip, "skip")

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
        return matches_any(self.skip, name)


# --------------------------------------------------------------------------------------
# Training (``qpdeploy train``)
# --------------------------------------------------------------------------------------

TRAIN_STRATEGIES = tuple(STRATEGIES)  # the registered strategies (qpdeploy.strategies)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Every setting of a personalization run (``qpdeploy train``), stored in the pack.

    Attributes:
        prompt: instance prompt, e.g. "a photo of sks dog".
        strategy: "baseline" (one set, all timesteps), "s1" (one set, trained and applied
            only in ``s1_intervals``) or "s2" (one set per interval).
        intervals / boundaries: the timestep partition, K uniform intervals or explicit
            boundaries "0,...,T"; both None: the strategy's default K (S2: 2), else the base's partition.
        s1_intervals: interval indices S1 trains and applies its set in.
        train_input_scales: train ``s_in`` as well as ``s_out`` (multi-channel update).
        steps: optimizer steps. batch_size: instance samples per micro-batch (None: the
            strategy's default, 4; S2 rounds it up to a multiple of K so that every step
            trains every set equally). grad_accum: micro-batches per step.
        lr: AdamW learning rate in relative units: scales are trained as
            ``s_out = s_ptq * (1 + delta)``, ``s_in = 1 + delta``, so lr is the size of a step
            as a fraction of the post-training scale. weight_decay pulls ``delta`` to 0,
            that is towards the post-training scales.
        resolution: training image size (None: the model's). crop: "center" or "random";
            random crops are drawn ``crops_per_image`` times per image, up front, because
            latents are encoded once.
        identifier: the rare word that names the subject (a warning if the prompt lacks it).
        train_token / token_lr: pivotal tuning: the identifier's token-embedding row of each
            text encoder trains with the scales (AdamW, learning rate ``token_lr``) and
            travels in the pack (:mod:`qpdeploy.token`). The identifier must be one token.
        class_prompt / prior_images / prior_weight: prior preservation on ``prior_images``
            class images generated by the quantized base itself.
        keep_scales: regular expressions on quantized layer names whose scales keep their
            post-training values in every set (not trained; the pack still holds them).
        scale_lr: ``"REGEX=FACTOR"`` entries: the scales of the quantized layers the regular
            expression matches train at FACTOR (> 0) times ``lr`` (the first matching entry
            wins; :class:`qpdeploy.optim.ScaleSetOptimizer`'s rates).
        background_weight: below 1, the instance loss weighs each latent pixel by
            ``w + (1 - w) * m`` (``m`` the share of it the subject covers, from the masks
            beside the images, :func:`qpdeploy.data.mask_file`), so that the scales learn the
            subject more than the photos' backdrop; 1 (default) is DreamBooth's plain loss.
        sample_steps / guidance: sampling of class and validation images (None: the model
            folder's recommendation, ``qpdeploy_sampling.json``, else 25 steps and guidance
            7.5, as ``generate`` samples: :func:`qpdeploy.models.resolve_sampling`).
        gradient_checkpointing: recompute UNet blocks in backward (less memory, more time).
        precision: "auto" (bf16 or fp16 autocast on CUDA, fp32 on CPU), "fp32", "fp16", "bf16".
        seed: every random draw of the run derives from it and the step number.
        checkpoint_every / validate_every / validation_prompt / validation_images: run
            control; these (and ``steps``) may change when a run is resumed.
    """

    prompt: str
    strategy: str = "s2"
    intervals: int | None = None
    boundaries: tuple[int, ...] | None = None
    s1_intervals: tuple[int, ...] = ()
    train_input_scales: bool = True
    steps: int = 1600
    batch_size: int | None = None
    grad_accum: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.0
    resolution: int | None = None
    crop: str = "center"
    crops_per_image: int = 4
    identifier: str = "sks"
    train_token: bool = False
    token_lr: float = 5e-3
    class_prompt: str | None = None
    prior_images: int = 0
    prior_weight: float = 1.0
    background_weight: float = 1.0
    keep_scales: tuple[str, ...] = ()
    scale_lr: tuple[str, ...] = ()
    sample_steps: int | None = None
    guidance: float | None = None
    gradient_checkpointing: bool = False
    precision: str = "auto"
    seed: int = 0
    checkpoint_every: int = 0
    validate_every: int = 0
    validation_prompt: str | None = None
    validation_images: int = 4

    # Fields a resumed run may change: they steer the run, not what is learned per step.
    RUN_CONTROL = ("steps", "checkpoint_every", "validate_every", "validation_prompt", "validation_images")

    def __post_init__(self):
        s1 = self.strategy in STRATEGIES and STRATEGIES[self.strategy].needs_chosen
        k = self.intervals if self.boundaries is None else len(self.boundaries) - 1
        checks = [
            (bool(self.prompt and self.prompt.strip()), "the instance prompt is empty"),
            (self.strategy in STRATEGIES,
             f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"),
            (self.intervals is None or self.boundaries is None, "give either intervals or boundaries, not both"),
            (self.intervals is None or 1 <= self.intervals <= MAX_STEPS,
             f"intervals must be in 1..{MAX_STEPS}, got {self.intervals}"),
            (not s1 or bool(self.s1_intervals),
             f"strategy {self.strategy} needs the intervals it trains (--s1-intervals 0,1)"),
            (s1 or not self.s1_intervals, f"s1 intervals are only used by strategy s1, not {self.strategy}"),
            (all(i >= 0 and (k is None or i < k) for i in self.s1_intervals),
             f"s1 intervals must be in 0..{'K-1' if k is None else k - 1}, got {list(self.s1_intervals)}"),
            (1 <= self.steps <= 10_000_000, f"steps must be in 1..10000000, got {self.steps}"),
            (self.batch_size is None or 1 <= self.batch_size <= MAX_BATCH,
             f"batch size must be in 1..{MAX_BATCH}, got {self.batch_size}"),
            (1 <= self.grad_accum <= 1024, f"gradient accumulation must be in 1..1024, got {self.grad_accum}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.resolution is None or (8 <= self.resolution <= MAX_RESOLUTION and self.resolution % 8 == 0),
             f"resolution must be a multiple of 8 in 8..{MAX_RESOLUTION}, got {self.resolution}"),
            (self.crop in ("center", "random"), f"crop must be center or random, got {self.crop!r}"),
            (1 <= self.crops_per_image <= MAX_BATCH, f"crops per image must be in 1..{MAX_BATCH}, got {self.crops_per_image}"),
            (bool(self.identifier.strip()), "the identifier word is empty"),
            (0 <= self.prior_images <= 100_000, f"prior images must be in 0..100000, got {self.prior_images}"),
            (self.prior_images == 0 or bool(self.class_prompt),
             "prior preservation needs a class prompt (--class-prompt 'a photo of a dog')"),
            (not self.class_prompt or self.prior_images > 0,
             "a class prompt needs a number of class images (--prior-images N)"),
            (self.prior_weight >= 0, f"prior weight must be >= 0, got {self.prior_weight}"),
            (0 <= self.background_weight <= 1, f"background weight must be in 0..1, got {self.background_weight}"),
            (self.token_lr > 0, f"token learning rate must be positive, got {self.token_lr}"),
            (self.sample_steps is None or 1 <= self.sample_steps <= MAX_STEPS,
             f"sample steps must be in 1..{MAX_STEPS}, got {self.sample_steps}"),
            (self.guidance is None or 0 <= self.guidance <= 100, f"guidance must be in 0..100, got {self.guidance}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.checkpoint_every >= 0, f"checkpoint interval must be >= 0, got {self.checkpoint_every}"),
            (self.validate_every >= 0, f"validation interval must be >= 0, got {self.validate_every}"),
            (self.validate_every == 0 or bool(self.validation_prompt),
             "validation needs a prompt (--validation-prompt 'a sks dog on the beach')"),
            (1 <= self.validation_images <= MAX_BATCH,
             f"validation images must be in 1..{MAX_BATCH}, got {self.validation_images}"),
        ]
        check_all(checks)
        check_patterns(self.keep_scales, "keep-scales")
        check_patterns(self.lr_factors, "scale-lr")

    @property
    def lr_factors(self) -> dict[str, float]:
        """``scale_lr`` as {regular expression: factor}, in the order given.

        Raises:
            QPDeployError: an entry without ``=``, or a factor that is not a positive number.
        """
        factors = {}
        for entry in self.scale_lr:
            pattern, sep, factor = entry.rpartition("=")
            try:
                value = float(factor)
            except ValueError:
                value = math.nan
            if not sep or not pattern or not (0 < value < math.inf):
                raise QPDeployError(f"scale-lr {entry!r} is not REGEX=FACTOR with a factor > 0 "
                                    "(to freeze layers, use keep-scales)")
            factors[pattern] = value
        return factors

    def layer_rates(self, names) -> dict[str, float]:
        """Layer -> learning-rate factor for the trained layers of ``names`` that ``scale_lr``
        matches (the first matching entry wins; kept layers are not trained).

        Raises:
            QPDeployError: an entry matches no trained layer.
        """
        names = list(names)
        kept = self.kept_layers(names)
        trained = [n for n in names if n not in kept]
        rates = {}
        for pattern, factor in self.lr_factors.items():
            matched = [n for n in trained if matches_any((pattern,), n)]
            if not matched:
                raise QPDeployError(f"scale-lr pattern {pattern!r} matches no trained quantized layer")
            for name in matched:
                rates.setdefault(name, factor)
        return rates

    def kept_layers(self, names) -> frozenset[str]:
        """The layers of ``names`` whose scales stay at post-training (``keep_scales``).

        Raises:
            QPDeployError: a pattern matches no layer, or every layer matches.
        """
        names = list(names)
        for pattern in self.keep_scales:
            if not any(matches_any((pattern,), n) for n in names):
                raise QPDeployError(f"keep-scales pattern {pattern!r} matches no quantized layer")
        kept = frozenset(n for n in names if matches_any(self.keep_scales, n))
        if names and len(kept) == len(names):
            raise QPDeployError("keep-scales matches every quantized layer: no scale is left to train")
        return kept

    def make_intervals(self, base_intervals):
        """The training partition: explicit boundaries, K uniform intervals, the strategy's
        default K (S2: 2), or the base's."""
        from .intervals import Intervals

        t = base_intervals.num_train_timesteps
        if self.boundaries is not None:
            iv = Intervals(self.boundaries)
            if iv.num_train_timesteps != t:
                raise QPDeployError(f"boundaries end at {iv.num_train_timesteps} but the model has {t} timesteps")
        elif self.intervals is not None:
            iv = Intervals.uniform(self.intervals, t)
        elif (default_k := get_strategy(self.strategy).default_intervals) is not None:
            iv = Intervals.uniform(default_k, t)
        else:
            iv = base_intervals
        bad = [i for i in self.s1_intervals if i >= iv.k]
        if bad:
            raise QPDeployError(f"s1 intervals must be in 0..{iv.k - 1}, got {list(self.s1_intervals)}")
        return iv

    def batch_for(self, k: int) -> int:
        """Instance samples per micro-batch: ``batch_size``, or the strategy's default."""
        if self.batch_size is not None:
            return self.batch_size
        return get_strategy(self.strategy).default_batch(k)
