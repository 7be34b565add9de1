"""The ``qpdeploy`` command line (Typer).

Each command parses its options, builds a config, calls one library function and prints
where the artifact and its report are. torch, diffusers and onnx are imported inside the
commands, so ``qpdeploy --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Literal, Optional

import typer
from typer.core import TyperGroup

from .config import PRECISIONS, TRAIN_STRATEGIES, TrainConfig, parse_strength
from .strategies import get_strategy
from .errors import QPDeployError
from .exporters.config import LAYOUTS
from .intervals import Intervals
from .progress import cli_mode
from .quiet import quiet_third_party
from .runtimes.config import BACKENDS, ORT_OPTIMIZATIONS, SCHEDULERS
from .models import DEFAULT_MODEL  # no torch: models imports torch only inside its functions

class _OneLineErrors(TyperGroup):
    """Command-line usage errors (an unknown option, a value not among the choices) as one
    ``error:`` line and exit code 2, like every other bad input."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as exc:  # the parser's own exception types live in typer's private click
            if not hasattr(exc, "format_message"):
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # plain `qpdeploy`: the help is the answer
                typer.echo(exc.format_message())
                sys.exit(0)
            message = exc.format_message().replace("Value error, ", "")  # the validator's own prefix
            typer.echo(f"error: {message} (see --help)", err=True)
            sys.exit(2)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Personalize quantized diffusion UNets by training only their quantization scales; deploy as INT8 engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags without a value, choices listed
)


@app.callback()
def _root() -> None:
    """qpdeploy: quantize -> train -> export -> generate (see README.md)."""
    quiet_third_party()


def cli_errors(fn):
    """Turn QPDeployError (bad input) into ``error: <one line>`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _quiet_libraries()
            return fn(*args, **kwargs)
        except QPDeployError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: no artifact was written", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def _parse_bits(value: str) -> int | None:
    if value.lower() in ("none", "fp", "off"):
        return None
    if value != "8":
        raise QPDeployError(f"--act-bits must be 8 or none, got {value!r}")
    return 8


@app.command()
@cli_errors
def quantize(
    model: str = typer.Argument(DEFAULT_MODEL, help="Local diffusers directory, single-file .safetensors checkpoint, "
                                                    "or a bundled model name (miniworld, tiny-sd1, tiny-sd2, tiny-sdxl)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory of the quantized base to write."),
    weight_bits: int = typer.Option(8, help="Weight bits: 8 or 4 (INT4 is stored packed two per byte)."),
    act_bits: str = typer.Option("8", help="Activation bits: 8, or 'none' for weight-only quantization."),
    act_scales: Literal["global", "per-interval"] = typer.Option("global", help="Activation scales: 'global' or 'per-interval'."),
    intervals: int = typer.Option(4, help="Number of uniform timestep intervals (per-interval scales and report)."),
    boundaries: Optional[str] = typer.Option(None, help="Explicit interval boundaries, e.g. 0,300,600,1000."),
    skip: Optional[list[str]] = typer.Option(None, help="Regex of module names kept in floating point "
                                                        "(repeatable; replaces the default skip list)."),
    no_skip: bool = typer.Option(False, "--no-skip", help="Quantize every Conv2d/Linear (empty skip list)."),
    shortcut_split: bool = typer.Option(True, help="Quantize the two halves of skip-connection inputs separately."),
    calib_method: Literal["lp", "minmax"] = typer.Option("lp", help="Clipping search for weights and activations: 'lp' or 'minmax'."),
    act_search: Optional[str] = typer.Option(None, help="Activation range search: 'lp', 'minmax' or 'output' (the "
                                                        "L_p range refined against each layer's output error); "
                                                        "default: --calib-method."),
    calib_prompts: Optional[Path] = typer.Option(None, help="File with one calibration prompt per line."),
    calib_steps: int = typer.Option(20, help="DDIM steps of each full-precision calibration trajectory."),
    calib_samples: int = typer.Option(64, help="UNet calls used for calibration, spread over the schedule."),
    calib_guidance: Optional[float] = typer.Option(None, help="Guidance scale of the calibration trajectories "
                                                              "(default: the model's recommended guidance, else 7.5)."),
    resolution: Optional[int] = typer.Option(None, help="Image size of calibration trajectories (default: model's)."),
    rounding: Literal["nearest", "block"] = typer.Option(
        "nearest", help="Weight rounding: 'nearest', or 'block' (learned per weight, block by block against the "
                        "float model's outputs: BRECQ with AdaRound; worth it for --weight-bits 4)."),
    rounding_steps: int = typer.Option(500, help="Optimizer steps per block of --rounding block."),
    seed: int = typer.Option(0, help="Seed of trajectories and sampling."),
    config: Optional[Path] = typer.Option(None, "--config", help="Local diffusers directory giving the configs of "
                                                                 "a single-file checkpoint."),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
):
    """Quantize a model's UNet (INT8/INT4 weights, INT8 activations) into a quantized base."""
    from .config import DEFAULT_SKIP, QuantizeConfig
    from .prompts import read_prompt_file

    cfg = QuantizeConfig(
        weight_bits=weight_bits,
        act_bits=_parse_bits(act_bits),
        act_scales=act_scales,
        intervals=intervals,
        boundaries=None if boundaries is None else Intervals.parse(boundaries).boundaries,
        skip=() if no_skip else tuple(skip) if skip else DEFAULT_SKIP,
        shortcut_split=shortcut_split,
        weight_search=calib_method,
        act_search=act_search or calib_method,
        calib_prompts=None if calib_prompts is None else tuple(read_prompt_file(calib_prompts)),
        calib_steps=calib_steps,
        calib_samples=calib_samples,
        guidance=calib_guidance,
        resolution=resolution,
        rounding=rounding,
        rounding_steps=rounding_steps,
        seed=seed,
    )
    from .ptq import quantize_model

    path, report = quantize_model(model, out, cfg, config_dir=config, device=device, force=force,
                                  show_progress=cli_mode())
    print_quantize_summary(report)
    typer.echo(f"quantized base: {path}\nreport: {path / 'report.json'}")


