"""Runtime benchmark: per-step latency per backend, time spent switching engines, resident
memory of the per-interval and multi-expert layouts, and FP32 versus INT8 QDQ ONNX speed.

    python benchmarks/runtime.py --deploy DEPLOY --out benchmarks/results/runtime.json \\
        [--multi-expert DEPLOY_ME] [--base BASE --pack PACK] [--steps 10] [--threads 1]

Every ratio is measured side by side in one run on one machine:

- latency: DDIM images of ``--steps`` steps (CFG batch 2) after a warm-up image, the
  configurations taking turns for ``--rounds`` rounds: ONNX Runtime resident (INT8 weights
  dequantized in each call, the default, and ``--fold-weights``; the default also with
  ``--no-arena``), ONNX Runtime ``--low-memory`` (with and without the arena), the
  multi-expert layout, the torch reference (with --base and --pack),
  TensorRT (where installed and the deploy dir has engines). ``unet_ms_per_step`` is the
  median UNet call; ``denoise_ms_per_step`` the mean step with scheduler and guidance.
- switching: the share of denoising time spent making the next interval's engine ready
  (target below 1%), and the calls that had to load an engine on the spot (stalls).
- memory: each configuration in a fresh process: resident set size after importing (the
  baseline), after loading the UNet engines, and at the end of one UNet call per interval,
  and the process's peak resident set from after the imports on (``peak_kind``: whether the
  high-water mark could be reset there); ``engine_bytes`` and ``peak_engine_bytes`` are the
  last two minus the baseline.
- fp32_vs_int8: the deploy dir's INT8 QDQ graph against an FP32 graph of the same UNet
  architecture (exported here with torch.onnx from a float UNet built from the manifest's
  config: speed does not depend on weight values), alternating calls, median of
  ``--repeats``, on ONNX Runtime CPU with the runtime's session settings, at "basic" (the
  INT8 graph also with ``--fold-weights``) and at "all" (fused INT8 kernels).

Without a real model, ``--build-synthetic DIR`` first writes a mid-size random SD1-like model
(about 70M UNet parameters) quantized, personalized with a perturbed S2 pack and exported in
both layouts to DIR/{base,pack,per-interval,multi-expert}, at ``--size`` pixels (default 32,
16x16 latents, where weights dominate the work; 128 gives SD 1.5's 64x64 latents at 512 px).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


# ------------------------------------------------------------------------------------
# A synthetic mid-size model (when no real one is at hand)
# ------------------------------------------------------------------------------------

def build_synthetic(out: Path, size: int = 32) -> None:
    """Quantize a ~70M-parameter random SD1-like UNet, make a perturbed S2 pack and export
    it per-interval and multi-expert (``size`` x ``size`` images, latent size / 2)."""
    import copy

    from qpdeploy.base import save_base
    from qpdeploy.exporters.config import ExportConfig
    from qpdeploy.exporters.export import export_deploy
    from qpdeploy.pack import save_pack
    from qpdeploy.ptq import base_from_pipeline

    pipe, config = synthetic_pipeline(size)
    base = base_from_pipeline(pipe, config)
    save_base(out / "base", base, base.meta["report"])
    pack = perturbed_pack(base)
    save_pack(out / "pack", pack)
    for layout in ("per-interval", "multi-expert"):
        export_deploy(copy.deepcopy(base), pipe, out / layout,
                      ExportConfig(layout=layout, height=size, width=size, verify=False), pack)


def synthetic_pipeline(size: int = 32):
    """The tiny SD1 pipeline with a ~70M-parameter random UNet (seeded), and the cheap
    quantize config used for it: ``(pipe, QuantizeConfig)``."""
    from diffusers import UNet2DConditionModel

    from qpdeploy.config import QuantizeConfig
    from qpdeploy.models import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        sample_size=size // 2, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512), layers_per_block=2,
        norm_num_groups=32, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    config = QuantizeConfig(calib_steps=4, calib_samples=8, weight_search="minmax", act_search="minmax",
                            calib_prompts=("a photo of a dog", "a red car on a street", "a cat on a sofa"))
    return pipe, config


def perturbed_pack(base, seed: int = 0):
    """An S2 pack whose four sets differ (``s_out`` scaled by exp(0.1 N(0, 1))): what training
    produces, as far as the runtime can tell."""
    from qpdeploy.layers import quant_layers
    from qpdeploy.pack import ScalePack, init_scale_sets, reset_to_post_training, scales_of

    init_scale_sets(base, "s2", base.intervals)
    gen = torch.Generator().manual_seed(seed)
    for _, layer in quant_layers(base.unet):
        layer.s_out.data *= torch.exp(0.1 * torch.randn(layer.s_out.shape, generator=gen))
    pack = ScalePack("s2", base.intervals, base.base_hash, scales_of(base.unet))
    reset_to_post_training(base)
    return pack


# ------------------------------------------------------------------------------------
# Latency and switching
# ------------------------------------------------------------------------------------

def latencies(configs: list[tuple[str, Path, object]], steps: int, rounds: int) -> list[dict]:
    """Per configuration ``(name, deploy dir, RuntimeConfig)``: a warm-up image, then ``rounds``
    rounds in which every configuration makes one image of ``steps`` DDIM steps in turn, so a
    change of machine load hits them all alike. UNet, denoising and switch figures."""
    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.runtimes import close_pipeline, load_deploy_pipeline

    pipes, loads = {}, {}
    try:
        for name, deploy, runtime in configs:
            start = time.perf_counter()
            pipes[name] = load_deploy_pipeline(read_manifest(deploy), runtime, "ddim")
            loads[name] = time.perf_counter() - start
            image(pipes[name], steps, seed=0)  # warm-up
        timed = {name: [] for name in pipes}
        for round_ in range(rounds):
            for name, pipe in pipes.items():
                timed[name].append(image(pipe, steps, seed=1 + round_))
        return [latency_row(name, runtime, pipes[name], timed[name], loads[name]) for name, _, runtime in configs]
    finally:
        for pipe in pipes.values():
            close_pipeline(pipe)


def image(pipe, steps: int, seed: int) -> dict:
    """One image; its UNet call records and denoising seconds (text encoder and VAE excluded)."""
    pipe.unet.reset_history()
    pipe.text_encoder.seconds = pipe.vae.seconds = 0.0
    start = time.perf_counter()
    pipe("a photo of a dog", num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    total = time.perf_counter() - start
    return {**pipe.unet.summary(), "denoise": total - pipe.text_encoder.seconds - pipe.vae.seconds}


def latency_row(name: str, runtime, pipe, images: list[dict], load: float) -> dict:
    calls = [s for im in images for s in im["unet_seconds_per_step"]]
    denoise, switch = sum(im["denoise"] for im in images), sum(im["switch_seconds_total"] for im in images)
    engines = pipe.unet.engines
    return {
        "configuration": name,
        "backend": runtime.backend,
        "low_memory": runtime.low_memory,
        "load_seconds": round(load, 3),
        "unet_ms_per_step": round(1000 * statistics.median(calls), 2),
        "denoise_ms_per_step": round(1000 * denoise / len(calls), 2),
        "switches_per_image": images[-1]["switches"],
        "switch_ms_per_image": round(1000 * switch / len(images), 3),
        "switch_share_of_denoising": switch / denoise,
        "stalls": engines.stalls,
        "engine_loads": engines.loads,
        "peak_resident_engines": engines.peak_resident,
        "interval_per_step": images[-1]["interval_per_step"],
    }


def trt_status(deploy: Path) -> str | None:
    """None when the TensorRT backend can run this deploy dir here, else why not."""
    from qpdeploy.errors import QPDeployError
    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.runtimes.trt import check_engines

    try:
        check_engines(read_manifest(deploy))
    except QPDeployError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------------
# Resident memory, each configuration in a fresh process
# ------------------------------------------------------------------------------------

def memory_child(deploy: Path, runtime_json: str) -> dict:
    """Runs in a child process: RSS after imports, after loading, after a call per interval, and
    the process's high-water mark from after the imports to the end (during the calls, where
    each call's buffers come and go)."""
    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.memory import PeakMemory
    from qpdeploy.memory import rss_bytes as rss
    from qpdeploy.runtimes import EngineUNet, RuntimeConfig

    manifest = read_manifest(deploy)
    specs = {s["name"]: [2 if d == "batch" else d for d in s["shape"]] for s in manifest.unet_inputs}
    baseline = rss()
    meter = PeakMemory("cpu").reset()
    unet = EngineUNet.from_deploy(deploy, config=RuntimeConfig.from_json(json.loads(runtime_json)))
    loaded = rss()
    sample, hidden = torch.randn(specs["sample"]), torch.randn(specs["encoder_hidden_states"])
    for k in reversed(range(manifest.intervals.k)):
        lo, hi = manifest.intervals.bounds(k)
        unet(sample, (lo + hi) // 2, hidden)
    after, peak = rss(), meter.peak()
    result = {"baseline_rss": baseline, "after_load_rss": loaded, "after_calls_rss": after, "peak_rss": peak,
              "peak_kind": meter.kind, "engine_bytes": after - baseline, "peak_engine_bytes": peak - baseline,
              "resident_engines_at_end": len(unet.engines.resident)}
    unet.close()
    return result


def memory(deploy: Path, runtime) -> dict:
    """:func:`memory_child` in a fresh interpreter (RSS is not given back to the OS reliably)."""
    command = [sys.executable, __file__, "--child-memory", str(deploy), json.dumps(runtime.to_json())]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------
# FP32 ONNX versus INT8 QDQ ONNX
# ------------------------------------------------------------------------------------

def fp32_graph(manifest, scratch: Path) -> Path:
    """An FP32 ONNX graph of the deploy dir's UNet architecture (random float weights), with
    the same inputs and shapes as the exported INT8 graphs."""
    from diffusers import UNet2DConditionModel

    from qpdeploy.exporters.tracing import save_onnx, torchscript_export

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(manifest.unet_config).eval()
    specs = [s for s in manifest.unet_inputs if s["dtype"] == "float32"]
    args = tuple(torch.randn([2 if d == "batch" else d for d in s["shape"]]) for s in specs)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, hidden, *added):
            cond = {"text_embeds": added[0], "time_ids": added[1]} if added else None
            return self.unet(sample, timestep, hidden, added_cond_kwargs=cond, return_dict=False)[0]

    names = [s["name"] for s in specs]
    model = torchscript_export(Wrapper(), args, names, ["noise_pred"], manifest.opset, scratch,
                               dynamic_axes={n: {0: "batch"} for n in names + ["noise_pred"]})
    path = scratch / "unet_fp32.onnx"
    save_onnx(model, path)
    return path


