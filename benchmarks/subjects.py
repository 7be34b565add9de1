"""Many subjects, one INT8 model: memory, bytes, batching throughput, selection cost, training.

    python -m benchmarks.subjects --work runs/subjects --out benchmarks/results/subjects.json \\
        [--threads 2] [--steps 10] [--rounds 2] [--train-steps 8]

On the mid-size synthetic UNet of ``benchmarks/runtime.py`` (about 70M parameters, random
weights: speed and memory do not depend on the values), with synthetic S2 packs (every set
perturbed, as training would leave it). Every ratio is measured side by side in one run:

- ``memory``: resident set size of a multi-subject deploy dir's UNet with N = 1, 8 and 64
  subjects, each in a fresh process (after loading, after one call per interval); goal
  N = 64 <= 1.2x N = 1.
- ``bytes``: deploy bytes per added subject (the tables file's growth) against the pack's own
  scale bytes; goal <= pack + 10%. The 8- and 64-subject deploy dirs are made with
  ``add-subject`` from the 1-subject one, and the UNet graph and weights are checked unchanged.
- ``selection``: UNet ms per call (batch 2) of the multi-subject graph (64 subjects, tables
  fed) against the per-interval graph of the same pack, calls alternating; goal <= 3% slower.
- ``throughput``: 8 requests of 8 different subjects through the step batcher (one UNet call
  per step for all) against the same 8 requests one after another; images per minute both
  ways, rounds alternating; goal >= 1.3x here.
- ``training``: 4 subjects in one ``qpdeploy train --subjects`` run against 4 separate runs,
  each a fresh process: wall time, the training loop's peak resident memory (from each pack's
  report) and the whole process's (``wait4``); goals <= 1.2x the peak of one run, and wall
  time <= the sum of the separate runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIZES = (1, 8, 64)


def synthetic(work: Path, size: int):
    """The mid-size synthetic base (built once into ``work/base``) and its pipeline."""
    from benchmarks.runtime import synthetic_pipeline
    from qpdeploy.base import load_base, save_base
    from qpdeploy.ptq import base_from_pipeline

    from qpdeploy.base import QuantizedBase

    pipe, config = synthetic_pipeline(size)
    if not (work / "base" / "quant_config.json").is_file():
        base = base_from_pipeline(pipe, config)
        # everything but the UNet is the bundled tiny-sd1's (what the source hash covers), so
        # `qpdeploy train` can load the text encoder and VAE from there
        named = QuantizedBase(base.unet, base.config, base.intervals,
                              {**base.meta, "source": {"kind": "bundled", "name": "tiny-sd1"}})
        save_base(work / "base", named, base.meta["report"])
    return load_base(work / "base"), pipe


def make_packs(base, n: int) -> list:
    """``n`` synthetic S2 packs named ``s00``, ``s01``... (each its own perturbation)."""
    from benchmarks.runtime import perturbed_pack

    return [dataclasses.replace(perturbed_pack(base, seed=i), meta={"identifier": f"s{i:02d}",
                                                                  "prompt": f"a photo of s{i:02d} dog"})
            for i in range(n)]


def deploy_dirs(work: Path, base, pipe, packs, size: int) -> dict:
    """Multi-subject deploy dirs of 1, 8 and 64 subjects (the larger ones by add-subject) and
    the per-interval deploy dir of the first pack. Returns paths and the byte figures."""
    import copy

    from qpdeploy.exporters.config import ExportConfig
    from qpdeploy.exporters.export import export_deploy, export_subjects
    from qpdeploy.exporters.subjects import add_subject
    from qpdeploy.io import file_sha256
    from qpdeploy.pack import save_pack

    config = ExportConfig(height=size, width=size, verify=False)
    dirs = {"per-interval": work / "per-interval"}
    for path in [work / f"subjects-{n}" for n in SIZES] + [dirs["per-interval"]]:
        shutil.rmtree(path, ignore_errors=True)
    export_deploy(copy.deepcopy(base), pipe, dirs["per-interval"], dataclasses.replace(config, layout="per-interval"),
                  packs[0])
    first = work / f"subjects-{SIZES[0]}"
    export_subjects(copy.deepcopy(base), pipe, first, config, [(packs[0], "s00")])
    dirs[SIZES[0]] = first
    pack_dirs = [save_pack(work / "packs" / f"s{i:02d}", p, force=True) for i, p in enumerate(packs)]
    graph = {name: file_sha256(first / name) for name in ("unet.onnx", "unet.weights")}
    previous, have = first, SIZES[0]
    for n in SIZES[1:]:
        path = work / f"subjects-{n}"
        shutil.copytree(previous, path)
        for pack_dir in pack_dirs[have:n]:
            add_subject(path, pack_dir)
        dirs[n], previous, have = path, path, n
    unchanged = all(file_sha256(dirs[n] / name) == digest for n in SIZES for name, digest in graph.items())
    tables = {n: _tables_bytes(dirs[n]) for n in SIZES}
    per_subject = (tables[SIZES[-1]] - tables[SIZES[0]]) / (SIZES[-1] - SIZES[0])
    pack_bytes = (pack_dirs[0] / "scales.safetensors").stat().st_size
    return dirs, {"tables_file_bytes": {str(n): tables[n] for n in SIZES},
                  "deploy_bytes": {str(n): _dir_bytes(dirs[n]) for n in SIZES},
                  "bytes_per_added_subject": per_subject, "pack_scale_bytes": pack_bytes,
                  "per_subject_over_pack": per_subject / pack_bytes, "goal_max_ratio": 1.1,
                  "graph_and_weights_unchanged_by_add_subject": unchanged}


def _tables_bytes(deploy: Path) -> int:
    manifest = json.loads((deploy / "manifest.json").read_text())
    return (deploy / manifest["unet"]["tables"]["file"]).stat().st_size


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------
# Resident memory, each deploy dir in a fresh process
# ------------------------------------------------------------------------------------

def memory_child(deploy: Path, threads: int) -> dict:
    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.memory import rss_bytes as rss
    from qpdeploy.runtimes import EngineUNet

    manifest = read_manifest(deploy)
    specs = {s["name"]: [2 if d == "batch" else d for d in s["shape"]] for s in manifest.unet_inputs}
    baseline = rss()
    unet = EngineUNet.from_deploy(deploy, subject="s00", threads=threads)
    loaded = rss()
    sample, hidden = torch.randn(specs["sample"]), torch.randn(specs["encoder_hidden_states"])
    for k in range(manifest.intervals.k):
        lo, hi = manifest.intervals.bounds(k)
        unet(sample, (lo + hi) // 2, hidden)
    result = {"after_load_bytes": loaded - baseline, "after_calls_bytes": rss() - baseline}
    unet.close()
    return result


def memory(dirs: dict, threads: int) -> dict:
    rows = {}
    for n in SIZES:
        command = [sys.executable, "-m", "benchmarks.subjects", "--child-memory", str(dirs[n]), str(threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[str(n)] = json.loads(out.strip().splitlines()[-1])
    one, most = rows[str(SIZES[0])]["after_calls_bytes"], rows[str(SIZES[-1])]["after_calls_bytes"]
    return {"subjects": rows, f"ratio_{SIZES[-1]}_vs_{SIZES[0]}": most / one, "goal_max_ratio": 1.2}


# ------------------------------------------------------------------------------------
# Selection cost and batching throughput
# ------------------------------------------------------------------------------------

def random_unet_inputs(deploy: Path, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``sample`` and ``encoder_hidden_states`` of the deploy dir's UNet at ``batch``."""
    from qpdeploy.exporters.manifest import read_manifest

    specs = {s["name"]: [batch if d == "batch" else d for d in s["shape"]] for s in read_manifest(deploy).unet_inputs}
    return torch.randn(specs["sample"], generator=gen), torch.randn(specs["encoder_hidden_states"], generator=gen)


