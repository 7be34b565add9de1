"""Gate 1 of the miniworld yardstick, measured on a shipped (or any) model and evaluator.

    python -m benchmarks.miniworld.reach [--pipeline DIR] [--evaluator DIR] \
        [--out benchmarks/results/miniworld_reachability.json]

Thresholds (issue "Miniworld v2"): every bundled subject recognised after the VAE round trip
with probability >= 0.95; nearest-neighbour identification of eight subjects the evaluator
never saw >= 95%; decoys taken for a subject <= 2%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qpdeploy.io import write_file_atomic, write_json
from qpdeploy.miniworld.subjects import SUBJECTS, UNSEEN_SUBJECTS

from .common import ASSETS_DIR, Clock, setup

THRESHOLDS = {"reachability_min": 0.95, "instance_identification_min": 0.95, "decoy_rate_max": 0.02}

def measure(vae, evaluator, per_background: int = 8, seed: int = 0) -> dict:
    """The three figures of gate 1 and the verdict."""
    from qpdeploy.miniworld.reachability import decoy_rate, instance_identification, reachability

    reach = reachability(vae, evaluator, SUBJECTS, per_background, seed)
    ident = instance_identification(vae, evaluator, UNSEEN_SUBJECTS, per_background=per_background // 2, seed=seed)
    decoys = decoy_rate(vae, evaluator, n=32 * per_background, seed=seed)
    passed = (min(reach.values()) >= THRESHOLDS["reachability_min"]
              and ident["accuracy"] >= THRESHOLDS["instance_identification_min"]
              and decoys <= THRESHOLDS["decoy_rate_max"])
    return {"reachability": reach, "instance_identification": ident, "decoy_rate": decoys,
            "thresholds": THRESHOLDS, "passed": bool(passed), "per_background": per_background, "seed": seed}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, default=ASSETS_DIR / "pipeline")
    parser.add_argument("--evaluator", type=Path, default=None, help="default: the bundled evaluator")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/miniworld_reachability.json"))
    parser.add_argument("--per-background", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup(args.threads, 0)
    from diffusers import AutoencoderKL

    from qpdeploy.miniworld.evaluator import load_evaluator

    clock = Clock()
    vae = AutoencoderKL.from_pretrained(args.pipeline / "vae", local_files_only=True).eval()
    result = measure(vae, load_evaluator(args.evaluator), args.per_background)
    evaluator = None if args.evaluator is None else os.path.relpath(args.evaluator)
    result.update(pipeline=os.path.relpath(args.pipeline), evaluator=evaluator, wall_seconds=round(clock.seconds(), 1),
                  command="python -m benchmarks.miniworld.reach " + " ".join(sys.argv[1:] if argv is None else argv))
    write_file_atomic(args.out, lambda tmp: write_json(tmp, result))
    print(json.dumps({k: result[k] for k in ("reachability", "decoy_rate", "passed")}),
          f"identification {result['instance_identification']['accuracy']:.3f}")


if __name__ == "__main__":
    main()
