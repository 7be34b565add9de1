"""Serving load test: a multi-subject deploy dir behind tritonserver, driven over HTTP.

    python -m benchmarks.serving --work runs/serving --out benchmarks/results/serving.json \\
        [--threads 2] [--steps 10] [--requests 24]

On the mid-size synthetic UNet of ``benchmarks/runtime.py`` (about 70M parameters, random
weights) with four synthetic S2 subjects in one multi-subject deploy dir, served by the
repository ``qpdeploy triton`` writes (8 pipeline instances) on the ``tritonserver`` of the
nvidia-pytriton wheel:

- ``load``: at concurrency 1, 4 and 8, ``--requests`` requests (random subject and seed of
  8 combinations); throughput (images/min), latency p50/p95 and mean with its 95% bootstrap interval, and the
  UNet model's executions per request (below 1: calls of concurrent requests were batched).
  Every image is checked against the same combination served alone (PSNR >= 40 dB).
- ``restart``: 24 requests at concurrency 8; the server is killed (SIGKILL) once the first
  images are back, and started again on the same ports. Clients see errors, never a wrong or
  mixed image; after the restart every combination is served correctly again.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SUBJECTS = 4
LEVELS = (1, 4, 8)
MIN_PSNR = 40.0


def build(work: Path, size: int) -> Path:
    """The multi-subject deploy dir of the synthetic base and four packs (built once)."""
    import copy

    from benchmarks.subjects import make_packs, synthetic
    from qpdeploy.exporters.config import ExportConfig
    from qpdeploy.exporters.export import export_subjects

    deploy = work / "deploy"
    if not (deploy / "manifest.json").is_file():
        base, pipe = synthetic(work, size)
        packs = make_packs(base, SUBJECTS)
        export_subjects(copy.deepcopy(base), pipe, deploy, ExportConfig(height=size, width=size, verify=False),
                        [(p, p.meta["identifier"]) for p in packs])
    return deploy


def request(url: str, subject: str, seed: int, steps: int):
    """One pipeline request: ``(image, record, seconds)``."""
    import tritonclient.http as http

    client = http.InferenceServerClient(url, connection_timeout=600, network_timeout=600)
    values = [("prompt", f"a photo of {subject} dog".encode(), "BYTES", np.object_),
              ("subject", subject.encode(), "BYTES", np.object_), ("seed", seed, "INT64", np.int64),
              ("steps", steps, "INT32", np.int32), ("guidance", 7.5, "FP32", np.float32)]
    inputs = []
    for name, value, kind, dtype in values:
        tensor = http.InferInput(name, [1], kind)
        tensor.set_data_from_numpy(np.asarray([value], dtype=dtype))
        inputs.append(tensor)
    start = time.perf_counter()
    result = client.infer("pipeline", inputs)
    seconds = time.perf_counter() - start
    return result.as_numpy("image"), json.loads(result.as_numpy("record")[0]), seconds


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def load_level(server, combos, reference, concurrency: int, n: int, steps: int, seed: int) -> dict:
    from qpdeploy.miniworld.stats import bootstrap_mean

    rng = random.Random(seed)
    order = [combos[rng.randrange(len(combos))] for _ in range(n)]
    before = server.model_stats("unet")
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda c: request(server.url, c[0], c[1], steps), order))
    wall = time.perf_counter() - start
    after = server.model_stats("unet")
    latencies = sorted(r[2] for r in results)
    worst = min(psnr(img, reference[c]) for c, (img, _, _) in zip(order, results))
    executions = after["execution_count"] - before["execution_count"]
    calls = after["requests"] - before["requests"]
    return {"concurrency": concurrency, "requests": n, "wall_seconds": wall, "images_per_minute": 60 * n / wall,
            "latency_p50": float(np.percentile(latencies, 50)), "latency_p95": float(np.percentile(latencies, 95)),
            "latency_seconds": bootstrap_mean([latencies]), "unet_requests": calls, "unet_executions": executions,
            "unet_executions_per_request": executions / calls, "worst_psnr_db_vs_alone": worst,
            "all_images_correct": worst >= MIN_PSNR}


def restart(server, combos, reference, steps: int) -> dict:
    """Kill the server mid-load and start it again on the same ports."""
    order = [combos[i % len(combos)] for i in range(24)]
    outcomes: list = [None] * len(order)
    first_done = threading.Event()

    def one(i: int):
        try:
            img, record, _ = request(server.url, *order[i], steps)
            outcomes[i] = ("ok", psnr(img, reference[order[i]]), record["subject"] == order[i][0])
            first_done.set()
        except Exception as exc:  # a connection reset or a server error: what a client must see
            outcomes[i] = ("error", type(exc).__name__, None)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(len(order))]
        first_done.wait(600)
        back = sum(o is not None and o[0] == "ok" for o in outcomes)
        server.kill()
        for f in futures:
            f.result()
    served = [o for o in outcomes if o[0] == "ok"]
    errors = [o for o in outcomes if o[0] == "error"]
    start = time.perf_counter()
    server.start()
    restart_seconds = time.perf_counter() - start
    after = [request(server.url, c[0], c[1], steps) for c in combos]
    worst_after = min(psnr(img, reference[c]) for c, (img, _, _) in zip(combos, after))
    return {"requests": len(order), "served_before_kill": len(served), "client_errors": len(errors),
            "error_types": sorted({e[1] for e in errors}),
            "wrong_or_mixed_images": sum(1 for o in served if o[1] < MIN_PSNR or not o[2]),
            "restart_seconds": restart_seconds, "images_back_when_killed": back,
            "served_after_restart": len(after), "worst_psnr_db_after_restart": worst_after,
            "all_correct_after_restart": worst_after >= MIN_PSNR}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/serving"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    parser.add_argument("--size", type=int, default=32, help="image size of the synthetic model")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per model")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    args = parser.parse_args(argv)
    from qpdeploy.io import write_file_atomic, write_json
    from qpdeploy.runtimes.triton import RepositoryConfig, TritonServer, write_repository

    args.work.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    deploy = build(args.work, args.size)
    repo = write_repository(deploy, args.work / "repo", RepositoryConfig(instances=max(LEVELS), threads=args.threads),
                            force=True)
    combos = [(f"s{i:02d}", seed) for i in range(SUBJECTS) for seed in (0, 1)]
    server = TritonServer(repo, log=args.work / "tritonserver.log")
    with server:
        reference = {c: request(server.url, c[0], c[1], args.steps)[0] for c in combos}  # alone, also a warm-up
        levels = [load_level(server, combos, reference, c, args.requests, args.steps, seed=c) for c in LEVELS]
        one = levels[0]["images_per_minute"]
        for level in levels:
            level["throughput_over_concurrency_1"] = level["images_per_minute"] / one
        restarted = restart(server, combos, reference, args.steps)
    report = {"command": "python -m benchmarks.serving " + " ".join(argv), "threads": args.threads,
              "steps": args.steps, "size": args.size, "subjects": SUBJECTS, "pipeline_instances": max(LEVELS),
              "load": levels, "restart": restarted, "seconds": round(time.perf_counter() - begin, 1)}
    write_file_atomic(args.out, lambda tmp: write_json(tmp, report))
    for level in levels:
        print(f"concurrency {level['concurrency']}: {level['images_per_minute']:.1f} img/min "
              f"(x{level['throughput_over_concurrency_1']:.2f}), p50 {level['latency_p50']:.2f} s, "
              f"p95 {level['latency_p95']:.2f} s, UNet executions/request {level['unet_executions_per_request']:.2f}, "
              f"images correct {level['all_images_correct']}")
    print(f"restart: {restarted['served_before_kill']} served, {restarted['client_errors']} client errors, "
          f"{restarted['wrong_or_mixed_images']} wrong images; back in {restarted['restart_seconds']:.1f} s, "
          f"correct after {restarted['all_correct_after_restart']}")


if __name__ == "__main__":
    main()
