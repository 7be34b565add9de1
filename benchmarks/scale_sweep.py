"""Choose scale training's settings on ``dev`` prompts: a grid over ``benchmarks/fidelity.py``
options, resumable; with ``--split test``, the same runner measures the reported table.

    python -m benchmarks.scale_sweep --rows baseline,s2_k2 --grid "lr=1e-2,3e-2,1e-1" "steps=400" \
        --work /tmp/sweep --out sweep.json [--seeds 0] [--jobs 2]
    python -m benchmarks.scale_sweep --collect a.json b.json --out all.json
    python -m benchmarks.scale_sweep ... --reuse benchmarks/results/fidelity_v4_test.json
    python -m benchmarks.scale_sweep --paired s2_k2+in baseline+in --collect all.json --out paired.json

Every (setting, subject, seed) is one ``fidelity.py`` process (one torch thread; ``--jobs``
at a time) whose report is kept in ``--work``: an interrupted sweep run again with the same
``--work`` runs only what is missing. ``--reuse`` first files the runs of earlier reports (a
sweep report, or a ``--collect`` of them) into ``--work``, so that a fresh machine extends a
published table (another seed, another subject) without redoing what it holds. Quantized
bases are made once, in ``--work``, and shared. The report gives, per setting and row, subject recognition on the split's
backgrounds, prompt fidelity, the instance prompt and preservation (mean and 95% bootstrap
interval over images and runs), training seconds and peak memory, and every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from qpdeploy.io import write_file_atomic, write_json
from qpdeploy.miniworld.subjects import SUBJECTS

from .fidelity import SCALE_ROWS, parse_row, quantize_base, split_sampling, summarize
from .miniworld.dev_sweep import combinations

SHOWN = ("subject_recognised", "prompt_fidelity", "instance_prompt_recognised", "preservation", "background_match",
         "shape_match", "backdrop_drawn")


def job_name(rows: str, setting: dict[str, str], subject: str, seed: str, split: str = "dev") -> str:
    """A stable file name for one (rows, setting, subject, seed, split) run."""
    key = json.dumps([rows, sorted(setting.items()), subject, seed] + ([split] if split != "dev" else []))
    return f"{subject}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def ensure_bases(rows: list[str], model: str, bases: Path) -> None:
    """Quantize the bases the rows need once, before the jobs share them."""
    names = [parse_row(split_sampling(r)[0])[0] for r in rows]  # <row>+bg<w>@<s>:g<x> needs the row's base
    bits = {SCALE_ROWS[r][0] for r in names if r in SCALE_ROWS} | ({8} if {"w8a8_ptq", "w8a8_lora"} & set(names) else set())
    for b in sorted(bits):
        path = bases / f"base-w{b}a8"
        if not path.is_dir():
            print(f"quantizing the W{b}A8 base -> {path}", flush=True)
            quantize_base(model, path, b)


def reuse(paths: list[Path], runs_dir: Path) -> int:
    """File the runs of earlier sweep reports as kept runs; return how many files were written.

    A run is filed under the job it came from (the report's rows, setting, split, and the
    run's subject and seed); a kept run already there is left as it is.
    """
    written = 0
    for path in paths:
        for sweep in load_sweeps([path]):
            if "runs" not in sweep["results"][0]:
                raise SystemExit(f"error: {path}: a sweep report without its runs cannot be reused")
            rows = ",".join(sweep["rows"])
            for result in sweep["results"]:
                jobs: dict[str, list[dict]] = {}
                for run in result["runs"]:
                    name = job_name(rows, result["setting"], run["subject"], str(run["seed"]), sweep["split"])
                    jobs.setdefault(name, []).append(run)
                for name, runs in jobs.items():
                    target = runs_dir / name
                    if not target.is_file():
                        write_file_atomic(target, lambda t, runs=runs: write_json(t, {"runs": runs}))
                        written += 1
    return written


def runs_of(report: dict, row: str) -> dict[tuple[str, int], dict]:
    """Every run of ``row`` in a sweep report (or a collection of them), by (subject, seed).

    Raises:
        SystemExit: the row has two different runs of one (subject, seed) (say, two settings
            of a grid): which one to pair would be a guess, so the caller passes one setting's
            reports.
    """
    found: dict[tuple[str, int], dict] = {}
    for sweep in report.get("sweeps", [report]):
        for result in sweep["results"]:
            for run in result.get("runs", []):
                if run["row"] != row:
                    continue
                key = (run["subject"], int(run["seed"]))
                if key in found and found[key] != run:
                    raise SystemExit(f"error: row {row} has two different runs of {key[0]} seed {key[1]} (two "
                                     "settings?); pair the reports of one setting")
                found[key] = run
    return found


def paired(report: dict, a: str, b: str) -> dict:
    """Row ``a`` minus row ``b`` over the (subject, seed) runs both have, per column."""
    from qpdeploy.miniworld.stats import bootstrap_paired_difference

    runs_a, runs_b = runs_of(report, a), runs_of(report, b)
    keys = sorted(set(runs_a) & set(runs_b))
    if not keys:
        raise SystemExit(f"error: rows {a} and {b} share no (subject, seed) run")
    columns = [c for c in SHOWN if all(c in runs_a[k]["per_image"] and c in runs_b[k]["per_image"] for k in keys)]
    return {"a": a, "b": b, "runs": [list(k) for k in keys],
            "difference": {c: bootstrap_paired_difference([(runs_a[k]["per_image"][c], runs_b[k]["per_image"][c])
                                                           for k in keys]) for c in columns}}


def load_sweeps(paths: list[Path]) -> list[dict]:
    """The sweep reports in these files; a collection (``--collect``) gives each of its sweeps."""
    reports = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    return [sweep for report in reports for sweep in report.get("sweeps", [report])]


def collect(paths: list[Path], out: Path) -> None:
    """Several sweep reports in one file, each as written (its command, split and results);
    a collection among them contributes its sweeps (so a published file can grow)."""
    sweeps = load_sweeps(paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out, lambda t: write_json(t, {"sweeps": sweeps}))
    print(f"{len(sweeps)} sweeps -> {out}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", type=Path, nargs="+", help="gather these sweep reports into --out and stop")
    parser.add_argument("--paired", nargs=2, metavar=("A", "B"),
                        help="with --collect: row A minus row B over the runs both have (paired bootstrap)")
    parser.add_argument("--rows", default="baseline", help="fidelity.py rows, comma-separated")
    parser.add_argument("--grid", nargs="+", help="fidelity.py options, name=v1,v2 each")
    parser.add_argument("--subjects", default=",".join(SUBJECTS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--split", choices=("dev", "test"), default="dev",
                        help="dev to choose settings; test only to report the chosen ones")
    parser.add_argument("--model", default="miniworld")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--kept-only", action="store_true",
                        help="launch nothing: report the runs already kept (a sweep still under way, or cut short)")
    parser.add_argument("--work", type=Path, help="kept runs (resume) and shared bases")
    parser.add_argument("--reuse", type=Path, nargs="+", default=[],
                        help="earlier sweep reports whose runs count as kept (extend a published table)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.paired:
        if not args.collect:
            parser.error("--paired reads the reports given by --collect")
        result = paired({"sweeps": load_sweeps(args.collect)}, *args.paired)
        write_file_atomic(args.out, lambda t: write_json(t, result))
        for column, d in result["difference"].items():
            print(f"{args.paired[0]} - {args.paired[1]} {column}: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                  f"over {d['pairs']} runs")
        return
    if args.collect:
        return collect(args.collect, args.out)
    if not args.grid or not args.work:
        parser.error("a sweep needs --grid and --work")
    rows = args.rows.split(",")
    settings = combinations(args.grid)
    runs_dir = args.work / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        print(f"{reuse(args.reuse, runs_dir)} kept runs filed from {len(args.reuse)} report(s)", flush=True)
    if not args.kept_only:
        ensure_bases(rows, args.model, args.work / "bases")
    start = time.perf_counter()
    subjects, seeds = args.subjects.split(","), args.seeds.split(",")
    jobs = [(setting, subject, seed) for setting in settings for seed in seeds for subject in subjects]
    todo = []
    for setting, subject, seed in jobs:
        path = runs_dir / job_name(args.rows, setting, subject, seed, args.split)
        if path.is_file():
            continue
        options = [x for k, v in setting.items() for x in (f"--{k}", v)]
        todo.append([sys.executable, "benchmarks/fidelity.py", "--rows", args.rows, "--split", args.split,
                     "--subjects", subject, "--seeds", seed, "--model", args.model, "--threads", "1",
                     "--bases", str(args.work / "bases"), *options, "--out", str(path)])
    print(f"{len(settings)} settings x {len(subjects)} subjects x {len(seeds)} seeds: {len(todo)} runs to do",
          flush=True)
    running: list[subprocess.Popen] = []
    for i, command in enumerate([] if args.kept_only else todo):
        while sum(p.poll() is None for p in running) >= args.jobs:
            time.sleep(2)
        print(f"[{(time.perf_counter() - start) / 60:6.1f} min] run {i + 1}/{len(todo)}: {command[-1]}", flush=True)
        running.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
    failed = [p.args for p in running if p.wait() != 0]
    if failed:
        raise SystemExit(f"error: {len(failed)} sweep run(s) failed, e.g. {' '.join(map(str, failed[0]))}")
    results = []
    for setting in settings:
        runs = []
        for _, subject, seed in [job for job in jobs if job[0] is setting]:
            path = runs_dir / job_name(args.rows, setting, subject, seed, args.split)
            if path.is_file():
                runs += json.loads(path.read_text(encoding="utf-8"))["runs"]
        if not runs:
            continue
        table = summarize(runs)
        results.append({"setting": setting, "table": table, "runs": runs})
    report = {"command": "python -m benchmarks.scale_sweep " + " ".join(argv), "split": args.split,
              "rows": rows, "subjects": subjects, "seeds": seeds, "results": results,
              "missing_runs": len(todo) if args.kept_only else 0,
              "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(args.out, lambda t: write_json(t, report))
    for r in results:
        for row, t in r["table"].items():
            cells = "  ".join(f"{k.split('_')[0]} {t[k]['mean']:.2f} [{t[k]['low']:.2f},{t[k]['high']:.2f}]"
                              for k in SHOWN if k in t)
            print(f"{r['setting']} {row}: {cells}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