def selection(dirs: dict, threads: int, repeats: int) -> dict:
    """Median ms per UNet call: per-interval graph vs multi-subject graph (64 subjects)."""
    from qpdeploy.runtimes import EngineUNet

    sample, hidden = random_unet_inputs(dirs["per-interval"], 2, torch.Generator().manual_seed(0))
    units = {"per-interval": EngineUNet.from_deploy(dirs["per-interval"], threads=threads),
             "multi-subject": EngineUNet.from_deploy(dirs[SIZES[-1]], subject="s00", threads=threads)}
    times = {name: [] for name in units}
    try:
        for unet in units.values():
            unet(sample, 500, hidden)  # warm-up
        for r in range(repeats):
            for name, unet in units.items():
                t = 100 + (r * 250) % 900  # every interval in turn
                start = time.perf_counter()
                unet(sample, t, hidden)
                times[name].append(time.perf_counter() - start)
    finally:
        for unet in units.values():
            unet.close()
    from qpdeploy.miniworld.stats import bootstrap_mean

    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    # each multi-subject call against the per-interval call just before it (same interval, same load)
    paired = [m / p - 1 for m, p in zip(times["multi-subject"], times["per-interval"])]
    return {"unet_ms_per_call_median": ms, "calls": repeats, "slowdown_median": ms["multi-subject"] / ms["per-interval"] - 1,
            "slowdown_paired": bootstrap_mean([paired]), "goal_max_slowdown": 0.03}