def fp32_vs_int8(deploy: Path, threads: int, repeats: int) -> dict:
    """Median ms per UNet call (batch 2) of the FP32 graph and the INT8 QDQ graph, alternating."""
    import numpy as np

    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.runtimes.runners import SessionFromOnnxPath

    manifest = read_manifest(deploy)
    gen = np.random.default_rng(0)
    feed = {}
    for s in manifest.unet_inputs:
        shape = [2 if d == "batch" else d for d in s["shape"]]
        feed[s["name"]] = (np.zeros(shape, np.int32) if s["dtype"] == "int32" else
                           np.full(shape, 500.0, np.float32) if s["name"] == "timestep" else
                           gen.standard_normal(shape).astype(np.float32))
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = fp32_graph(manifest, Path(scratch))
        int8 = manifest.file(manifest.unet["graphs"][0]["onnx"])
        graphs = {"fp32": fp32, "int8_qdq": int8}
        sessions = {f"{name}_{level}": SessionFromOnnxPath(path, threads=threads, optimization=level)()
                    for name, path in graphs.items() for level in ("basic", "all")}
        sessions["int8_qdq_basic_fold"] = SessionFromOnnxPath(int8, threads=threads, fold_weights=True)()
        fp32_feed = {k: v for k, v in feed.items() if v.dtype == np.float32}
        feeds = {name: fp32_feed if name.startswith("fp32") else feed for name in sessions}
        times = {name: [] for name in sessions}
        for name, session in sessions.items():
            session.run(None, feeds[name])  # warm-up
        for _ in range(repeats):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feeds[name])
                times[name].append(time.perf_counter() - start)
        fp32_bytes = sum(p.stat().st_size for p in Path(scratch).iterdir())
    result = {name: round(1000 * statistics.median(t), 2) for name, t in times.items()}
    result = {f"{name}_ms": value for name, value in result.items()}
    for level in ("basic", "all"):  # each graph at the same ONNX Runtime optimization level
        result[f"int8_speedup_vs_fp32_{level}"] = round(result[f"fp32_{level}_ms"] / result[f"int8_qdq_{level}_ms"], 3)
    result["int8_speedup_vs_fp32_basic_fold"] = round(result["fp32_basic_ms"] / result["int8_qdq_basic_fold_ms"], 3)
    result["fp32_graph_bytes"] = fp32_bytes
    result["int8_graph_bytes"] = manifest.file_bytes(manifest.unet["weights_file"]) + \
        manifest.file_bytes(manifest.unet["graphs"][0]["onnx"])
    return result


