"""SQNR of post-training quantization across model families and settings.

Runs ``quantize_pipeline`` on tiny random SD1-, SD2- and SDXL-like pipelines (or on a
local model with --model) for W8A8 and W4A8, with and without shortcut splitting and
per-interval activation scales, plus min/max calibration and an empty skip list as
ablations, and writes one JSON row per run (SQNR overall and per interval, in dB).

    python benchmarks/quant_sqnr.py --out benchmarks/results/quant_sqnr.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from qpdeploy.config import QuantizeConfig
from qpdeploy.models import load_pipeline
from qpdeploy.ptq import quantize_pipeline

VARIANTS = {
    # name: QuantizeConfig changes on top of the run's defaults
    "searched": {},
    "minmax": {"weight_search": "minmax", "act_search": "minmax"},
    "no-skip": {"skip": ()},
}


def run(model: str, weight_bits: int, split: bool, act_scales: str, variant: str, args) -> dict:
    config = QuantizeConfig(weight_bits=weight_bits, shortcut_split=split, act_scales=act_scales,
                            calib_steps=args.calib_steps, calib_samples=args.calib_samples, seed=args.seed,
                            **VARIANTS[variant])
    pipe = load_pipeline(model)
    start = time.perf_counter()
    _, _, _, report = quantize_pipeline(pipe, config)
    return {
        "model": model,
        "weights": f"W{weight_bits}A8",
        "shortcut_split": split,
        "act_scales": act_scales,
        "variant": variant,
        "sqnr_db": round(report["sqnr_db"], 2),
        "sqnr_db_per_interval": [None if v is None else round(v, 2) for v in report["sqnr_db_per_interval"]],
        "layers_quantized": report["layers_quantized"],
        "layers_skipped": report["layers_skipped"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", action="append", help="model(s) to measure (default: the three tiny families)")
    parser.add_argument("--calib-steps", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.model or ["tiny-sd1", "tiny-sd2", "tiny-sdxl"]
    rows = []
    grid = itertools.product(models, (8, 4), (True, False), ("global", "per-interval"))
    for model, bits, split, act_scales in grid:
        rows.append(run(model, bits, split, act_scales, "searched", args))
        print(json.dumps(rows[-1]), flush=True)
    for model, bits, variant in itertools.product(models, (8, 4), ("minmax", "no-skip")):
        rows.append(run(model, bits, True, "global", variant, args))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"calib_steps": args.calib_steps, "calib_samples": args.calib_samples,
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
