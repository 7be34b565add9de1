"""The quantized-base artifact (docs/design.md, "Stages and artifacts").

A base directory holds:

- ``quant_config.json``: format version, the :class:`~qpdeploy.config.QuantizeConfig`,
  the UNet's diffusers config, the intervals, the layer plan (which layers are quantized
  and where inputs are split), the source model (path or bundled name) and its content
  hash, and the base hash;
- ``unet.safetensors``: integer weights (INT4 packed), ``s_ptq``, activation scales and
  every unquantized UNet parameter;
- ``report.json``: the figures of the quantization run.

The base hash is a content hash of the stored tensors (names, dtypes, shapes, bytes): scale
packs record it and refuse to load onto any other base. ``weights_sha256`` (the file's own
SHA-256) detects a corrupted or replaced weights file before it is parsed. The text encoder(s), VAE, tokenizer and scheduler are not copied;
they load from the recorded source, whose content hash is checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import QuantizeConfig
from .errors import QPDeployError
from .intervals import Intervals
from . import schema
from .io import atomic_dir, file_sha256, read_artifact_header, tensors_hash, write_json
from .schema import validate
from .qunet import ROUTER_NAME, LayerPlan, convert_unet, layers_record, plans_from_record

BASE_FORMAT_VERSION = 1
BASE_KIND = "qpdeploy.quantized-base"
CONFIG_FILE = "quant_config.json"
BASE_WEIGHTS_FILE = "unet.safetensors"
REPORT_FILE = "report.json"
BASE_ARTIFACT = (CONFIG_FILE, BASE_KIND)  # header file and kind: what --force may replace


@dataclass
class QuantizedBase:
    """A loaded base: the quantized UNet and the metadata it was saved with."""

    unet: nn.Module
    config: QuantizeConfig
    intervals: Intervals
    meta: dict
    path: Path | None = None

    @property
    def base_hash(self) -> str:
        """Content hash of the stored tensors; packs are bound to it."""
        if "base_hash" not in self.meta:
            self.meta["base_hash"] = base_hash_of(self.unet)
        return self.meta["base_hash"]

    @property
    def plans(self) -> list[LayerPlan]:
        """The quantized layers' plans, as recorded."""
        return plans_from_record(self.meta["layers"])

    @property
    def source(self) -> dict:
        """Where the float model came from: ``{"kind", "name" | "path"}``."""
        return self.meta["source"]


def base_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """What a base stores: everything but trainable scale sets (plain, or parametrized while
    training: ``<layer>.parametrizations.s_out.original<e>``) and the router's map."""
    return {
        k: v.detach().contiguous()
        for k, v in unet.state_dict().items()
        if not (k.endswith((".s_out", ".s_in")) or ".parametrizations.s_" in k or k.startswith(ROUTER_NAME + "."))
    }


def base_meta(plans: list[LayerPlan], source: dict, source_hash: str) -> dict:
    """What a freshly quantized base records about itself (its ``meta``): the quantized
    layers' plans, the skipped layers' names and its source."""
    return {"layers": layers_record(plans), "skipped": [p.name for p in plans if not p.quantized],
            "source": source, "source_hash": source_hash}


def save_base(out, base: QuantizedBase, report: dict, force: bool = False) -> Path:
    """Write a base directory atomically and return its path.

    ``base.meta`` must hold what :func:`base_meta` gives; ``report`` is written as
    ``report.json`` after ``base_hash`` is added.
    """
    from safetensors.torch import save_file

    missing = [k for k in ("layers", "skipped", "source", "source_hash") if k not in base.meta]
    if missing:
        raise ValueError(f"the base's meta lacks {', '.join(missing)}")
    unet, plans = base.unet, base.plans
    with atomic_dir(out, force, BASE_ARTIFACT) as tmp:
        state = base_state_dict(unet)
        save_file(state, str(tmp / BASE_WEIGHTS_FILE), metadata={"format": "pt", "kind": BASE_KIND})
        base_hash = tensors_hash(state)
        meta = {
            "format_version": BASE_FORMAT_VERSION,
            "kind": BASE_KIND,
            "base_hash": base_hash,
            "weights_sha256": file_sha256(tmp / BASE_WEIGHTS_FILE),
            "quantize": base.config.to_json(),
            "intervals": base.intervals.to_json(),
            "unet_class": type(unet).__name__,
            "unet_config": _jsonable_config(unet.config),
            "layers": layers_record(plans),
            "skipped": list(base.meta["skipped"]),
            "source": base.meta["source"],
            "source_hash": base.meta["source_hash"],
        }
        write_json(tmp / CONFIG_FILE, meta)
        write_json(tmp / REPORT_FILE, {**report, "base_hash": base_hash})
    return Path(out)


def read_base_meta(path) -> dict:
    """Read and validate ``quant_config.json`` of a base directory (see :data:`qpdeploy.schema.BASE`)."""
    meta = read_artifact_header(path, CONFIG_FILE, BASE_KIND, "quantized base", BASE_FORMAT_VERSION)
    validate(meta, schema.BASE, Path(path) / CONFIG_FILE)
    return meta


