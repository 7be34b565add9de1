"""Gate 2 of the miniworld yardstick: full-precision DreamBooth can learn every subject.

    python -m benchmarks.miniworld.learnability [--seeds 0,1] [--split test] \
        [--out benchmarks/results/miniworld_learnability.json] [--report ASSETS]

Runs the fidelity benchmark's ``fp`` and ``fp_dreambooth`` rows (``benchmarks/fidelity.py``,
same recipe and evaluation) on every bundled subject and seed and checks, on the pooled
cells (mean with a 95% bootstrap interval over images and runs):

- DreamBooth recognises the subject (instance embedding) in >= 70% of instance-prompt images
  and >= 50% of test-background images,
- at prompt fidelity >= 0.8,
- and class-prompt preservation at most 10 points below the unpersonalized model's (paired:
  both draw the same class prompts from the same noise).

Settings such as the learning rate are chosen with ``--split dev``; the gate is reported on
``test``. Extra arguments after ``--`` go to the fidelity benchmark (``--steps``, ``--dreambooth-lr``,
``--prior-images``...).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qpdeploy.io import write_file_atomic, write_json
from qpdeploy.miniworld.stats import bootstrap_mean
from qpdeploy.miniworld.subjects import SUBJECTS

from .common import update_report

THRESHOLDS = {"instance_prompt_recognised_min": 0.7, "test_recognised_min": 0.5, "prompt_fidelity_min": 0.8,
              "preservation_drop_max": 0.10}


def verdict(runs: list[dict]) -> dict:
    """Gate 2's cells and verdict from the fidelity benchmark's runs of rows fp and fp_dreambooth."""
    import benchmarks.fidelity as fidelity

    table = fidelity.summarize(runs)
    db = table["fp_dreambooth"]
    pairs = {(r["subject"], r["seed"]): r for r in runs if r["row"] == "fp"}
    drops = [np.subtract(pairs[r["subject"], r["seed"]]["per_image"]["preservation"], r["per_image"]["preservation"])
             for r in runs if r["row"] == "fp_dreambooth"]
    drop = bootstrap_mean(drops)
    per_subject = {
        s: {column: bootstrap_mean([r["per_image"][column] for r in runs if r["row"] == "fp_dreambooth" and r["subject"] == s])
            for column in ("instance_prompt_recognised", "subject_recognised", "prompt_fidelity")}
        for s in dict.fromkeys(r["subject"] for r in runs)
    }
    checks = {
        "instance_prompt_recognised": db["instance_prompt_recognised"]["mean"] >= THRESHOLDS["instance_prompt_recognised_min"],
        "test_recognised": db["subject_recognised"]["mean"] >= THRESHOLDS["test_recognised_min"],
        "prompt_fidelity": db["prompt_fidelity"]["mean"] >= THRESHOLDS["prompt_fidelity_min"],
        "preservation_drop": drop["mean"] <= THRESHOLDS["preservation_drop_max"],
    }
    return {"table": table, "preservation_drop": drop, "per_subject": per_subject, "checks": checks,
            "thresholds": THRESHOLDS, "passed": all(checks.values())}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--subjects", default=",".join(SUBJECTS))
    parser.add_argument("--split", choices=("dev", "test"), default="test")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/miniworld_learnability.json"))
    parser.add_argument("--report", type=Path, default=None,
                        help="an assets folder whose report.json gets the 'learnability' section (test split only)")
    args = parser.parse_args(own)
    import benchmarks.fidelity as fidelity

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qpdeploy-learnability-") as tmp:
        runs_file = Path(tmp) / "runs.json"
        fidelity.main(["--rows", "fp,fp_dreambooth", "--subjects", args.subjects, "--seeds", args.seeds,
                       "--split", args.split, "--out", str(runs_file), *extra])
        bench = json.loads(runs_file.read_text(encoding="utf-8"))
    result = verdict(bench["runs"])
    result.update(split=args.split, settings=bench["settings"], runs=bench["runs"],
                  seconds=round(time.perf_counter() - start, 1),
                  command="python -m benchmarks.miniworld.learnability " + " ".join(argv))
    write_file_atomic(args.out, lambda t: write_json(t, result))
    if args.report is not None:
        if args.split != "test":
            raise SystemExit("error: only a test-split measurement goes into the model's report")
        update_report(args.report, "learnability", {k: v for k, v in result.items() if k != "runs"})
    db = result["table"]["fp_dreambooth"]
    print(f"gate 2 {'passed' if result['passed'] else 'FAILED'} ({args.split}): "
          + ", ".join(f"{k} {db[c]['mean']:.3f} [{db[c]['low']:.3f}, {db[c]['high']:.3f}]" for k, c in
                      (("instance prompt", "instance_prompt_recognised"), ("test backgrounds", "subject_recognised"),
                       ("prompt fidelity", "prompt_fidelity")))
          + f", preservation drop {result['preservation_drop']['mean']:.3f}")


if __name__ == "__main__":
    main()
