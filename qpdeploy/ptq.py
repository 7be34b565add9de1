"""Post-training quantization of a pipeline's UNet into a quantized base (``qpdeploy quantize``)."""

from __future__ import annotations

import contextlib
import gc
import dataclasses
import time
from pathlib import Path

import torch

from .base import BASE_ARTIFACT, REPORT_FILE, QuantizedBase, base_meta, save_base, source_hash
from .calibrate import calibrate_activations, capture_trajectories, sqnr_by_interval, unet_outputs
from .config import QuantizeConfig
from .io import claim_output, read_json
from .memory import release_free_heap
from .models import (check_resolution, describe_source, load_pipeline, model_folder, model_sampling_defaults,
                     resolve_sampling)
from .progress import stage
from .prompts import CALIBRATION_FILE, CALIBRATION_PROMPTS, read_prompt_file
from .qunet import float_weights_of, plan_layers, quantize_weights, quantized_copy
from .reconstruct import reconstruct_blocks


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_config(pipe, config: QuantizeConfig) -> QuantizeConfig:
    """``config`` with its model-dependent defaults filled in: the calibration guidance (the
    model folder's recommended guidance, else 7.5). Quantization samples its trajectories the
    way the model will be sampled, so activation ranges are those the deployed model sees."""
    if config.guidance is not None:
        return config
    _, guidance = resolve_sampling(model_sampling_defaults(pipe))
    return dataclasses.replace(config, guidance=guidance)


def quantize_pipeline(pipe, config: QuantizeConfig, device="cpu", show_progress: bool | str = False,
                      release_parts: bool = False):
    """Quantize ``pipe.unet`` after Q-Diffusion; the float pipeline is left unchanged, unless
    ``release_parts``: then its text encoder(s) and VAE are dropped (set to None) once the
    trajectories are recorded, so they do not add to the peak memory of the later stages
    (for callers that own ``pipe`` and need only its UNet afterwards).

    Steps: (1) record full-precision DDIM trajectories on calibration and held-out
    prompts, (2) convert the UNet and quantize its weights with a clipping search,
    (3) calibrate activation ranges on calls spread over the schedule, (4) score the
    quantized UNet against the float one on held-out calls.

    Returns:
        ``(qunet, intervals, plans, report)``; ``report`` holds the keys of report.json.
    """
    start = time.perf_counter()
    config = resolve_config(pipe, config)
    torch.manual_seed(config.seed)
    pipe.to(device)
    fp_unet = pipe.unet.eval()
    intervals = config.make_intervals(pipe.scheduler.config.num_train_timesteps)

    info: dict = {"stage_seconds": {}}
    seconds = info["stage_seconds"]

    # 1. full-precision trajectories (timestep-aware calibration data)
    with _timed(seconds, "trajectories"):
        calib, held = record_calibration(pipe, config, show_progress, keep=config.calib_samples)
    if release_parts:
        for part in ("text_encoder", "text_encoder_2", "vae"):
            if getattr(pipe, part, None) is not None:
                setattr(pipe, part, None)
        gc.collect()
        release_free_heap()

    # 2-3. structure, weights and activation ranges
    qunet, plans = quantize_unet(fp_unet, config, intervals, calib, device, show_progress, info)

    # 4. fidelity on held-out calls
    with _timed(seconds, "evaluate"), stage("evaluate", 1, show_progress) as advance:
        reference = [call.output for call in held]  # the float UNet's own outputs, kept while recording
        test = unet_outputs(qunet, held, device)
        advance()
    overall, per_interval = sqnr_by_interval(reference, test, held, intervals)
    report = {
        "sqnr_db": overall,
        "sqnr_db_per_interval": per_interval,
        "layers_quantized": sum(p.quantized for p in plans),
        "layers_skipped": sum(not p.quantized for p in plans),
        "weight_bytes_fp": _tensor_bytes(fp_unet.state_dict()),
        "weight_bytes_quant": _tensor_bytes(qunet.state_dict()),
        "seconds": time.perf_counter() - start,
        **info,
        "intervals": intervals.to_json()["boundaries"],
        "calibration_calls": len(calib),
        "calibration_guidance": config.guidance,
        "heldout_calls": len(held),
    }
    return qunet, intervals, plans, report


