"""The scale pack: the trained scale sets of a personalization, bound to one base.

A pack directory holds ``scales.safetensors`` (per quantized layer ``<name>.s_out`` of shape
(E, C_out) and, with input scales, ``<name>.s_in`` of shape (E, C_in); with pivotal tuning
also ``token.<text encoder>``, the identifier's embedding row, see :mod:`qpdeploy.token`),
``pack.json`` (format version, strategy, intervals, S1 intervals, base hash, prompt,
settings, and ``token``: the identifier and its token ids) and the trainer's ``report.json``.

Strategies and the interval -> scale-set map (row E is the post-training scales):

- ``baseline``: E = 1, every interval uses set 0;
- ``s1``: E = 1, the selected intervals use set 0, the others the post-training scales;
- ``s2``: E = K, interval k uses set k.

:func:`apply_pack` installs a pack on a loaded base; training, export and the runtime all
go through it. :func:`init_scale_sets` starts a personalization (every set equal to the
post-training scales, so the output is bit-exact unchanged); :mod:`qpdeploy.train` trains
the sets and writes the pack with :func:`save_pack`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import is_full_strength, strength_problem
from .errors import QPDeployError
from .strategies import get_strategy
from .intervals import Intervals
from . import schema
from .io import atomic_dir, dir_bytes, file_sha256, read_artifact_header, write_json
from .schema import validate
from .layers import quant_layers
from .qunet import get_router
from .token import PREFIX as TOKEN_PREFIX

PACK_FORMAT_VERSION = 1
PACK_KIND = "qpdeploy.scale-pack"
PACK_FILE = "pack.json"
SCALES_FILE = "scales.safetensors"
REPORT_FILE = "report.json"
PACK_ARTIFACT = (PACK_FILE, PACK_KIND)  # header file and kind: what --force may replace
_HEADER_KEYS = {"format_version", "kind", "strategy", "intervals", "s1_intervals", "num_sets", "input_scales",
                "base_hash", "scales_sha256", "token"}  # the rest of pack.json is the pack's meta


def set_map(strategy: str, k: int, s1_intervals=()) -> list[int]:
    """Scale-set index used in each of K intervals (``num_sets`` means post-training)."""
    return get_strategy(strategy).set_map(k, tuple(s1_intervals))


def num_sets_for(strategy: str, k: int) -> int:
    """How many trainable scale sets a strategy has (K for S2, else 1)."""
    return get_strategy(strategy).num_sets(k)


@dataclass(frozen=True)
class ScalePack:
    """Trained scale sets plus what is needed to apply them correctly (a frozen record:
    :meth:`to_json` is its ``pack.json`` header, :meth:`from_json` reads one back).

    Attributes:
        strategy: "baseline", "s1" or "s2".
        intervals: the timestep partition the sets were trained on.
        base_hash: the base the pack belongs to.
        scales: ``{"<layer>.s_out": (E, C_out), "<layer>.s_in": (E, C_in)}`` float32.
        s1_intervals: intervals where S1's tuned set applies.
        meta: prompt, training settings and anything else recorded in pack.json.
        token: with pivotal tuning, ``{"identifier": word, "ids": {encoder: token id}}``.
        tokens: with pivotal tuning, ``{"token.<encoder>": (D,) float32}`` rows.
    """

    strategy: str
    intervals: Intervals
    base_hash: str
    scales: dict[str, torch.Tensor]
    s1_intervals: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)
    token: dict | None = None
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "s1_intervals", tuple(int(i) for i in self.s1_intervals))
        set_map(self.strategy, self.intervals.k, self.s1_intervals)  # validates

    def to_json(self) -> dict:
        """The ``pack.json`` header (without the tensors' hash, which belongs to the written file)."""
        return {
            "format_version": PACK_FORMAT_VERSION,
            "kind": PACK_KIND,
            "strategy": self.strategy,
            "intervals": self.intervals.to_json(),
            "s1_intervals": list(self.s1_intervals),
            "num_sets": self.num_sets,
            "input_scales": self.input_scales,
            "base_hash": self.base_hash,
            **({"token": self.token} if self.token else {}),
            **self.meta,
        }

    @classmethod
    def from_json(cls, header: dict, tensors: dict[str, torch.Tensor], where) -> "ScalePack":
        """The pack a validated ``pack.json`` header and its tensors describe.

        Raises:
            QPDeployError: naming ``where``, when the header and the tensors disagree.
        """
        tensors = dict(tensors)
        tokens = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(TOKEN_PREFIX)]}
        token = header.get("token")
        if bool(tokens) != bool(token):
            raise QPDeployError(f"{where}: identifier rows and the token record must come together "
                                f"({len(tokens)} row(s), token record {'present' if token else 'missing'})")
        try:
            return cls(header["strategy"], Intervals.from_json(header["intervals"]), header["base_hash"], tensors,
                       tuple(header["s1_intervals"]), {k: v for k, v in header.items() if k not in _HEADER_KEYS},
                       token, tokens)
        except QPDeployError as exc:
            raise QPDeployError(f"{where}: {exc}") from None

    @property
    def num_sets(self) -> int:
        return num_sets_for(self.strategy, self.intervals.k)

    @property
    def set_of_interval(self) -> list[int]:
        return set_map(self.strategy, self.intervals.k, self.s1_intervals)

    @property
    def input_scales(self) -> bool:
        """Whether the pack trains input-channel scales (s_in) too."""
        return any(name.endswith(".s_in") for name in self.scales)

    @property
    def trainable_params(self) -> int:
        return sum(t.numel() for t in (*self.scales.values(), *self.tokens.values()))


