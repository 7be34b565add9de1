"""The ``qpdeploy`` command line (Typer).

Each command parses its options, builds a config, calls one library function and prints
where the artifact and its report are. torch, diffusers and onnx are imported inside the
commands, so ``qpdeploy --help`` stays instant.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import QPDeployError

app = typer.Typer(
    help="Personalize quantized diffusion UNets by training only their quantization scales; deploy as INT8 engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """qpdeploy: quantize -> train -> export -> generate (see README.md)."""


def cli_errors(fn):
    """Turn QPDeployError (bad input) into ``error: <one line>`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
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
    model: str = typer.Argument("tiny-sd1", help="Local diffusers directory, single-file .safetensors checkpoint, "
                                                 "or a bundled model name (tiny-sd1, tiny-sd2, tiny-sdxl, miniworld)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory of the quantized base to write."),
    weight_bits: int = typer.Option(8, help="Weight bits: 8 or 4 (INT4 is stored packed two per byte)."),
    act_bits: str = typer.Option("8", help="Activation bits: 8, or 'none' for weight-only quantization."),
    act_scales: str = typer.Option("global", help="Activation scales: 'global' or 'per-interval'."),
    intervals: int = typer.Option(4, help="Number of uniform timestep intervals (per-interval scales and report)."),
    boundaries: Optional[str] = typer.Option(None, help="Explicit interval boundaries, e.g. 0,300,600,1000."),
    skip: Optional[list[str]] = typer.Option(None, help="Regex of module names kept in floating point "
                                                        "(repeatable; replaces the default skip list)."),
    no_skip: bool = typer.Option(False, "--no-skip", help="Quantize every Conv2d/Linear (empty skip list)."),
    shortcut_split: bool = typer.Option(True, help="Quantize the two halves of skip-connection inputs separately."),
    calib_method: str = typer.Option("lp", help="Clipping search for weights and activations: 'lp' or 'minmax'."),
    calib_prompts: Optional[Path] = typer.Option(None, help="File with one calibration prompt per line."),
    calib_steps: int = typer.Option(20, help="DDIM steps of each full-precision calibration trajectory."),
    calib_samples: int = typer.Option(64, help="UNet calls used for calibration, spread over the schedule."),
    resolution: Optional[int] = typer.Option(None, help="Image size of calibration trajectories (default: model's)."),
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
        boundaries=None if boundaries is None else tuple(int(b) for b in _split_ints(boundaries)),
        skip=() if no_skip else tuple(skip) if skip else DEFAULT_SKIP,
        shortcut_split=shortcut_split,
        weight_search=calib_method,
        act_search=calib_method,
        calib_prompts=None if calib_prompts is None else tuple(read_prompt_file(calib_prompts)),
        calib_steps=calib_steps,
        calib_samples=calib_samples,
        resolution=resolution,
        seed=seed,
    )
    from .ptq import quantize_model

    path, report = quantize_model(model, out, cfg, config_dir=config, device=device, force=force,
                                  show_progress=sys.stderr.isatty())
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
    table.add_row("seconds", f"{report['seconds']:.1f}")
    Console().print(table)


if __name__ == "__main__":  # pragma: no cover
    app()
