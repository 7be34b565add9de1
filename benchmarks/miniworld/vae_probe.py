"""Miniworld v2 groundwork: which VAE shape can carry every subject's look?

    python -m benchmarks.miniworld.vae_probe --out benchmarks/results/miniworld_v2_vae_probe.json

Trains one small AutoencoderKL per candidate shape with the v1 recipe (same scenes, steps and
losses) and reports reconstruction PSNR on fresh renders and on each subject's instance images
separately, so the choice of the v2 VAE (issue "Miniworld v2", gate 1) rests on numbers.
Each finished candidate is written to the report at once; a rerun skips finished candidates,
so an interrupted probe resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CANDIDATES = {
    # name: (encoder channels, latent channels, steps or None for --steps) -- 32x32 images
    "f4_c4": ((16, 32, 64), 4, None),   # v1: 8x8x4 latents
    "f4_c8": ((16, 32, 64), 8, None),   # 8x8x8 latents (more channels, as SD3/Flux do)
    "f2_c4": ((16, 32), 4, None),       # 16x16x4 latents (smaller factor)
    "f2_c4_wide_4k": ((32, 64), 4, 4000),  # the best of the three, wider and trained longer
}


def subject_psnr(vae) -> dict:
    from qpdeploy.miniworld.subjects import SUBJECTS
    from qpdeploy.miniworld.world import render_batch

    from .vae import reconstruction_psnr

    return {name: round(reconstruction_psnr(vae, render_batch(s.instance_scenes(n=16))), 2)
            for name, s in SUBJECTS.items()}


def reach_with_shipped_evaluator(vae) -> dict:
    """Gate 1's reachability with the shipped (v1) evaluator: how much of the loss is the VAE's."""
    from qpdeploy.miniworld.evaluator import load_evaluator
    from qpdeploy.miniworld.reachability import reachability
    from qpdeploy.miniworld.subjects import SUBJECTS

    return {k: round(v, 3) for k, v in reachability(vae, load_evaluator(), SUBJECTS).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/miniworld_v2_vae_probe.json"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-dir", type=Path, default=Path("/work/mw2/vae-probe"),
                        help="each candidate's VAE is saved here (save_pretrained), outside the repository")
    args = parser.parse_args()

    from qpdeploy.io import write_file_atomic, write_json

    from .common import Clock, setup
    from .vae import train_vae, vae_report

    report = json.loads(args.out.read_text()) if args.out.is_file() else {"steps": args.steps, "candidates": {}}
    for name, (channels, latent, steps) in CANDIDATES.items():
        if name in report["candidates"]:
            print(f"{name}: done already, skipped", flush=True)
            continue
        setup(args.threads, 0)
        clock = Clock()
        vae = train_vae(steps or args.steps, 32, 1e-3, 1e-4, seed=0, channels=channels, latent_channels=latent)
        vae.save_pretrained(args.save_dir / name)
        report["candidates"][name] = {
            "channels": list(channels), "latent_channels": latent, "steps": steps or args.steps, **vae_report(vae, 0),
            "psnr_db_per_subject": subject_psnr(vae), "reachability_v1_evaluator": reach_with_shipped_evaluator(vae),
            "wall_seconds": round(clock.seconds(), 1),
            "cpu_seconds": round(clock.cpu_seconds(), 1), "threads": args.threads,
        }
        write_file_atomic(args.out, lambda tmp: write_json(tmp, report))
        print(f"{name}: {report['candidates'][name]}", flush=True)


if __name__ == "__main__":
    main()
