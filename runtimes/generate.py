"""``qpdeploy generate``: images from a deploy dir alone, each with a JSON record beside it.

The record (``<image>.json``) holds the prompt, negative prompt, seed, steps, scheduler,
guidance, backend, the manifest's SHA-256, the interval and engine of every UNet call
(``interval_per_step``, ``engine_per_step``), ``engine_calls`` (interval -> calls),
``seconds_per_step`` (denoising seconds per UNet call, scheduler and guidance included),
``switch_seconds_total`` and the other timings, resident memory, and both configs.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path

from qpdeploy.errors import QPDeployError
from qpdeploy.io import check_output, file_sha256, write_file_atomic, write_json
from qpdeploy.prompts import check_prompt_tokens, check_text

from .config import GenerateConfig, RuntimeConfig


@dataclass(frozen=True)
class ImageJob:
    """One image to make: its prompt, seed and output path."""

    prompt: str
    seed: int
    path: Path


def plan_images(prompts: list[str], config: GenerateConfig, out=None, out_dir=None,
                force: bool = False) -> list[ImageJob]:
    """Output paths and seeds: image i of the run (prompt-major) gets ``config.seed + i``.

    ``out`` names the single image of a one-image run; ``out_dir`` holds
    ``NNNN_<prompt words>.png`` files.

    Raises:
        QPDeployError: neither or both outputs, ``out`` for several images, a non-PNG
            name, or an existing image without ``force``.
    """
    if (out is None) == (out_dir is None):
        raise QPDeployError("give either --out IMAGE.png (one image) or --out-dir DIR")
    pairs = [(p, i) for p in prompts for i in range(config.images_per_prompt)]
    if out is not None:
        if len(pairs) != 1:
            raise QPDeployError(f"--out names one image but this run makes {len(pairs)}; use --out-dir")
        paths = [Path(out)]
    else:
        paths = [Path(out_dir) / f"{n:04d}_{_slug(p)}.png" for n, (p, _) in enumerate(pairs)]
    jobs = [ImageJob(p, config.seed + n, path) for n, ((p, _), path) in enumerate(zip(pairs, paths))]
    for job in jobs:
        if job.path.suffix.lower() != ".png":
            raise QPDeployError(f"images are written as PNG; name the output *.png, not {job.path.name}")
        if job.path.exists() and not force:
            raise QPDeployError(f"output {job.path} already exists (use --force to replace it)")
    return jobs


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"


def check_size(manifest, config: GenerateConfig) -> tuple[int, int]:
    """The image size to sample: the exported one, which is also the only one accepted."""
    from qpdeploy.models import size_bounds

    exported = manifest.size
    asked = (config.height or exported[0], config.width or exported[1])
    if asked != exported:
        multiple, largest = size_bounds(manifest.unet_config, manifest.vae_scale_factor)
        advice = (f"re-export with --height {asked[0]} --width {asked[1]}"
                  if all(multiple <= v <= largest and v % multiple == 0 for v in asked)
                  else f"this model takes multiples of {multiple} up to {largest}")
        raise QPDeployError(f"size {asked[0]}x{asked[1]} is not the size deploy dir {manifest.path} was exported "
                            f"for ({exported[0]}x{exported[1]}); its graphs have fixed spatial shapes: {advice}")
    return asked


def generate(deploy, prompts: list[str], config: GenerateConfig, runtime: RuntimeConfig, out=None, out_dir=None,
             force: bool = False, progress=None) -> list[dict]:
    """Generate every image of ``prompts`` (see :func:`plan_images`) and write its record.

    Steps: (1) plan outputs and check the size, (2) read and verify the deploy dir and load
    the pipeline (runners active), (3) per image: announce the schedule, sample, write the
    PNG and its JSON record, (4) free the runners.

    Returns:
        The records written, in order.
    """
    from qpdeploy.exporters.manifest import MANIFEST_FILE, read_manifest

    from .pipeline import close_pipeline, load_deploy_pipeline

    check_prompts(prompts, config)
    jobs = plan_images(prompts, config, out, out_dir, force)
    for job in jobs:
        check_output(job.path, force=True, inputs=[deploy, runtime.base, runtime.pack], directory=False)
        if job.path.is_dir():
            raise QPDeployError(f"output {job.path} is a directory; name an image file")
    start = time.perf_counter()
    manifest = read_manifest(deploy, verify_hashes=runtime.verify_hashes)
    height, width = check_size(manifest, config)
    check_request(manifest, prompts, config)
    pipe = load_deploy_pipeline(manifest, runtime, config.scheduler, config.subject)
    load_seconds = time.perf_counter() - start
    context = {"deploy_dir": str(manifest.path), "manifest_sha256": file_sha256(manifest.path / MANIFEST_FILE),
               "load_seconds": load_seconds, "size": (height, width)}
    try:
        records = []
        for job in jobs:
            records.append(generate_one(pipe, job, config, runtime, manifest, context))
            if progress is not None:
                progress()
        return records
    finally:
        close_pipeline(pipe)


def check_prompts(prompts: list[str], config: GenerateConfig, names=("--prompt", "--negative-prompt")) -> None:
    """Prompts and the negative prompt are text (one-line errors naming the bad one, by
    ``names``: the command's options, or a request's input names)."""
    for n, prompt in enumerate(prompts):
        check_text(prompt, names[0] if len(prompts) == 1 else f"prompt {n + 1}")
    check_text(config.negative_prompt, names[1])


def check_request(manifest, prompts: list[str], config: GenerateConfig) -> None:
    """What a deploy dir accepts of a request: steps within the model's training timesteps,
    a subject it holds; warnings where a prompt and the subject disagree. ``generate`` and
    the Triton pipeline model both call it.

    Raises:
        QPDeployError: one line naming the problem.
    """
    if config.steps > manifest.intervals.num_train_timesteps:
        raise QPDeployError(f"steps must be at most the model's {manifest.intervals.num_train_timesteps} training "
                            f"timesteps, got {config.steps}")
    for prompt in prompts:
        check_subject_prompt(manifest, config.subject, prompt)


def check_subject_prompt(manifest, subject: str | None, prompt: str) -> None:
    """Warn (one line) when a prompt and the chosen subject of a multi-subject deploy dir
    disagree: the prompt names another of its subjects, or does not name the chosen one, or
    names one while none is chosen. An unknown ``subject`` raises :class:`QPDeployError`."""
    import warnings

    manifest.subject_dispatch(subject)
    identifiers = [s["identifier"] for s in manifest.subjects]
    if not identifiers:
        return
    words = set(re.findall(r"[\w-]+", prompt.lower()))
    named = [i for i in identifiers if i.lower() in words]
    if subject is None and named:
        warnings.warn(f"prompt names subject {named[0]!r} of this deploy dir but no --subject is given: the "
                      "post-training scales draw it as the base model would", UserWarning, stacklevel=2)
    elif subject is not None and any(i != subject for i in named):
        other = next(i for i in named if i != subject)
        warnings.warn(f"prompt names subject {other!r} but --subject is {subject!r}: one UNet call uses one "
                      "subject's scales", UserWarning, stacklevel=2)
    elif subject is not None and subject.lower() not in words:
        warnings.warn(f"prompt does not name subject {subject!r} (its instance prompt: "
                      f"{_instance_prompt(manifest, subject)!r})", UserWarning, stacklevel=2)


def _instance_prompt(manifest, subject: str) -> str | None:
    return next((s.get("prompt") for s in manifest.subjects if s["identifier"] == subject), None)


def generate_one(pipe, job: ImageJob, config: GenerateConfig, runtime: RuntimeConfig, manifest, context) -> dict:
    """Sample one image with ``pipe`` and write it and its record; returns the record."""
    image, record = sample_image(pipe, job.prompt, job.seed, config, runtime, manifest, context, job.path.name)
    write_file_atomic(job.path, lambda tmp: image.save(tmp, format="PNG"))
    write_file_atomic(job.path.with_suffix(".json"), lambda tmp: write_json(tmp, record))
    return record


def sample_image(pipe, prompt: str, seed: int, config: GenerateConfig, runtime: RuntimeConfig, manifest, context,
                 name: str | None = None):
    """Sample one image with ``pipe``: ``(PIL image, its record)``. ``generate`` and the
    Triton pipeline model both call this, so a served image is made as ``generate`` makes it."""
    import torch

    tokenizer = pipe.tokenizer or getattr(pipe, "tokenizer_2", None)  # SDXL's two share one limit: warn once
    check_prompt_tokens(tokenizer, prompt)
    check_prompt_tokens(tokenizer, config.negative_prompt, "negative prompt")
    schedule = copy.deepcopy(pipe.scheduler)
    schedule.set_timesteps(config.steps)
    pipe.unet.expect(schedule.timesteps)
    parts = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.vae) if m is not None]
    for module in parts:
        module.seconds = 0.0
    pipe.unet.reset_history()
    start = time.perf_counter()
    image = pipe(prompt=prompt, negative_prompt=config.negative_prompt, num_inference_steps=config.steps,
                 guidance_scale=config.guidance, height=context["size"][0], width=context["size"][1],
                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    total = time.perf_counter() - start
    return image, image_record(pipe, prompt, seed, name, config, runtime, manifest, context, total)


def image_record(pipe, prompt: str, seed: int, name: str | None, config: GenerateConfig, runtime: RuntimeConfig,
                 manifest, context, total: float) -> dict:
    """The JSON record of one image (see module doc)."""
    from qpdeploy.memory import rss_bytes

    calls = pipe.unet.summary()
    text = sum(m.seconds for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None)
    vae = pipe.vae.seconds
    denoise = total - text - vae
    steps = max(len(calls["interval_per_step"]), 1)
    return {
        "image": name,
        "prompt": prompt,
        "negative_prompt": config.negative_prompt,
        "seed": seed,
        "steps": config.steps,
        "scheduler": type(pipe.scheduler).__name__,
        "guidance": config.guidance,
        "height": context["size"][0],
        "width": context["size"][1],
        "backend": runtime.backend,
        "low_memory": runtime.low_memory,
        "deploy_dir": context["deploy_dir"],
        "manifest_sha256": context["manifest_sha256"],
        "base_hash": manifest.hashes[0],
        "pack_hash": _pack_hash(manifest, config.subject),
        "subject": config.subject,
        "layout": manifest.layout,
        **{k: calls[k] for k in ("interval_per_step", "timesteps", "engine_per_step", "engine_calls")},
        "seconds_per_step": denoise / steps,
        "unet_seconds_per_step": calls["unet_seconds_per_step"],
        "switches": calls["switches"],
        "switch_seconds_total": calls["switch_seconds_total"],
        "switch_share_of_denoising": calls["switch_seconds_total"] / denoise if denoise > 0 else 0.0,
        "timings": {"load_seconds": context["load_seconds"], "text_encoder_seconds": text,
                    "denoise_seconds": denoise, "vae_decode_seconds": vae, "total_seconds": total},
        "resident_bytes": rss_bytes(),
        "generate": config.to_json(),
        "runtime": runtime.to_json(),
    }


def _pack_hash(manifest, subject: str | None) -> str | None:
    """The pack whose scales drew the image: the deploy dir's, or the chosen subject's."""
    if subject is None:
        return manifest.hashes[1]
    return next(s["pack_hash"] for s in manifest.subjects if s["identifier"] == subject)


def print_generate_summary(records: list[dict]) -> None:
    """One table row per image: file, seed, intervals visited, seconds per step, switch time."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="generate")
    for column in ("image", "seed", "backend", "intervals per step", "s / step", "switch s"):
        table.add_column(column)
    for r in records:
        intervals = "".join(str(k) if isinstance(k, int) else "*" for k in r["interval_per_step"])
        table.add_row(r["image"], str(r["seed"]), r["backend"], intervals, f"{r['seconds_per_step']:.3f}",
                      f"{r['switch_seconds_total']:.4f}")
    Console().print(table)