def load_base(path, device="cpu", verify_hash: bool = True) -> QuantizedBase:
    """Load a base directory into a quantized UNet (bit-identical to the one saved).

    The base hash recorded in ``quant_config.json`` is recomputed from the tensors read
    (``verify_hash``), so an edited header cannot bind a foreign scale pack to this base.

    Raises:
        QPDeployError: missing or corrupted files, a hash mismatch, an unknown version.
    """
    from diffusers import UNet2DConditionModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_base_meta(path)
    weights = path / BASE_WEIGHTS_FILE
    if not weights.is_file():
        raise QPDeployError(f"quantized base {path} has no {BASE_WEIGHTS_FILE}")
    if verify_hash and file_sha256(weights) != meta.get("weights_sha256"):
        raise QPDeployError(f"{weights} does not match the hash in {CONFIG_FILE} (corrupted or replaced)")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise QPDeployError(f"cannot read {weights}: {exc}") from exc
    if verify_hash and tensors_hash(state) != meta["base_hash"]:
        raise QPDeployError(f"{path / CONFIG_FILE}: base_hash does not match the tensors of {BASE_WEIGHTS_FILE} "
                            "(edited or replaced)")
    config = QuantizeConfig.from_json(meta["quantize"], str(path / CONFIG_FILE))
    intervals = Intervals.from_json(meta["intervals"])
    plans = plans_from_record(meta["layers"])
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(meta["unet_config"])
        convert_unet(unet, config, intervals, plans)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise QPDeployError(f"{path / CONFIG_FILE}: unet_config and layers do not describe a quantized UNet "
                            f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})") from None
    _assign(unet, state, weights)
    return QuantizedBase(unet.eval(), config, intervals, meta, path)


def _assign(unet: nn.Module, state: dict[str, torch.Tensor], weights: Path) -> None:
    expected = set(base_state_dict_keys(unet))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        some = sorted(missing or unexpected)[:3]
        raise QPDeployError(
            f"{weights} does not fit its config: {'missing' if missing else 'unexpected'} tensors {', '.join(some)}"
        )
    unet.load_state_dict(state, strict=False, assign=True)
    # Scale sets and the router are not stored in a base: recreate them on the real device.
    device = next(iter(state.values())).device
    for module in unet.modules():
        if hasattr(module, "s_out") and module.s_out.is_meta:
            module.s_out = nn.Parameter(torch.ones(0, module.out_features, device=device), requires_grad=False)
    router = getattr(unet, ROUTER_NAME)
    router.set_of_interval = torch.zeros(router.intervals.k, dtype=torch.long, device=device)
    unet.requires_grad_(False)


def base_state_dict_keys(unet: nn.Module) -> list[str]:
    """Keys :func:`base_state_dict` would store for this UNet (without touching tensors)."""
    return [k for k in unet.state_dict(keep_vars=True) if not (
        k.endswith(".s_out") or k.endswith(".s_in") or k.startswith(ROUTER_NAME + "."))]


def _jsonable_config(config) -> dict:
    data = dict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def source_hash(pipe) -> str:
    """Content hash of what a base borrows from its source pipeline (not the UNet):
    the text encoder(s), the VAE and the tokenizer vocabulary."""
    tensors = {}
    for part in ("text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, part, None)
        if module is not None:
            tensors.update({f"{part}.{k}": v for k, v in module.state_dict().items()})
    vocab = getattr(pipe, "tokenizer", None)
    extra = repr(sorted(vocab.get_vocab().items())).encode() if vocab is not None else b""
    return tensors_hash(tensors, extra)


def base_hash_of(unet: nn.Module) -> str:
    """The base hash: a content hash of what the base stores (see :func:`base_state_dict`)."""
    return tensors_hash(base_state_dict(unet))


def load_base_pipeline(base: QuantizedBase, model=None, config_dir=None):
    """The base's source pipeline with its UNet replaced by the quantized one.

    Args:
        base: a loaded base.
        model: where to load the source from instead of the recorded location (the
            model moved); its content must still match the recorded source hash.
        config_dir: configs for a single-file source (see :func:`qpdeploy.models.load_pipeline`).

    Raises:
        QPDeployError: the source cannot be found, or its content differs from the
            model the base was quantized from.
    """
    from .models import load_pipeline

    source = base.source
    where = model if model is not None else source.get("name") or source.get("path")
    if where is None:
        raise QPDeployError("this base was quantized from a pipeline in memory and records no model to load; "
                            "pass --model with the model it came from")
    if model is None and source["kind"] != "bundled" and not os.path.exists(where):
        raise QPDeployError(f"the base's source model {where} is gone; pass --model with its new location")
    pipe = load_pipeline(where, config_dir, unet=base.unet)
    if source_hash(pipe) != base.meta["source_hash"]:
        raise QPDeployError(
            f"model {where} differs from the one this base was quantized from (text encoder / VAE / tokenizer hash)"
        )
    return pipe