def pack_hash(pack: ScalePack) -> str:
    """Content hash of a pack: its scale tensors (and identifier rows) plus strategy,
    intervals, S1 intervals, base hash (and token ids): what a deploy dir's manifest records,
    and the runtime checks."""
    import json

    from .io import tensors_hash

    meta = {"strategy": pack.strategy, "intervals": pack.intervals.to_json(), "s1": list(pack.s1_intervals),
            "base_hash": pack.base_hash}
    if pack.token:
        meta["token"] = pack.token
    return tensors_hash({**pack.scales, **pack.tokens}, json.dumps(meta, sort_keys=True).encode())


def save_pack(out, pack: ScalePack, report: dict | None = None, force: bool = False) -> Path:
    """Write a pack directory atomically (``report`` becomes report.json).

    A ``pack_bytes`` entry of the report that is missing or None is filled with the size
    of the pack itself (scales.safetensors + pack.json, the report excluded).
    """
    from safetensors.torch import save_file

    with atomic_dir(out, force, PACK_ARTIFACT) as tmp:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in {**pack.scales, **pack.tokens}.items()}
        save_file(tensors, str(tmp / SCALES_FILE), metadata={"kind": PACK_KIND})
        write_json(tmp / PACK_FILE, {**pack.to_json(), "scales_sha256": file_sha256(tmp / SCALES_FILE)})
        if report is not None:
            if report.get("pack_bytes") is None:
                report = {**report, "pack_bytes": dir_bytes(tmp)}
            write_json(tmp / REPORT_FILE, report)
    return Path(out)