# ------------------------------------------------------------------------------------

def run(args) -> dict:
    from qpdeploy.runtimes import RuntimeConfig

    ort = RuntimeConfig(threads=args.threads, verify_hashes=False)
    report = {"deploy": str(args.deploy), "multi_expert_deploy": str(args.multi_expert) if args.multi_expert else None,
              "steps": args.steps, "threads": args.threads, "machine": machine()}
    configs = [("ort", args.deploy, ort), ("ort --fold-weights", args.deploy, ort.replace(fold_weights=True)),
               ("ort --no-arena", args.deploy, ort.replace(arena=False)),
               ("ort --low-memory", args.deploy, ort.replace(low_memory=True)),
               ("ort --low-memory --no-arena", args.deploy, ort.replace(low_memory=True, arena=False))]
    if args.multi_expert:
        configs.append(("ort, multi-expert layout", args.multi_expert, ort))
    if args.base:
        reference = ort.replace(backend="torch", base=str(args.base), pack=str(args.pack) if args.pack else None)
        configs.append(("torch reference", args.deploy, reference))
    why_not_trt = trt_status(args.deploy)
    if why_not_trt is None:
        configs.append(("trt", args.deploy, RuntimeConfig(backend="trt", verify_hashes=False)))
    report["latency"] = latencies(configs, args.steps, args.rounds)
    report["tensorrt"] = why_not_trt or "measured"
    memory_runs = {"per-interval resident (shared weights map)": (args.deploy, ort),
                   "per-interval resident (each session its own weights)":
                       (args.deploy, ort.replace(share_weights=False)),
                   "per-interval resident --fold-weights": (args.deploy, ort.replace(fold_weights=True)),
                   "per-interval resident --no-arena": (args.deploy, ort.replace(arena=False)),
                   "per-interval --low-memory": (args.deploy, ort.replace(low_memory=True)),
                   "per-interval --low-memory --no-arena": (args.deploy, ort.replace(low_memory=True, arena=False))}
    if args.multi_expert:
        memory_runs["multi-expert"] = (args.multi_expert, ort)
    report["memory"] = {name: memory(path, runtime) for name, (path, runtime) in memory_runs.items()}
    report["fp32_vs_int8"] = fp32_vs_int8(args.deploy, args.threads, args.repeats)
    return report