def batch_ceiling(dirs: dict, threads: int, repeats: int) -> dict:
    """The most any step batcher can gain here: one UNet call of batch 16 (8 requests with
    classifier-free guidance) against 8 calls of batch 2, on the 8-subject graph."""
    from qpdeploy.miniworld.stats import bootstrap_mean
    from qpdeploy.runtimes import EngineUNet

    gen = torch.Generator().manual_seed(0)
    small, large = random_unet_inputs(dirs[8], 2, gen), random_unet_inputs(dirs[8], 16, gen)
    unet = EngineUNet.from_deploy(dirs[8], subject="s00", threads=threads)
    ratios, seconds = [], {"batch_2_x8": [], "batch_16": []}
    try:
        unet(large[0], 500, large[1])  # warm-up, both shapes
        unet(small[0], 500, small[1])
        for r in range(repeats):
            t = 100 + (r * 250) % 900
            start = time.perf_counter()
            for _ in range(8):
                unet(small[0], t, small[1])
            middle = time.perf_counter()
            unet(large[0], t, large[1])
            end = time.perf_counter()
            seconds["batch_2_x8"].append(middle - start)
            seconds["batch_16"].append(end - middle)
            ratios.append((middle - start) / (end - middle))
    finally:
        unet.close()
    return {"ms_median": {k: 1000 * statistics.median(v) for k, v in seconds.items()}, "repeats": repeats,
            "speedup": bootstrap_mean([ratios])}


def throughput(dirs: dict, threads: int, steps: int, rounds: int) -> dict:
    """8 requests of 8 subjects: the step batcher with all at once vs one at a time."""
    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.runtimes.batcher import Request, StepBatcher
    from qpdeploy.runtimes.config import RuntimeConfig
    from qpdeploy.runtimes.pipeline import close_pipeline, load_deploy_pipeline

    pipe = load_deploy_pipeline(read_manifest(dirs[8]), RuntimeConfig(threads=threads))
    requests = [Request(f"a photo of s{i:02d} dog", f"s{i:02d}", seed=i, steps=steps, guidance=4.0) for i in range(8)]
    seconds = {"batched": [], "one_at_a_time": []}
    try:
        StepBatcher(pipe, 8).run(requests[:2])  # warm-up
        for _ in range(rounds):
            for name, width in (("batched", 8), ("one_at_a_time", 1)):
                start = time.perf_counter()
                StepBatcher(pipe, width).run(requests)
                seconds[name].append(time.perf_counter() - start)
    finally:
        close_pipeline(pipe)
    from qpdeploy.miniworld.stats import bootstrap_mean

    per_minute = {name: 60 * len(requests) / statistics.median(v) for name, v in seconds.items()}
    ratios = [a / b for a, b in zip(seconds["one_at_a_time"], seconds["batched"])]  # round by round
    return {"requests": len(requests), "steps": steps, "rounds": rounds, "images_per_minute": per_minute,
            "speedup": per_minute["batched"] / per_minute["one_at_a_time"],
            "speedup_per_round": bootstrap_mean([ratios]), "goal_min_speedup": 1.3,
            "tensorrt_note": ("not measured here (no GPU); on a GPU the UNet call of batch 2 leaves most of the "
                              "device idle, so batching 8 requests (batch 16) is expected to gain more than on "
                              "2 CPU cores, until the batch saturates the GPU")}


# ------------------------------------------------------------------------------------
# Training 4 subjects together vs apart
# ------------------------------------------------------------------------------------

