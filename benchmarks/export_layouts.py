"""Export layouts side by side: graphs, deploy bytes (shared against unshared weights) and the
smallest SQNR of ONNX Runtime against the PyTorch quantized model over the intervals.

On the bundled miniworld model (or any MODEL): one W8A8 base with K = 4 intervals, and a
short-trained pack of each strategy (``--steps``, on a bundled subject's instance images),
exported in every layout that fits the strategy:

    python benchmarks/export_layouts.py --out benchmarks/results/export_layouts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from qpdeploy.config import QuantizeConfig, TrainConfig
from qpdeploy.exporters.config import ExportConfig
from qpdeploy.exporters.export import export_from_paths
from qpdeploy.miniworld.subjects import get_subject, write_instance_images
from qpdeploy.ptq import quantize_model
from qpdeploy.train import train

CASES = (  # (pack strategy or None, layout)
    ("s2", "per-interval"),
    ("s2", "multi-expert"),
    ("s1", "masked"),
    ("s1", "per-interval"),
    ("baseline", "per-interval"),
    (None, "per-interval"),
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="miniworld")
    parser.add_argument("--steps", type=int, default=50, help="training steps of each pack")
    parser.add_argument("--threads", type=int, default=2)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qpdeploy-export-layouts-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        quantize_model(args.model, base, QuantizeConfig(intervals=4), device="cpu")
        subject = get_subject("sks")
        write_instance_images(subject.identifier, tmp / "images")
        packs = {None: None}
        for strategy in dict.fromkeys(s for s, _ in CASES if s):
            config = TrainConfig(prompt=subject.instance_prompt().text, identifier=subject.identifier,
                                 strategy=strategy, s1_intervals=(0, 1) if strategy == "s1" else (),
                                 steps=args.steps, lr=1e-2, batch_size=4)
            packs[strategy], _ = train(base, tmp / "images", tmp / f"pack-{strategy}", config, device="cpu")
        for strategy, layout in CASES:
            out = tmp / f"deploy-{strategy}-{layout}"
            _, report = export_from_paths(base, packs[strategy], out, ExportConfig(layout=layout))
            rows.append({"strategy": strategy or "none (post-training)", "layout": layout, **{
                k: report[k] for k in ("graphs", "qdq_layers", "deploy_bytes", "deploy_bytes_if_unshared",
                                       "min_sqnr_db_vs_torch", "sqnr_db_per_interval", "unet_weights_bytes")}})
            r = rows[-1]
            print(f"{r['strategy']:>22s} {layout:13s} graphs {r['graphs']}  {r['deploy_bytes'] / 2**20:7.2f} MiB "
                  f"(unshared {r['deploy_bytes_if_unshared'] / 2**20:7.2f})  min SQNR {r['min_sqnr_db_vs_torch']:.1f} dB",
                  flush=True)
    report = {"command": " ".join(["python benchmarks/export_layouts.py", *argv]), "model": args.model,
              "rows": rows, "seconds": time.perf_counter() - start, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"report -> {args.out}")


if __name__ == "__main__":
    main()
