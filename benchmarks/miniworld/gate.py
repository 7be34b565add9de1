"""The base model's quality gate, measured with the evaluator and written to the report.

    python -m benchmarks.miniworld.gate [--pipeline DIR] [--evaluator DIR] [--out ASSETS] [--threads 1]

Pass when, on captions whose (colour, shape, background) combination was held out of
pretraining, the evaluator finds the prompted background in >= 90% and the prompted shape in
>= 80% of generated images, and when subject prompts (before any personalization) are
recognised as the subject with a mean probability <= 0.05 and by the instance embedding in at
most 5% of the images (the subjects are really new).
Seen combinations, class prompts and real renders are measured beside them for context.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from qpdeploy.miniworld import metrics
from qpdeploy.miniworld.prompts import Prompt, heldout_prompts
from qpdeploy.miniworld.sampling import GUIDANCE, STEPS, generate
from qpdeploy.miniworld.stats import bootstrap_mean
from qpdeploy.miniworld.subjects import SUBJECTS, scene_for
from qpdeploy.miniworld.world import render_batch, train_combos

from .common import ASSETS_DIR, Clock, setup, update_report

THRESHOLDS = {"heldout_background": 0.9, "heldout_shape": 0.8, "subject_probability_max": 0.05,
              "subject_recognised_max": 0.05}  # issue "Miniworld v2", gate 3
# each test prompt (8 per subject) this many times: 128 images per subject. A false-positive
# share near the 5% bound needs them: with 64 images, 1% and 6% are 1 and 4 images apart.
SUBJECT_REPEATS = 16
TEMPLATE_COUNT = 4


def gate_prompts(seed: int) -> dict[str, list[Prompt]]:
    """The prompt sets: every held-out combination in every phrasing, as many seen
    combinations, and each subject's test prompts ``SUBJECT_REPEATS`` times."""
    heldout = heldout_prompts(templates=tuple(range(TEMPLATE_COUNT)))
    rng = np.random.default_rng(seed)
    seen_combos = [train_combos()[i] for i in rng.choice(len(train_combos()), len(heldout), replace=False)]
    seen = [Prompt(s, c, b, template=int(rng.integers(TEMPLATE_COUNT))) for c, s, b in seen_combos]
    sets = {"heldout": heldout, "seen": seen}
    for identifier, subject in SUBJECTS.items():
        sets[f"subject:{identifier}"] = subject.prompts("test") * SUBJECT_REPEATS
        sets[f"class:{identifier}"] = subject.class_prompts("test") * SUBJECT_REPEATS
    return sets


def real_renders(prompts: list[Prompt], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return render_batch([scene_for(p, rng) for p in prompts])


def measure_gate(pipe, evaluator, seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE) -> dict:
    """Generate every gate prompt set once and evaluate it; returns the report section."""
    sets = gate_prompts(seed)
    images = {name: generate(pipe, prompts, seed=seed, steps=steps, guidance=guidance) for name, prompts in sets.items()}
    heldout = metrics.attribute_accuracy(evaluator, images["heldout"], sets["heldout"])
    seen = metrics.attribute_accuracy(evaluator, images["seen"], sets["seen"])
    real = real_renders(sets["heldout"], seed + 1)
    result = {
        "sampling": {"scheduler": "DDIM", "steps": steps, "guidance": guidance, "seed": seed,
                     "images_per_set": {k: len(v) for k, v in sets.items()}},
        "heldout": heldout,
        "seen": seen,
        "heldout_on_real_renders": metrics.attribute_accuracy(evaluator, real, sets["heldout"]),
        "frechet_heldout_vs_real": metrics.frechet_distance(evaluator, images["heldout"], real),
        "frechet_real_vs_real": metrics.frechet_distance(evaluator, real_renders(sets["heldout"], seed + 2), real),
        "subjects_before_personalization": {},
    }
    for identifier in SUBJECTS:
        prompts = sets[f"subject:{identifier}"]
        scores = metrics.subject_scores(evaluator, images[f"subject:{identifier}"], identifier)
        result["subjects_before_personalization"][identifier] = {
            "generated": {k: float(v.mean()) for k, v in scores.items()},
            "generated_recognised_interval": (bootstrap_mean([scores["instance_recognised"]])
                                              if "instance_recognised" in scores else None),
            "real_renders": metrics.subject_fidelity(evaluator, real_renders(prompts, seed + 3), identifier),
            "prompt_fidelity": metrics.prompt_fidelity(evaluator, images[f"subject:{identifier}"], prompts),
            "class_preservation": metrics.preservation(evaluator, images[f"class:{identifier}"], sets[f"class:{identifier}"]),
        }
    before = result["subjects_before_personalization"].values()
    result["thresholds"] = THRESHOLDS
    result["passed"] = bool(
        heldout["background"] >= THRESHOLDS["heldout_background"]
        and heldout["shape"] >= THRESHOLDS["heldout_shape"]
        and max(r["generated"]["probability"] for r in before) <= THRESHOLDS["subject_probability_max"]
        and max(r["generated"].get("instance_recognised", 0.0) for r in before) <= THRESHOLDS["subject_recognised_max"]
    )
    return result


def run_gate(pipeline_dir: Path, evaluator_dir: Path | None, out: Path, seed: int = 0) -> dict:
    """Load the saved pipeline and evaluator, measure the gate, write it into ``out/report.json``."""
    from diffusers import DiffusionPipeline

    from qpdeploy.miniworld.evaluator import load_evaluator

    clock = Clock()
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True, safety_checker=None)
    result = measure_gate(pipe, load_evaluator(evaluator_dir), seed=seed)
    result["wall_seconds"] = round(clock.seconds(), 1)
    update_report(out, "gate", result)
    return result


def summary(result: dict) -> str:
    """One line: the gate's key numbers and verdict."""
    h = result["heldout"]
    subj = {k: (round(v["generated"]["probability"], 3), round(v["generated"].get("instance_recognised", 0.0), 3))
            for k, v in result["subjects_before_personalization"].items()}
    return (f"gate {'PASSED' if result['passed'] else 'FAILED'}: held-out background {h['background']:.3f} "
            f"shape {h['shape']:.3f} colour {h['colour']:.3f}; seen shape {result['seen']['shape']:.3f}; "
            f"subject (probability, recognised) before personalization {subj}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, default=ASSETS_DIR / "pipeline")
    parser.add_argument("--evaluator", type=Path, default=None, help="default: the bundled evaluator")
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="folder whose report.json gets the gate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup(args.threads, args.seed)
    print(summary(run_gate(args.pipeline, args.evaluator, args.out, args.seed)))


if __name__ == "__main__":
    main()