def record_calibration(pipe, config: QuantizeConfig, show_progress: bool | str = False, keep: int | None = None):
    """Full-precision DDIM trajectories of the calibration prompts and of the held-out ones
    (the last ``config.holdout`` of them, so the two sets share no prompt): every UNet call,
    as ``(calibration_calls, heldout_calls)``, or with ``keep`` only the ``keep`` calls of each
    set that :func:`spread_over_schedule` picks (the trajectories stop early). Held-out calls
    carry the float UNet's output (``call.output``), the reference they are scored against.
    ``config`` must be resolved (:func:`resolve_config`)."""
    calib_prompts, held_prompts = calibration_prompts(pipe, config)
    with stage("trajectories", len(calib_prompts) + len(held_prompts), show_progress) as advance:
        calib = capture_trajectories(pipe, calib_prompts, config.calib_steps, config.guidance, config.resolution,
                                     config.seed, advance, keep)
        held = capture_trajectories(pipe, held_prompts, config.calib_steps, config.guidance, config.resolution,
                                    config.seed + 10_000, advance, keep, outputs=True)
    return calib, held


def calibration_prompts(pipe, config: QuantizeConfig) -> tuple[list[str], list[str]]:
    """``(calibration, held_out)`` prompts: ``config.calib_prompts``, else the model's own, else
    the built-in list; the last ``config.holdout`` of them are held out for the report."""
    prompts = list(config.calib_prompts or model_calibration_prompts(pipe) or CALIBRATION_PROMPTS)
    n_hold = max(1, round(len(prompts) * config.holdout))
    return prompts[:-n_hold], prompts[-n_hold:]


def quantize_unet(fp_unet, config: QuantizeConfig, intervals, calib, device="cpu", show_progress: bool | str = False,
                  info: dict | None = None):
    """A quantized copy of ``fp_unet`` (left unchanged): layers converted by the plan, weights
    quantized with the clipping search (and, with ``config.rounding == "block"``, their
    rounding learned block by block), activation ranges calibrated on the recorded UNet
    calls ``calib``. Returns ``(qunet, plans)``; ``info``, when given, receives
    ``stage_seconds`` (wall seconds per stage) and, for learned rounding, ``rounding`` (its
    summary, :func:`~qpdeploy.reconstruct.reconstruct_blocks`)."""
    info = {} if info is None else info
    seconds = info.setdefault("stage_seconds", {})
    plans = plan_layers(fp_unet, config)
    with _timed(seconds, "convert"):
        qunet = quantized_copy(fp_unet, config, intervals, plans).to(device)
    float_weights = float_weights_of(fp_unet, plans)
    with _timed(seconds, "weights"), stage("weights", sum(p.quantized for p in plans), show_progress) as advance:
        quantize_weights(qunet, float_weights, config, advance)
    if config.rounding == "block":
        with _timed(seconds, "rounding"), stage("rounding", None, show_progress) as advance:
            info["rounding"] = reconstruct_blocks(qunet, fp_unet, float_weights, calib, config.rounding_steps,
                                                  seed=config.seed, device=device, progress=advance)
    if config.act_bits is not None:
        with _timed(seconds, "activations"), stage("activations", len(calib), show_progress) as advance:
            calibrate_activations(qunet, calib, config, device, advance)
    return qunet, plans


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def model_calibration_prompts(pipe) -> list[str] | None:
    """The model's own calibration prompts: ``calibration_prompts.txt`` (one per line) in the
    folder the pipeline was loaded from, if it has one.

    A model whose vocabulary is not English (the bundled miniworld's word-level tokenizer
    knows only its world's words) ships the prompts it can read; others use the built-in list.
    """
    folder = model_folder(pipe)
    path = folder / CALIBRATION_FILE if folder is not None else None
    return read_prompt_file(path) if path is not None and path.is_file() else None


def _tensor_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def quantize_model(model, out, config: QuantizeConfig, config_dir=None, device="auto", force: bool = False,
                   show_progress: bool | str = False) -> tuple[Path, dict]:
    """Load MODEL, quantize it and write the base directory ``out`` (atomically).

    Returns:
        ``(path, report)``.
    """
    with claim_output(out, force, BASE_ARTIFACT, inputs=[model, config_dir]):  # before any long work
        pipe = load_pipeline(model, config_dir)
        check_resolution(pipe, config.resolution, "resolution")
        config = resolve_config(pipe, config)
        source = source_hash(pipe)  # before the text encoders and VAE are released
        qunet, intervals, plans, report = quantize_pipeline(pipe, config, resolve_device(device), show_progress,
                                                            release_parts=True)
        meta = base_meta(plans, describe_source(model), source)
        path = save_base(out, QuantizedBase(qunet.cpu(), config, intervals, meta), report, force=force)
    return path, read_json(path / REPORT_FILE)


def base_from_pipeline(pipe, config: QuantizeConfig, device="cpu") -> QuantizedBase:
    """Quantize in memory (no files): the quantized base of ``pipe``, for tests and chaining."""
    config = resolve_config(pipe, config)
    qunet, intervals, plans, report = quantize_pipeline(pipe, config, device)
    meta = {**base_meta(plans, {"kind": "memory"}, source_hash(pipe)), "report": report}
    return QuantizedBase(qunet, config, intervals, meta)
