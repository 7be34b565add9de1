"""Time and memory of ``qpdeploy quantize`` on the Stable Diffusion 1.5 architecture.

Builds a diffusers folder with SD 1.5's UNet (its published config, 859.5M parameters),
a text encoder of CLIP ViT-L/14's shape (12 layers, width 768, 77 tokens) and SD 1.5's VAE,
all with random weights (no download; a word-level tokenizer over the calibration
prompts' words stands in for CLIP's BPE, which changes only the size of the embedding
table). Then quantizes it in a fresh process, the way a user would
(``quantize_model``, what ``qpdeploy quantize`` runs), and reports that process's CPU
seconds (user + system), wall seconds, peak resident memory, the seconds of each stage
(trajectories, weights, activations, evaluate; from the base's report) and the SQNR.

Random weights make the SQNR a plumbing figure, not a quality one; time and memory are
those of the real architecture.

    python -m benchmarks.quantize_speed --out benchmarks/results/quantize_speed.json [--compare-ref COMMIT]

With ``--batch-sizes 2,8`` it also times the float UNet's forward pass at those batch sizes
(fresh process, same threads, latents of ``--resolution``): what batching the calibration
trajectories (several prompts per UNet call) could save on this machine.

With ``--compare-ref``, the same measurement also runs on the qpdeploy of that git commit
(checked out into a temporary worktree), one after the other on the same built model, so the
report holds both and their ratios from one run.

Defaults: 256 px, 10 calibration steps, 16 calibration samples, W8A8, 2 threads (the
setting of the issue that asked for it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.train_memory import SD15_SCHEDULER, SD15_UNET

# SD 1.5's VAE (its published vae/config.json).
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, act_fn="silu")
# CLIP ViT-L/14's text tower (SD 1.5's text encoder), vocabulary aside.
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def build_sd15(folder: Path, seed: int = 0) -> None:
    """Write a random-weight SD 1.5-architecture pipeline to ``folder`` (diffusers format)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from qpdeploy.prompts import CALIBRATION_PROMPTS
    from qpdeploy.tokenizer import build_word_tokenizer

    words = sorted({w.strip(",.") for p in CALIBRATION_PROMPTS for w in p.split()})
    tokenizer = build_word_tokenizer(words, max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **CLIP_L_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDIMScheduler(**SD15_SCHEDULER, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def child(model: Path, out: Path, args) -> dict:
    """Quantize ``model`` into ``out`` in this process; its own rusage is the measurement."""
    import torch

    from qpdeploy.config import QuantizeConfig
    from qpdeploy.ptq import quantize_model

    torch.set_num_threads(args.threads)
    config = QuantizeConfig(weight_bits=args.weight_bits, calib_steps=args.calib_steps,
                            calib_samples=args.calib_samples, resolution=args.resolution)
    start = time.perf_counter()
    _, report = quantize_model(model, out, config, device="cpu", force=True, show_progress="lines")
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    import qpdeploy

    return {
        "qpdeploy": str(Path(qpdeploy.__file__).parent),
        "wall_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "stage_seconds": report.get("stage_seconds"),
        "sqnr_db": report["sqnr_db"],
        "layers_quantized": report["layers_quantized"],
        "calibration_calls": report["calibration_calls"],
        "heldout_calls": report["heldout_calls"],
    }


def measure(model: Path, out: Path, args, source: Path | None = None) -> dict:
    """One quantization in a fresh process: this checkout's qpdeploy, or the one at ``source``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(model), str(out),
               "--threads", str(args.threads), "--weight-bits", str(args.weight_bits),
               "--calib-steps", str(args.calib_steps), "--calib-samples", str(args.calib_samples),
               "--resolution", str(args.resolution)]
    return _run_child(command, source if source is not None else Path(__file__).resolve().parents[1], args.threads)


def _run_child(command: list[str], root: Path, threads: int) -> dict:
    """Run ``command`` with ``root`` (a qpdeploy checkout) first on the path; its last stdout line, parsed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "QPDEPLOY_PROGRESS_SECONDS": "60",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, check=True, text=True, cwd=root)
    return json.loads(done.stdout.strip().splitlines()[-1])


def unet_probe(model: Path, args, repeats: int = 3) -> dict:
    """Seconds per UNet sample of the float UNet at each of ``args.batch_sizes`` (median of
    ``repeats`` calls after one warm-up call)."""
    import statistics

    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    unet = UNet2DConditionModel.from_pretrained(model / "unet", local_files_only=True).eval()
    side = args.resolution // 8
    out = {}
    with torch.no_grad():
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            sample = torch.randn(batch, unet.config.in_channels, side, side)
            context = torch.randn(batch, 77, unet.config.cross_attention_dim)
            timestep = torch.full((batch,), 500)
            seconds = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                unet(sample, timestep, encoder_hidden_states=context)
                seconds.append(time.perf_counter() - start)
            out[str(batch)] = statistics.median(seconds[1:]) / batch
    return {"seconds_per_sample": out}


def run(args) -> dict:
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="qp-speed-"))
    model = scratch / "sd15-random"
    if not (model / "model_index.json").is_file():
        print(f"building the SD 1.5-architecture model in {model}", file=sys.stderr, flush=True)
        build_sd15(model)
    report = {
        "benchmark": "quantize_speed",
        "command": "python -m benchmarks.quantize_speed " + " ".join(sys.argv[1:]),
        "model": "SD 1.5 architecture, random weights (UNet 859.5M parameters)",
        "settings": {"resolution": args.resolution, "calib_steps": args.calib_steps,
                     "calib_samples": args.calib_samples, "weight_bits": args.weight_bits, "act_bits": 8,
                     "threads": args.threads},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        **measure(model, scratch / "base", args),
    }
    if args.compare_ref:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", args.compare_ref], cwd=root, check=True, text=True,
                                stdout=subprocess.PIPE).stdout.strip()
        worktree = scratch / f"ref-{commit[:12]}"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), commit], cwd=root, check=True)
        try:
            ref = measure(model, scratch / "base-ref", args, source=worktree)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=root, check=True)
        report["reference"] = {"commit": commit, **ref}
        report["ratios"] = {k: round(report[k] / ref[k], 3) for k in ("wall_seconds", "cpu_seconds", "peak_rss_bytes")}
        report["sqnr_db_difference"] = report["sqnr_db"] - ref["sqnr_db"]
    if args.batch_sizes:
        command = [sys.executable, str(Path(__file__).resolve()), "--unet-probe", str(model), "--threads",
                   str(args.threads), "--resolution", str(args.resolution), "--batch-sizes", args.batch_sizes]
        probe = _run_child(command, Path(__file__).resolve().parents[1], args.threads)["seconds_per_sample"]
        smallest = probe[min(probe, key=int)]
        report["unet_batching"] = {"seconds_per_sample": probe,
                                   "speedup_over_smallest": {b: round(smallest / v, 3) for b, v in probe.items()}}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON report to write")
    parser.add_argument("--scratch", help="folder for the built model and the base (default: a new temp folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--calib-steps", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--compare-ref", help="also measure the qpdeploy of this git commit, in the same run")
    parser.add_argument("--batch-sizes", default="", help="also time the float UNet at these batch sizes, e.g. 2,8")
    parser.add_argument("--unet-probe", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args)))
        return
    if args.unet_probe:
        print(json.dumps(unet_probe(Path(args.unet_probe), args)))
        return
    report = run(args)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