def _split_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise QPDeployError(f"expected comma-separated integers, got {text!r}") from exc


def print_quantize_summary(report: dict) -> None:
    """A short table: layers, sizes, SQNR overall and per interval."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="quantized base", show_header=False)
    table.add_row("layers quantized / skipped", f"{report['layers_quantized']} / {report['layers_skipped']}")
    table.add_row("UNet bytes fp32 -> quantized",
                  f"{report['weight_bytes_fp'] / 2**20:.1f} MiB -> {report['weight_bytes_quant'] / 2**20:.1f} MiB")
    table.add_row("SQNR vs float (held-out)", f"{report['sqnr_db']:.2f} dB")
    bounds = report["intervals"]
    for k, value in enumerate(report["sqnr_db_per_interval"]):
        shown = "no held-out call" if value is None else f"{value:.2f} dB"
        table.add_row(f"  interval {k} [{bounds[k]},{bounds[k + 1]})", shown)
    rounding = report.get("rounding")
    if rounding:
        error = rounding["relative_error"]
        table.add_row("learned rounding", f"{rounding['blocks']} blocks, block error {error['nearest']:.2e} -> "
                                          f"{error['learned']:.2e}, {100 * rounding['moved']:.1f}% of weights moved")
    stages = report.get("stage_seconds") or {}
    table.add_row("seconds", f"{report['seconds']:.1f}" + (
        " (" + ", ".join(f"{name} {value:.1f}" for name, value in stages.items()) + ")" if stages else ""))
    Console().print(table)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@cli_errors
def train(
    ctx: typer.Context,
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of 3-10 instance images (png, jpg, webp, ...)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Instance prompt holding the identifier, e.g. "
                                                              "'a photo of sks dog'."),
    subjects: Optional[Path] = typer.Option(None, "--subjects", help="Instead of --images/--prompt: a TOML file of "
                                            "several subjects ([[subject]] identifier, images, prompt, class_prompt), "
                                            "trained together over one --base; --out is then a folder of packs."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory of the scale pack to write."),
    base: Optional[Path] = typer.Option(None, "--base", help="Quantized base directory. With --model: created from "
                                                             "MODEL when missing; if it exists, MODEL is where its "
                                                             "source model moved to."),
    model: Optional[str] = typer.Option(None, "--model", help="Quantize MODEL first into --base (default <out>-base); "
                                                              f"without --base and --model: {DEFAULT_MODEL}. Any "
                                                              "'qpdeploy quantize' option may be added: --weight-bits, "
                                                              "--act-bits, --act-scales, --skip, --no-skip, "
                                                              "--shortcut-split, --calib-method, --calib-prompts, "
                                                              "--calib-steps, --calib-samples."),
    strategy: Literal[TRAIN_STRATEGIES] = typer.Option(TrainConfig.strategy, help="baseline (one scale set), s1 (one set in chosen intervals) or s2 "
                                            "(one set per interval)."),
    intervals: Optional[int] = typer.Option(None, help="Number of uniform timestep intervals (default: 2 for s2, "
                                                       "else the base's)."),
    boundaries: Optional[str] = typer.Option(None, help="Explicit interval boundaries, e.g. 0,300,600,1000."),
    s1_intervals: Optional[str] = typer.Option(None, help="S1: the intervals it trains and applies in, e.g. 0,1."),
    train_input_scales: bool = typer.Option(TrainConfig.train_input_scales, "--train-input-scales/--no-train-input-scales",
                                             help="Train input-channel scales s_in too."),
    steps: int = typer.Option(TrainConfig.steps, help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Instance samples per batch (default: 4; s2 rounds it up to a multiple of K)."),
    grad_accum: int = typer.Option(1, help="Batches accumulated per optimizer step."),
    lr: float = typer.Option(TrainConfig.lr, help="AdamW learning rate, relative to the post-training scales."),
    weight_decay: float = typer.Option(TrainConfig.weight_decay, help="AdamW weight decay (towards the post-training scales)."),
    resolution: Optional[int] = typer.Option(None, help="Training image size (default: the model's)."),
    crop: Literal["center", "random"] = typer.Option("center", help="center or random (random crops are drawn once per image, up front)."),
    identifier: str = typer.Option("sks", help="The subject's identifier word (warns if the prompt lacks it)."),
    train_token: bool = typer.Option(False, "--train-token", help="Pivotal tuning: also train the identifier's "
                                     "token embedding (it must be one token); it travels in the pack."),
    token_lr: float = typer.Option(TrainConfig.token_lr, help="Learning rate of the identifier's embedding (--train-token)."),
    class_prompt: Optional[str] = typer.Option(None, help="Prior preservation: class prompt, e.g. 'a photo of a dog'."),
    prior_images: int = typer.Option(0, help="Prior preservation: number of class images (generated once, cached)."),
    prior_weight: float = typer.Option(TrainConfig.prior_weight, help="Weight of the prior-preservation loss."),
    background_weight: float = typer.Option(TrainConfig.background_weight, help="Below 1: weigh the photos' "
                                            "background down in the loss by this factor, using subject masks in "
                                            "<images>/masks/<image name>.png (white on the subject)."),
    keep_scales: Optional[list[str]] = typer.Option(None, "--keep-scales", help="Regular expression on quantized "
                                                    "layer names whose scales stay at their post-training values "
                                                    "(not trained); repeatable, e.g. 'attn2\\.to_[kv]$'."),
    scale_lr: Optional[list[str]] = typer.Option(None, "--scale-lr", help="REGEX=FACTOR: the scales of the "
                                                 "quantized layers the expression matches train at FACTOR x --lr; "
                                                 "repeatable (the first match wins), e.g. 'attn2\\.to_[kv]$=0.3'."),
    class_dir: Optional[Path] = typer.Option(None, help="Class-image cache root (default ~/.cache/qpdeploy/class-images)."),
    sample_steps: Optional[int] = typer.Option(None, help="Sampling steps of class and validation images "
                                               "(default: the model's recommendation, else 25)."),
    sample_guidance: Optional[float] = typer.Option(None, help="Guidance scale of class and validation images "
                                                    "(default: the model's recommendation, else 7.5)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing",
                                                help="Recompute UNet blocks in backward: less memory, more time."),
    low_memory: bool = typer.Option(False, "--low-memory",
                                    help="Gradient checkpointing, and on CPU every freed block of 128 KiB or more goes "
                                         "back to the OS at once (SD 1.5 at 256 px on CPU: peak about 1.6 GiB instead "
                                         "of 2.5, 1.5-2x the time per step; README, 'Training memory')."),
    precision: Literal[PRECISIONS] = typer.Option("auto", help="auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, fp16 or bf16."),
    seed: int = typer.Option(0, help="Seed of every random draw (also passed to quantize with --model)."),
    checkpoint_every: int = typer.Option(0, help="Write a checkpoint every N steps into <out>.run/checkpoints."),
    resume: Optional[Path] = typer.Option(None, help="Continue from a checkpoint folder or a run directory (<out>.run)."),
    validate_every: int = typer.Option(0, help="Save a validation grid every N steps into <out>.run/validation."),
    validation_prompt: Optional[str] = typer.Option(None, help="Prompt of the validation grid."),
    config: Optional[Path] = typer.Option(None, "--config", help="Local diffusers directory giving the configs of a "
                                                                 "single-file MODEL."),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'."),
    processes: int = typer.Option(1, "--processes", help="Data-parallel processes (accelerate launch; one GPU each, "
                                  "or CPU processes): each step's --grad-accum micro-batches are split over them."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out (and the base --model writes)."),
):
    """Personalize a quantized base on a few images by training only its quantization scales."""
    from .config import TrainConfig
    from .distributed import check_parallel, launch

    check_parallel(processes, grad_accum, train_token, subjects is not None)
    if processes > 1 and "WORLD_SIZE" not in os.environ:
        if base is None or not base.exists():
            raise QPDeployError("--processes trains over an existing --base (quantize first, or drop --processes)")
        code = launch(["train", *_command_line(ctx, drop=("processes",))], processes)
        if code:
            raise typer.Exit(code)
        return

    if subjects is not None:
        if images is not None or prompt is not None or model is not None or base is None:
            raise QPDeployError("--subjects trains over an existing --base; the images and prompts come from the "
                                "file (drop --images, --prompt and --model)")
        prompt = "a photo of the subject"  # each subject's own prompt replaces it
    elif images is None or prompt is None:
        raise QPDeployError("give --images and --prompt (one subject), or --subjects FILE (several)")
    cfg = TrainConfig(
        prompt=prompt, strategy=strategy, intervals=intervals,
        boundaries=None if boundaries is None else Intervals.parse(boundaries).boundaries,
        s1_intervals=() if s1_intervals is None else tuple(_split_ints(s1_intervals)),
        train_input_scales=train_input_scales, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        weight_decay=weight_decay, resolution=resolution, crop=crop, identifier=identifier, train_token=train_token,
        token_lr=token_lr,
        class_prompt=class_prompt if subjects is None else None,
        prior_images=prior_images if subjects is None else 0, prior_weight=prior_weight,
        background_weight=background_weight, keep_scales=tuple(keep_scales or ()),
        scale_lr=tuple(scale_lr or ()), sample_steps=sample_steps, guidance=sample_guidance,
        gradient_checkpointing=gradient_checkpointing or low_memory, precision=precision, seed=seed,
        checkpoint_every=checkpoint_every, validate_every=validate_every, validation_prompt=validation_prompt,
    )
    if low_memory:
        from .memory import cap_heap_retention

        cap_heap_retention()
    if subjects is not None:
        from .multisubject import read_subjects, train_subjects

        with _warnings_as_lines():
            path, reports = train_subjects(base, read_subjects(subjects), out, cfg, prior_images=prior_images,
                                           config_dir=config, class_dir=class_dir, resume=resume, device=device,
                                           force=force, show_progress=cli_mode())
        for identifier, report in reports.items():
            typer.echo(f"{identifier}: final loss {report['final_loss']:.4f}, {report['trainable_params']} scales")
        typer.echo(f"scale packs: {', '.join(str(path / i) for i in reports)}")
        return
    forwarded = [*(["--intervals", str(intervals)] if intervals is not None else []),
                 *(["--boundaries", boundaries] if boundaries is not None else []),
                 *(["--resolution", str(resolution)] if resolution is not None else []),
                 *(["--config", str(config)] if config is not None else []),
                 "--seed", str(seed), "--device", device, *(["--force"] if force else [])]
    from .train import check_train_inputs
    from .train import train as train_pack

    early = functools.partial(check_train_inputs, images, cfg, out, force,
                              [base, images, model, config, class_dir, resume], resume=resume)
    base_dir, source = _base_for_training(ctx, model, base, out, images, forwarded, force, early)

    with _warnings_as_lines():
        path, report = train_pack(base_dir, images, out, cfg, source=source, config_dir=config, class_dir=class_dir,
                                  resume=resume, device=device, force=force, show_progress=cli_mode())
    if path is None:  # a data-parallel process other than 0: process 0 reports
        return
    print_train_summary(report)
    typer.echo(f"scale pack: {path}\nreport: {path / 'report.json'}")


def _command_line(ctx: typer.Context, drop=()) -> list[str]:
    """The options of the running command as command-line words (those in ``drop`` left
    out), for re-running it in other processes."""
    words = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop or value is None or value == param.default or not param.opts:
            continue
        if param.is_flag:
            words.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.multiple:  # a repeatable option: once per value (none given: left out)
            words += [word for item in value for word in (param.opts[0], str(item))]
        else:
            words += [param.opts[0], str(value)]
    return [*words, *ctx.args]


def _base_for_training(ctx: typer.Context, model, base, out: Path, images: Path, forwarded: list[str], force: bool,
                       check_inputs):
    """``(base dir, moved source or None)``; with --model and no existing base, quantize first
    by running the ``quantize`` command itself, so it takes exactly quantize's options, after
    ``check_inputs()`` (training's own checks, which must not wait for the quantization)."""
    extra = list(ctx.args)
    if model is None and base is None:
        model = DEFAULT_MODEL  # like every other command: the bundled model
    if model is None or (base is not None and base.exists()):
        if extra:
            why = "they apply when --model quantizes" + (f", and {base} already exists" if model else "")
            raise QPDeployError(f"unknown option(s) {' '.join(extra)} ({why})")
        return base, model
    base = base if base is not None else Path(f"{out}-base")
    from .base import BASE_ARTIFACT
    from .io import check_output, overlap

    check_inputs()
    check_output(base, force, BASE_ARTIFACT, [images, model])
    if overlap(base, out):
        raise QPDeployError(f"the base --model writes ({base}) {overlap(base, out)} --out {out}; choose another --base")
    from typer.main import get_command

    command = get_command(app).commands["quantize"]
    try:
        code = command.main(args=[model, "--out", str(base), *forwarded, *extra], prog_name="qpdeploy quantize",
                            standalone_mode=False)
    except Exception as exc:  # the command-line parser's usage errors
        if not hasattr(exc, "format_message"):
            raise
        raise QPDeployError(f"{exc.format_message()} (while quantizing {model})") from None
    if code:
        raise typer.Exit(code)
    return base, None


def _quiet_libraries() -> None:
    """No per-component loading bars: the command's own progress display and summary say what
    happens (known notices are dropped by :func:`qpdeploy.quiet.quiet_third_party`)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def _warnings_as_lines():
    """Show library warnings (bad images, a prompt without identifier) as ``warning: ...`` lines."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda message, *args, **kwargs: typer.echo(f"warning: {message}", err=True)
        yield


def print_train_summary(report: dict) -> None:
    """A short table: strategy, trainable values, pack size, loss, samples per interval, time, memory."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="scale pack", show_header=False)
    table.add_row("strategy / scale sets", f"{report['strategy']} / {report['num_sets']}")
    table.add_row("trainable values", f"{report['trainable_params']:,}")
    table.add_row("pack bytes", f"{report['pack_bytes'] / 2**10:.1f} KiB")
    table.add_row("steps", str(report["steps"]))
    table.add_row("loss first -> last steps", f"{report['initial_loss']:.4f} -> {report['final_loss']:.4f}")
    bounds = report["intervals"]
    for k, count in enumerate(report["samples_per_interval"]):
        table.add_row(f"  samples in [{bounds[k]},{bounds[k + 1]})", str(count))
    table.add_row("seconds", f"{report['seconds']:.1f}")
    table.add_row("peak memory (training loop)", f"{report['peak_memory_bytes'] / 2**20:.0f} MiB")
    Console().print(table)


@app.command()
@cli_errors
def export(
    base: Path = typer.Option(..., "--base", help="Quantized base directory (from qpdeploy quantize)."),
    out: Path = typer.Option(..., "--out", "-o", help="Deploy directory to write."),
    pack: Optional[list[Path]] = typer.Option(None, "--pack", metavar="PACK", help="Scale pack directory (from qpdeploy train); "
                                                                   "without it: the plain INT8 model. Give it "
                                                                   "several times for a multi-subject deploy dir."),
    layout: Optional[Literal[LAYOUTS]] = typer.Option(None, help="per-interval, masked, multi-expert or multi-subject "
                                                    "(default: masked for an S1 pack, per-interval for one other "
                                                    "pack, multi-subject for several)."),
    height: Optional[int] = typer.Option(None, help="Image height in pixels (default: the model's resolution)."),
    width: Optional[int] = typer.Option(None, help="Image width in pixels (default: the model's resolution)."),
    batch: int = typer.Option(2, help="UNet batch of the engines (2 = one classifier-free-guidance pair); "
                                      "the ONNX graphs keep the batch dynamic."),
    build_engines: bool = typer.Option(False, "--build-engines", help="Build TensorRT engines with Polygraphy "
                                                                     "(needs the trt extra and a GPU)."),
    strongly_typed: bool = typer.Option(False, "--strongly-typed", help="Build strongly typed TensorRT networks "
                                                                       "instead of INT8+FP16 builder flags."),
    verify: bool = typer.Option(True, help="Run every interval on ONNX Runtime against the torch model (SQNR)."),
    opset: int = typer.Option(18, help="ONNX opset (17-20)."),
    max_subjects: int = typer.Option(16, help="multi-subject layout: subjects the TensorRT engines leave room for "
                                              "(add-subject beyond it needs new engines)."),
    pack_strength: str = typer.Option("1", "--pack-strength", help="How much of the pack(s) to export: 0 the base, "
                                      "1 the pack as trained; lower keeps more of the prompt, less of the subject "
                                      "(subjects added later get it too). One value per interval, low-noise first, "
                                      "as 1/0.5."),
    model: Optional[str] = typer.Option(None, "--model", help="Where the base's source model is now, if it moved."),
    config: Optional[Path] = typer.Option(None, "--config", help="Local diffusers directory giving the configs of "
                                                                 "a single-file source model."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
):
    """Export a quantized base (+ scale pack) to a deploy dir: ONNX with Q/DQ, TensorRT engines, manifest."""
    from .exporters.config import ExportConfig
    from .exporters.export import export_from_paths, print_export_summary

    cfg = ExportConfig(layout=layout, height=height, width=width, batch=batch, opset=opset, verify=verify,
                       build_engines=build_engines, strongly_typed=strongly_typed, max_subjects=max_subjects,
                       pack_strength=parse_strength(pack_strength))
    packs = list(pack or [])
    path, report = export_from_paths(base, packs if len(packs) > 1 else (packs[0] if packs else None), out, cfg,
                                     model=model, config_dir=config, force=force, show_progress=cli_mode())
    print_export_summary(report)
    typer.echo(f"deploy dir: {path}\nreport: {path / 'report.json'}")


@app.command()
@cli_errors
def generate(
    deploy: Path = typer.Argument(..., help="Deploy directory (from qpdeploy export)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt of the image(s)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="File with one prompt per line."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (a run of exactly one image)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Folder for the images of a run."),
    images_per_prompt: int = typer.Option(1, help="Images per prompt (image i of the run uses seed + i)."),
    negative_prompt: Optional[str] = typer.Option(None, help="Negative prompt."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the model's recommendation, "
                                                   "else 25)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale, <= 1: none (default: the "
                                                        "model's recommendation, else 7.5)."),
    seed: int = typer.Option(0, help="Seed of the first image."),
    scheduler: Optional[Literal[SCHEDULERS]] = typer.Option(None, help="ddim, pndm, dpm (DPM-Solver++) or euler "
                                                       "(default: the deploy dir's own)."),
    backend: Literal[BACKENDS] = typer.Option("ort", help="ort (ONNX Runtime), trt (TensorRT engines) or torch (the quantized "
                                            "PyTorch reference; needs --base and --pack)."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Keep only the current interval's UNet engine "
                                                                "loaded; the next one loads ahead in the background."),
    height: Optional[int] = typer.Option(None, help="Image height (default and only choice: the exported size)."),
    width: Optional[int] = typer.Option(None, help="Image width (default and only choice: the exported size)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    threads: int = typer.Option(0, help="ONNX Runtime threads (0: all cores)."),
    ort_optimization: Literal[ORT_OPTIMIZATIONS] = typer.Option("basic", help="ONNX Runtime graph optimization: none, basic (keeps the "
                                                       "exported Q/DQ arithmetic), extended or all (faster fusions)."),
    fold_weights: bool = typer.Option(False, "--fold-weights", help="ONNX Runtime: dequantize the INT8 weights "
                                      "to FP32 once at load (faster calls at small image sizes on CPU, four bytes "
                                      "per weight per loaded engine instead of one shared INT8 copy)."),
    arena: bool = typer.Option(True, "--arena/--no-arena", help="ONNX Runtime: one memory arena reused by every "
                               "call (default); --no-arena allocates each call afresh: less memory held between "
                               "calls, slower calls."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="TensorRT: replay each engine from a CUDA graph."),
    verify_hashes: bool = typer.Option(True, help="Check every deploy file against the manifest's SHA-256 first."),
    base: Optional[Path] = typer.Option(None, "--base", help="torch backend: the quantized base exported."),
    pack: Optional[Path] = typer.Option(None, "--pack", help="torch backend: the scale pack exported."),
    subject: Optional[str] = typer.Option(None, "--subject", help="Multi-subject deploy dir: the subject "
                                                                  "(identifier word) to draw."),
    force: bool = typer.Option(False, "--force", help="Replace existing images."),
):
    """Generate images from a deploy dir; each step runs the UNet engine of its timestep interval."""
    from .progress import stage
    from .prompts import read_prompt_file
    from .runtimes.config import GenerateConfig, RuntimeConfig

    if (prompt is None) == (prompts_file is None):
        raise QPDeployError("give either --prompt TEXT or --prompts-file FILE")
    prompts = [prompt] if prompt is not None else read_prompt_file(prompts_file)
    steps, guidance = _sampling_defaults(deploy, steps, guidance)
    gen = GenerateConfig(steps=steps, guidance=guidance, scheduler=scheduler, seed=seed,
                         images_per_prompt=images_per_prompt, negative_prompt=negative_prompt, height=height,
                         width=width, subject=subject)
    runtime = RuntimeConfig(backend=backend, device=device, low_memory=low_memory, threads=threads,
                            ort_optimization=ort_optimization, fold_weights=fold_weights, arena=arena,
                            cuda_graph=cuda_graph, verify_hashes=verify_hashes,
                            base=None if base is None else str(base), pack=None if pack is None else str(pack))
    from .runtimes.generate import generate as generate_images
    from .runtimes.generate import print_generate_summary

    with _warnings_as_lines(), stage("generate", len(prompts) * images_per_prompt, cli_mode()) as advance:
        records = generate_images(deploy, prompts, gen, runtime, out, out_dir, force, advance)
    print_generate_summary(records)
    where = out if out is not None else out_dir
    typer.echo(f"images: {where}\nrecords: <image>.json beside each image")


@app.command("add-subject")
@cli_errors
def add_subject(
    deploy: Path = typer.Argument(..., help="Multi-subject deploy directory (from qpdeploy export)."),
    pack: Path = typer.Option(..., "--pack", help="Scale pack of the new subject (same base and intervals)."),
    force: bool = typer.Option(False, "--force", help="Replace a subject of the same identifier."),
):
    """Add a subject to a multi-subject deploy dir: only its scale tables and manifest change."""
    from .exporters.subjects import add_subject as add

    record = add(deploy, pack, force)
    typer.echo(f"added subject {record['identifier']} (rows {record['first_row']}-"
               f"{record['first_row'] + record['sets'] - 1}) to {deploy}; the UNet graph and weights are unchanged")


@app.command("remove-subject")
@cli_errors
def remove_subject(
    deploy: Path = typer.Argument(..., help="Multi-subject deploy directory."),
    subject: str = typer.Option(..., "--subject", help="Identifier of the subject to remove."),
):
    """Remove a subject from a multi-subject deploy dir (scale tables and manifest only)."""
    from .exporters.subjects import remove_subject as remove

    remove(deploy, subject)
    typer.echo(f"removed subject {subject} from {deploy}")


_REPO_OPTIONS = {
    "instances": typer.Option(4, "--instances", help="Pipeline instances: requests generated at once (their UNet "
                              "calls are batched together)."),
    "backend": typer.Option("ort", "--backend", help="Engines every model runs: ort, or trt (engines built on the "
                            "serving machine)."),
    "device": typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    "threads": typer.Option(0, "--threads", help="ONNX Runtime threads per model (0: its default)."),
    "fold_weights": typer.Option(False, "--fold-weights", help="ONNX Runtime (python platform): dequantize the UNet's "
                                 "INT8 weights to FP32 once at load (as generate --fold-weights)."),
    "arena": typer.Option(True, "--arena/--no-arena", help="ONNX Runtime (python platform): one memory arena per "
                          "model process, reused by every call (default); --no-arena gives each call's memory back "
                          "(slower calls)."),
    "delay": typer.Option(2000, "--max-queue-delay-us", help="How long the UNet's dynamic batcher waits for more "
                          "requests (microseconds)."),
    "platform": typer.Option("python", "--platform", help="python (Python-backend models running qpdeploy's runners: "
                             "every layout, every Triton build), onnxruntime or tensorrt (Triton's own backends, one "
                             "model per UNet graph; not the multi-subject layout)."),
}


def _repository(deploy: Path, out: Path, force: bool, *, instances: int, backend: str, device: str, threads: int,
                fold_weights: bool, arena: bool, delay: int, platform: str, deploy_path: Optional[str] = None,
                verify_hashes: bool = True) -> Path:
    from .runtimes.triton import RepositoryConfig, write_repository

    config = RepositoryConfig(instances=instances, max_queue_delay_us=delay, backend=backend, device=device,
                              threads=threads, fold_weights=fold_weights, arena=arena, deploy_path=deploy_path,
                              platform=platform)
    return write_repository(deploy, out, config, force, verify_hashes)


@app.command()
@cli_errors
def triton(
    deploy: Path = typer.Argument(..., help="Deploy directory to serve."),
    out: Path = typer.Option(..., "--out", help="Model repository to write."),
    deploy_path: Optional[str] = typer.Option(None, "--deploy-path", help="The deploy dir's path as the server "
                                              "sees it (e.g. where a container mounts it); default: its path here."),
    instances: int = _REPO_OPTIONS["instances"],
    backend: Literal["ort", "trt"] = _REPO_OPTIONS["backend"],
    device: str = _REPO_OPTIONS["device"],
    threads: int = _REPO_OPTIONS["threads"],
    fold_weights: bool = _REPO_OPTIONS["fold_weights"],
    arena: bool = _REPO_OPTIONS["arena"],
    delay: int = _REPO_OPTIONS["delay"],
    platform: Literal["python", "onnxruntime", "tensorrt"] = _REPO_OPTIONS["platform"],
    force: bool = typer.Option(False, "--force", help="Replace an existing repository written by this command."),
):
    """Write a Triton Inference Server model repository for a deploy dir (pipeline, unet,
    text encoder and VAE decoder models), for tritonserver here, in a container or on Jetson."""
    repo = _repository(deploy, out, force, instances=instances, backend=backend, device=device, threads=threads,
                       fold_weights=fold_weights, arena=arena, delay=delay, platform=platform,
                       deploy_path=deploy_path)
    models = sorted(p.name for p in repo.iterdir() if p.is_dir())
    typer.echo(f"model repository -> {repo} (models: {', '.join(models)}); run it with "
               f"tritonserver --model-repository {repo}")


@app.command()
@cli_errors
def serve(
    deploy: Path = typer.Argument(..., help="Deploy directory to serve."),
    repo: Path = typer.Option(..., "--repo", help="Model repository to write (and serve)."),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP port (gRPC takes the next one, metrics the one "
                                  "after)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    instances: int = _REPO_OPTIONS["instances"],
    backend: Literal["ort", "trt"] = _REPO_OPTIONS["backend"],
    device: str = _REPO_OPTIONS["device"],
    threads: int = _REPO_OPTIONS["threads"],
    fold_weights: bool = _REPO_OPTIONS["fold_weights"],
    arena: bool = _REPO_OPTIONS["arena"],
    delay: int = _REPO_OPTIONS["delay"],
    platform: Literal["python", "onnxruntime", "tensorrt"] = _REPO_OPTIONS["platform"],
    force: bool = typer.Option(False, "--force", help="Replace an existing repository written by qpdeploy."),
):
    """Write the Triton model repository of a deploy dir and serve it with tritonserver until
    interrupted (the nvidia-pytriton wheel's binary: pip install -e ".[serve]")."""
    import signal

    from .runtimes.triton import TritonServer

    # the served models hash the files they open as they load: no second pass here
    repository = _repository(deploy, repo, force, instances=instances, backend=backend, device=device,
                             threads=threads, fold_weights=fold_weights, arena=arena, delay=delay,
                             platform=platform, verify_hashes=False)
    server = TritonServer(repository, http_port, http_port + 1, http_port + 2, address=host,
                          log=repository / "tritonserver.log")
    server.start()
    typer.echo(f"serving {deploy} at http://{server.url} (model 'pipeline'); Ctrl-C stops")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        status = server.process.wait()
    except KeyboardInterrupt:
        status = 0
    finally:
        server.stop()
    if status:
        raise QPDeployError(f"tritonserver stopped with status {status} (log: {server.log_path})")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _sampling_defaults(deploy: Path, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """Steps and guidance: the user's, else the deploy dir's recommendation, else 25 and 7.5."""
    from .exporters.manifest import read_manifest
    from .models import resolve_sampling

    return resolve_sampling(read_manifest(deploy).sampling if steps is None or guidance is None else {}, steps, guidance)


@app.command()
@cli_errors
def evaluate(
    deploy: Optional[Path] = typer.Argument(None, help="Deploy directory to evaluate (or give --base)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Quantized base to evaluate in PyTorch instead."),
    pack: Optional[Path] = typer.Option(None, "--pack", help="Scale pack applied to --base."),
    pack_strength: str = typer.Option("1", "--pack-strength", help="How much of --pack to apply (0: the base, "
                                                                   "1: the pack as trained; one value per interval, "
                                                                   "low-noise first, as 1/0.5)."),
    prompts: Path = typer.Option(..., "--prompts", help="File with one prompt per line."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write: report.json and images/."),
    identifier: Optional[str] = typer.Option(None, help="The subject's word: adds subject metrics."),
    instance_images: Optional[Path] = typer.Option(None, help="Photos of the subject (needed by clip_i and dino, "
                                                              "and for a subject the miniworld does not ship)."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="Local CLIP model folder: clip_t and clip_i."),
    dino: Optional[Path] = typer.Option(None, "--dino", help="Local DINO ViT model folder: dino."),
    images_per_prompt: int = typer.Option(4, help="Images per prompt."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the model's recommendation, else 25)."),
    guidance: Optional[float] = typer.Option(None, help="Guidance scale (default: the model's recommendation, else "
                                                        "4 with miniworld metrics, 7.5 with --clip/--dino)."),
    seed: int = typer.Option(0, help="Seed of the run's first image."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out (an earlier evaluation)."),
):
    """Measure subject and prompt fidelity of a model, with 95% confidence intervals.

    Without --clip/--dino the bundled miniworld's evaluator scores the images (prompts must be
    miniworld captions); with them, CLIP-T, CLIP-I and DINO as in the DreamBooth paper.
    """
    from .evaluate import EvaluateConfig
    from .evaluate import evaluate as run_evaluation

    cfg = EvaluateConfig(images_per_prompt=images_per_prompt, seed=seed, steps=steps, guidance=guidance,
                         identifier=identifier, pack_strength=parse_strength(pack_strength))
    path, report = run_evaluation(out, prompts, cfg, deploy, base, pack, instance_images, clip, dino, device, force)
    for name, stat in report["metrics"].items():
        typer.echo(f"{name:20s} {stat['mean']:.3f}  [{stat['low']:.3f}, {stat['high']:.3f}]  ({stat['n']} images)")
    typer.echo(f"report: {path / 'report.json'}\nimages: {path / 'images'}")


@app.command()
@cli_errors
def demo(
    out: Path = typer.Option(Path("qpdeploy-demo"), "--out", "-o", help="Directory to write."),
    subject: Literal["sks", "zwx", "qlv", "pkd"] = typer.Option(
        "sks", help="Bundled subject: sks (two-tone circle), zwx (orange square, blue dot), qlv (checkered "
                    "square) or pkd (triangle of six thin bands)."),
    intervals: int = typer.Option(get_strategy("s2").default_intervals,
                                  help="Timestep intervals K (S2: one scale set each)."),
    steps: int = typer.Option(TrainConfig.steps, help="Training steps."),
    lr: float = typer.Option(TrainConfig.lr, help="Learning rate of the scales."),
    seeds: int = typer.Option(2, help="Images per prompt and model."),
    threads: int = typer.Option(0, help="ONNX Runtime threads (0: all cores)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
):
    """Whole flow on the bundled miniworld model: quantize, train S2, export, generate, compare."""
    from .demo import DemoConfig, run_demo

    config = DemoConfig(subject=subject, intervals=intervals, steps=steps, lr=lr, seeds=seeds, threads=threads)
    path, report = run_demo(out, config, force=force, show_progress=cli_mode())
    print_demo_summary(report)
    typer.echo(f"grid: {path / 'grid.png'}\nreport: {path / 'report.json'}")


def print_demo_summary(report: dict) -> None:
    """Subject and prompt fidelity of both models, and where the time went."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"demo: subject {report['subject']['identifier']} ({report['subject']['description']})")
    columns = ("model", "subject recognised (instance / head), training prompt",
               "subject recognised (instance / head), new backgrounds", "background right", "shape right")
    for column in columns:
        table.add_column(column)

    def recognised(f: dict) -> str:
        return f"{f.get('instance_recognised', float('nan')):.0%} / {f['recognised']:.0%}"

    for name, m in report["models"].items():
        table.add_row(name, recognised(m["subject_fidelity_training_prompt"]), recognised(m["subject_fidelity"]),
                      f"{m['prompt_fidelity']['background']:.0%}", f"{m['prompt_fidelity']['shape']:.0%}")
    Console().print(table)
    typer.echo("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()))


if __name__ == "__main__":  # pragma: no cover
    app()