def load_pack(path) -> ScalePack:
    """Read a pack directory (the scales are checked against their recorded SHA-256)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_artifact_header(path, PACK_FILE, PACK_KIND, "scale pack", PACK_FORMAT_VERSION)
    validate(meta, schema.PACK, path / PACK_FILE)
    scales_file = path / SCALES_FILE
    if not scales_file.is_file():
        raise QPDeployError(f"scale pack {path} has no {SCALES_FILE}")
    if file_sha256(scales_file) != meta.get("scales_sha256"):
        raise QPDeployError(f"{scales_file} does not match the hash in {PACK_FILE} (corrupted or replaced)")
    try:
        scales = load_file(str(scales_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise QPDeployError(f"cannot read {scales_file}: {exc}") from exc
    return ScalePack.from_json(meta, scales, path / PACK_FILE)


def apply_pack(base, pack: ScalePack) -> None:
    """Install a pack's scale sets and interval map on a loaded base's UNet, in place.

    Raises:
        QPDeployError: the pack was made for another base, its layers or shapes do not
            fit, or the base has per-interval activation scales on other intervals.
    """
    if pack.base_hash != base.base_hash:
        raise QPDeployError(
            f"scale pack belongs to base {pack.base_hash[:12]}, not to this base {base.base_hash[:12]}"
        )
    if base.config.act_scales == "per-interval" and pack.intervals != base.intervals:
        raise QPDeployError(
            f"base has per-interval activation scales on {base.intervals}; the pack uses {pack.intervals}"
        )
    layers = dict(quant_layers(base.unet))
    names = {key.rsplit(".", 1)[0] for key in pack.scales}
    if names != set(layers):
        extra = sorted(names - set(layers)) or sorted(set(layers) - names)
        raise QPDeployError(f"scale pack does not fit the base's layers (for example {extra[0]})")
    wrong = [k for k, v in pack.scales.items() if v.ndim != 2 or v.shape[0] != pack.num_sets]
    if wrong:
        raise QPDeployError(f"scale pack {wrong[0]} does not hold {pack.num_sets} scale set(s) as its strategy "
                            f"{pack.strategy} on {pack.intervals.k} intervals needs")
    for name, layer in layers.items():
        try:
            layer.set_scale_sets(pack.scales[f"{name}.s_out"], pack.scales.get(f"{name}.s_in"))
        except ValueError as exc:
            raise QPDeployError(f"scale pack layer {name}: {exc}") from exc
    get_router(base.unet).configure(pack.intervals, pack.num_sets, pack.set_of_interval)


def at_strength(pack: ScalePack, post_training, strength) -> ScalePack:
    """The pack with every trained scale moved ``strength`` of the way from the post-training
    scales: ``s_out = s_ptq + strength * (s_out - s_ptq)`` and ``s_in = 1 + strength * (s_in - 1)``.

    The output-scaled weight ``s_out * W_int`` moves linearly with ``strength``, as a LoRA's
    does with its scale (with input scales the product is quadratic in it): 0 is the
    unpersonalized base exactly, 1 the pack as trained (returned unchanged), between them
    less of the subject and, where the pack costs prompt fidelity, more of the prompt.
    ``strength`` is one number, or one per timestep interval of the pack (low-noise
    interval first), e.g. ``(1.0, 0.5)`` for the full pack in the low-noise interval and half
    of it in the high-noise one; intervals that share a scale set need the same strength, and
    a set at strength 1 stays bit for bit as trained.
    The identifier's row of a pivotal-tuned pack stays as trained. The result is a pack of
    its own (its hash differs; ``meta["strength"]`` records the factor), so export and the
    runtime treat it like any other. ``post_training`` is the base's ``s_ptq`` per layer
    name (:func:`post_training_scales`); that the pack belongs to the base is
    :func:`apply_pack`'s check.

    Raises:
        QPDeployError: ``strength`` is not in ``qpdeploy.config.STRENGTH_RANGE``, does not
            give one value per interval, differs between intervals of one scale set, or the
            pack's layers do not fit ``post_training``.
    """
    problem = strength_problem(strength)
    if problem:
        raise QPDeployError(problem)
    per_interval = _per_interval(pack, strength)
    if is_full_strength(per_interval):
        return pack
    per_set = _per_set(pack, per_interval).reshape(-1, 1)
    scales = {}
    for key, value in pack.scales.items():
        name, kind = key.rsplit(".", 1)
        if name not in post_training:
            raise QPDeployError(f"scale pack does not fit the base's layers (for example {name})")
        start = post_training[name].detach().cpu().float().reshape(1, -1) if kind == "s_out" else torch.ones(1, 1)
        if kind == "s_out" and start.shape[-1] != value.shape[-1]:
            raise QPDeployError(f"scale pack layer {name}: {value.shape[-1]} output channels, the base has "
                                f"{start.shape[-1]}")
        value = value.float()
        scales[key] = torch.where(per_set == 1.0, value, start + per_set * (value - start))  # 1: exactly as trained
    before = _per_interval(pack, pack.meta.get("strength", 1.0))
    combined = [a * b for a, b in zip(per_interval, before)]
    meta = {**pack.meta, "strength": combined[0] if len(set(combined)) == 1 else combined}
    return dataclasses.replace(pack, scales=scales, meta=meta)


def _per_interval(pack: ScalePack, strength) -> list[float]:
    """``strength`` as one float per interval of ``pack``."""
    if not isinstance(strength, (list, tuple)):
        return [float(strength)] * pack.intervals.k
    if len(strength) != pack.intervals.k:
        raise QPDeployError(f"pack strength gives {len(strength)} values; the pack has {pack.intervals.k} "
                            f"intervals {list(pack.intervals.boundaries)}")
    return [float(s) for s in strength]


def _per_set(pack: ScalePack, per_interval: list[float]) -> torch.Tensor:
    """The strength of each of the pack's scale sets: that of the intervals that use it
    (sets no interval uses keep 1)."""
    per_set = [None] * pack.num_sets
    for interval, index in enumerate(pack.set_of_interval):
        if index >= pack.num_sets:  # the interval runs on the post-training scales
            continue
        if per_set[index] is not None and per_set[index] != per_interval[interval]:
            raise QPDeployError(f"pack strength differs between intervals that share one scale set "
                                f"(strategy {pack.strategy}); give them the same value")
        per_set[index] = per_interval[interval]
    return torch.tensor([1.0 if s is None else s for s in per_set])


def post_training_scales(base) -> dict[str, torch.Tensor]:
    """Each quantized layer's post-training output scales ``s_ptq``, by layer name."""
    return {name: layer.s_ptq for name, layer in quant_layers(base.unet)}


