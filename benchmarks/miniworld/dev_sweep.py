"""Choose the benchmark's DreamBooth recipe on ``dev`` prompts (never ``test``): gate 2 per setting.

    python -m benchmarks.miniworld.dev_sweep --grid "dreambooth-lr=1e-4,3e-4,1e-3" "prior-images=0,32" \
        [--seeds 0] [--jobs 2] [--out benchmarks/results/miniworld_dreambooth_dev_sweep.json]

Every combination of the grid runs the learnability rows (``fp``, ``fp_dreambooth``) of
``benchmarks/fidelity.py`` on the dev split of every bundled subject, in ``--jobs`` processes
(one torch thread each), and gets gate 2's verdict (:func:`benchmarks.miniworld.learnability.verdict`).
The chosen setting passes every check with the highest test-background recognition; the gate
itself is then measured on ``test`` with it (``benchmarks.miniworld.learnability``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qpdeploy.io import write_file_atomic, write_json

from .learnability import verdict


def combinations(grid: list[str]) -> list[dict[str, str]]:
    """``["a=1,2", "b=x"]`` -> ``[{"a": "1", "b": "x"}, {"a": "2", "b": "x"}]``."""
    axes = []
    for item in grid:
        name, _, values = item.partition("=")
        if not values:
            raise SystemExit(f"error: grid item {item!r} is not name=v1,v2")
        axes.append([(name, v) for v in values.split(",")])
    return [dict(c) for c in itertools.product(*axes)]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", nargs="+", required=True, help="fidelity.py options, name=v1,v2 each")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/miniworld_dreambooth_dev_sweep.json"))
    args = parser.parse_args(argv)
    settings = combinations(args.grid)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qpdeploy-sweep-") as tmp:
        commands = []
        for i, setting in enumerate(settings):
            options = [x for k, v in setting.items() for x in (f"--{k}", v)]
            commands.append([sys.executable, "benchmarks/fidelity.py", "--rows", "fp,fp_dreambooth", "--split", "dev",
                             "--seeds", args.seeds, "--threads", "1", *options, "--out", f"{tmp}/{i}.json"])
        running: list[subprocess.Popen] = []
        for command in commands:
            while sum(p.poll() is None for p in running) >= args.jobs:
                time.sleep(1)
            running.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        failed = [p.args for p in running if p.wait() != 0]
        if failed:
            raise SystemExit(f"error: {len(failed)} sweep run(s) failed, e.g. {' '.join(map(str, failed[0]))}")
        results = []
        for i, setting in enumerate(settings):
            runs = json.loads(Path(f"{tmp}/{i}.json").read_text(encoding="utf-8"))["runs"]
            v = verdict(runs)
            db = v["table"]["fp_dreambooth"]
            results.append({"setting": setting, "checks": v["checks"], "passed": v["passed"],
                            "preservation_drop": v["preservation_drop"],
                            **{k: db[k] for k in ("instance_prompt_recognised", "subject_recognised", "prompt_fidelity",
                                                  "preservation")}})
    passing = [r for r in results if r["passed"]] or results
    chosen = max(passing, key=lambda r: r["subject_recognised"]["mean"])
    report = {"command": "python -m benchmarks.miniworld.dev_sweep " + " ".join(argv), "split": "dev",
              "results": results, "chosen": chosen["setting"], "any_passed": any(r["passed"] for r in results),
              "seconds": round(time.perf_counter() - start, 1)}
    write_file_atomic(args.out, lambda t: write_json(t, report))
    for r in results:
        print(f"{r['setting']}: {'pass' if r['passed'] else 'fail'} instance {r['instance_prompt_recognised']['mean']:.2f} "
              f"test-bg {r['subject_recognised']['mean']:.2f} prompt {r['prompt_fidelity']['mean']:.2f} "
              f"drop {r['preservation_drop']['mean']:.2f}")
    print(f"chosen: {chosen['setting']} -> {args.out}")


if __name__ == "__main__":
    main()