def machine() -> dict:
    import onnxruntime

    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def print_table(report: dict) -> None:
    print("| configuration | UNet ms/step | denoise ms/step | switches | switch share | stalls | peak engines |")
    print("|---|---|---|---|---|---|---|")
    for r in report["latency"]:
        print(f"| {r['configuration']} | {r['unet_ms_per_step']} | {r['denoise_ms_per_step']} | "
              f"{r['switches_per_image']} | {100 * r['switch_share_of_denoising']:.3f}% | {r['stalls']} | "
              f"{r['peak_resident_engines']} |")
    print("\n| resident memory | after load MiB | after calls MiB | peak MiB |")
    print("|---|---|---|---|")
    for name, m in report["memory"].items():
        mib = lambda key: f"{(m[key] - m['baseline_rss']) / 2**20:.0f}"  # noqa: E731
        print(f"| {name} | {mib('after_load_rss')} | {mib('after_calls_rss')} | {mib('peak_rss')} |")
    f = report["fp32_vs_int8"]
    print("\n| ONNX Runtime CPU, ms per UNet call (batch 2) | FP32 | INT8 QDQ | INT8 speed-up |\n|---|---|---|---|")
    for level, fp32 in (("basic", "basic"), ("basic_fold", "basic"), ("all", "all")):
        print(f"| optimization '{level}' | {f[f'fp32_{fp32}_ms']} | {f[f'int8_qdq_{level}_ms']} | "
              f"x{f[f'int8_speedup_vs_fp32_{level}']} |")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child-memory":
        torch.set_num_threads(1)
        print(json.dumps(memory_child(Path(sys.argv[2]), sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deploy", type=Path, help="deploy dir to measure (per-interval: the switch figures)")
    parser.add_argument("--out", type=Path, help="JSON report to write")
    parser.add_argument("--multi-expert", type=Path, help="the same model exported multi-expert (memory comparison)")
    parser.add_argument("--base", type=Path, help="torch reference: the base the deploy dir was exported from")
    parser.add_argument("--pack", type=Path, help="torch reference: the pack the deploy dir was exported with")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime and torch threads")
    parser.add_argument("--rounds", type=int, default=2, help="timed images per configuration (interleaved)")
    parser.add_argument("--repeats", type=int, default=5, help="FP32/INT8 calls timed per graph")
    parser.add_argument("--build-synthetic", type=Path, help="first write the synthetic model and deploy dirs here")
    parser.add_argument("--size", type=int, default=32, help="--build-synthetic: image size (the latents are half)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.build_synthetic:
        build_synthetic(args.build_synthetic, args.size)
        args.deploy = args.deploy or args.build_synthetic / "per-interval"
        args.multi_expert = args.multi_expert or args.build_synthetic / "multi-expert"
        args.base = args.base or args.build_synthetic / "base"
        args.pack = args.pack or args.build_synthetic / "pack"
    if args.deploy is None or args.out is None:
        parser.error("--deploy (or --build-synthetic) and --out are required")
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nreport: {args.out}")


if __name__ == "__main__":
    main()