def reset_to_post_training(base) -> None:
    """Remove any pack: every layer back to its post-training scales only."""
    for _, layer in quant_layers(base.unet):
        layer.set_scale_sets(torch.ones(0, layer.out_features))
    get_router(base.unet).configure(base.intervals, 0, [0] * base.intervals.k)


def init_scale_sets(base, strategy: str, intervals: Intervals, s1_intervals=(), input_scales: bool = False,
                    subjects: int = 1) -> None:
    """Start a personalization: every trainable set equals the post-training scales.

    ``s_out`` rows start at ``s_ptq`` and ``s_in`` rows at ones, so the model's output
    is unchanged until training moves them. ``subjects`` > 1 installs that many blocks of
    the strategy's sets (subject i owns sets ``i * E .. i * E + E - 1``), routed for subject 0.
    """
    if base.config.act_scales == "per-interval" and intervals != base.intervals:
        raise QPDeployError(f"base has per-interval activation scales on {base.intervals}; train on those intervals")
    num_sets = num_sets_for(strategy, intervals.k)
    mapping = subject_set_map(strategy, intervals.k, s1_intervals, 0, subjects)
    for _, layer in quant_layers(base.unet):
        s_out = layer.s_ptq.detach().expand(num_sets * subjects, -1)
        s_in = torch.ones(num_sets * subjects, layer.in_features) if input_scales else None
        layer.set_scale_sets(s_out, s_in)
    get_router(base.unet).configure(intervals, num_sets * subjects, mapping)


def subject_set_map(strategy: str, k: int, s1_intervals, subject: int, subjects: int) -> list[int]:
    """The interval -> scale-set map of subject ``subject`` of ``subjects`` trained together:
    its own block of the strategy's E sets, and ``E * subjects`` (post-training) where the
    strategy uses no trained set."""
    local, e = set_map(strategy, k, s1_intervals), num_sets_for(strategy, k)
    return [subject * e + s if s < e else e * subjects for s in local]


def scales_of(unet) -> dict[str, torch.Tensor]:
    """The current trainable scale sets of a quantized UNet, as a pack's ``scales`` dict."""
    scales = {}
    for name, layer in quant_layers(unet):
        scales[f"{name}.s_out"] = layer.s_out.detach().clone()
        if layer.s_in is not None:
            scales[f"{name}.s_in"] = layer.s_in.detach().clone()
    return scales