def training(work: Path, steps: int, threads: int) -> dict:
    from PIL import Image

    folder = work / "train"
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        images = folder / "photos" / f"s{i:02d}"
        images.mkdir(parents=True)
        for j in range(3):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(images / f"{j}.png")
        lines.append(f'[[subject]]\nidentifier = "s{i:02d}"\nimages = "photos/s{i:02d}"\n'
                     f'prompt = "a photo of s{i:02d} dog"\n')
    (folder / "subjects.toml").write_text("".join(lines))
    common = ["--base", str(work / "base"), "--steps", str(steps), "--device", "cpu", "--strategy", "s2"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    together = _measured([sys.executable, "-m", "qpdeploy.cli", "train", *common, "--subjects",
                          str(folder / "subjects.toml"), "--out", str(folder / "together")], env)
    apart = [_measured([sys.executable, "-m", "qpdeploy.cli", "train", *common, "--images",
                        str(folder / "photos" / f"s{i:02d}"), "--prompt", f"a photo of s{i:02d} dog",
                        "--identifier", f"s{i:02d}", "--out", str(folder / f"apart-s{i:02d}")], env)
             for i in range(4)]
    same = all((folder / "together" / f"s{i:02d}" / "scales.safetensors").read_bytes()
               == (folder / f"apart-s{i:02d}" / "scales.safetensors").read_bytes() for i in range(4))
    # the training loop's own peak (its report: resident high-water mark reset after setup);
    # the whole process's peak is reached while loading, the same for every run
    together["loop_peak_bytes"] = json.loads((folder / "together" / "s00" / "report.json").read_text())[
        "peak_memory_bytes"]
    for i, run in enumerate(apart):
        run["loop_peak_bytes"] = json.loads((folder / f"apart-s{i:02d}" / "report.json").read_text())[
            "peak_memory_bytes"]
    return {"subjects": 4, "steps": steps, "together": together, "apart": apart,
            "wall_together_over_sum_apart": together["seconds"] / sum(r["seconds"] for r in apart),
            "loop_peak_together_over_one_run": together["loop_peak_bytes"] / max(r["loop_peak_bytes"] for r in apart),
            "process_peak_together_over_one_run": together["peak_rss_bytes"] / max(r["peak_rss_bytes"] for r in apart),
            "goals": {"peak_max_ratio": 1.2, "wall_max_ratio": 1.0},
            "packs_bit_identical_to_separate_runs": same}


def _measured(command: list[str], env: dict) -> dict:
    """Run a command in a child process; its wall seconds and peak resident bytes (wait4)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {child.stderr.read().decode()[-2000:]}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child-memory"]:
        torch.set_num_threads(int(argv[2]))
        print(json.dumps(memory_child(Path(argv[1]), int(argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/subjects"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/subjects.json"))
    parser.add_argument("--size", type=int, default=32, help="image size of the synthetic model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per request (throughput)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of the throughput comparison")
    parser.add_argument("--repeats", type=int, default=20, help="timed UNet calls per graph (selection)")
    parser.add_argument("--train-steps", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qpdeploy.io import write_file_atomic, write_json

    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base, pipe = synthetic(args.work, args.size)
    packs = make_packs(base, SIZES[-1])
    dirs, byte_figures = deploy_dirs(args.work, base, pipe, packs, args.size)
    report = {"command": "python -m benchmarks.subjects " + " ".join(argv), "threads": args.threads,
              "bytes": byte_figures, "memory": memory(dirs, args.threads),
              "selection": selection(dirs, args.threads, args.repeats),
              "throughput": throughput(dirs, args.threads, args.steps, args.rounds),
              "batch_ceiling": batch_ceiling(dirs, args.threads, args.repeats),
              "training": training(args.work, args.train_steps, args.threads)}
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_file_atomic(args.out, lambda tmp: write_json(tmp, report))
    print(json.dumps({k: v for k, v in report.items() if k != "training"}, indent=1))
    t = report["training"]
    print(f"training: wall together/sum apart {t['wall_together_over_sum_apart']:.2f}, loop peak together/one "
          f"{t['loop_peak_together_over_one_run']:.2f}, packs identical {t['packs_bit_identical_to_separate_runs']}")


if __name__ == "__main__":
    main()
