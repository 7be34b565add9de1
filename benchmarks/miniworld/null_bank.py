"""Give an evaluator the non-subjects its diffusion model draws (the generated null bank).

    python -m benchmarks.miniworld.null_bank --pipeline DIR/pipeline --evaluator DIR/evaluator
        [--count 2048] [--seed 1000] [--threads 2]

The instance embedding decides "this image shows subject X" by a threshold on the cosine to
X's centroid (``metrics.instance_threshold``). Set on crisp renders alone, that threshold lets
through about 9% of what an unpersonalized model draws for the fine-detailed ``pkd``: the
model's soft, three-lobed triangles sit closer to pkd's centroid than any crisp non-subject.
This command generates ``--count`` images for class prompts (every shape on every background,
every phrasing, no colour and no identifier, seeds apart from every benchmark's) and stores
their instance embeddings, with the shape each was prompted with, beside the evaluator; the
threshold then also keeps 99% of those out, and 99% of those of the subject's own shape.
Runs in about a minute per 1000 images on 2 cores; the evaluator's report gets a
``null_bank`` section.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

from qpdeploy.miniworld import metrics
from qpdeploy.miniworld.evaluator import load_evaluator, save_null_bank
from qpdeploy.miniworld.prompts import TEMPLATES, Prompt
from qpdeploy.miniworld.sampling import generate
from qpdeploy.miniworld.subjects import SUBJECTS
from qpdeploy.miniworld.world import BACKGROUNDS, SHAPES

from .common import Clock, setup, update_report

SEED = 1000  # sampling seed of the bank: the gate samples with 0, the benchmarks with small seeds


def null_prompts(count: int) -> list[Prompt]:
    """``count`` class prompts cycling through every shape x background x phrasing."""
    combos = [Prompt(s, background=b, template=t) for t, s, b in itertools.product(range(len(TEMPLATES)), SHAPES, BACKGROUNDS)]
    return [combos[i % len(combos)] for i in range(count)]


def build_null_bank(pipe, evaluator, count: int = 2048, seed: int = SEED) -> np.ndarray:
    """Instance embeddings (count, D) of ``pipe``'s images for :func:`null_prompts`."""
    if evaluator.instance is None:
        raise ValueError("the evaluator has no instance embedding (train it with --instance-dim)")
    return evaluator.predict(generate(pipe, null_prompts(count), seed=seed)).instance


def thresholds(evaluator, identifiers=tuple(SUBJECTS)) -> dict[str, float]:
    """Each subject's instance threshold as the evaluator now sets it."""
    return {identifier: metrics.subject_threshold(evaluator, identifier) for identifier in identifiers}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True, help="the diffusers folder the evaluator is paired with")
    parser.add_argument("--evaluator", type=Path, required=True, help="evaluator folder (the bank is written into it)")
    parser.add_argument("--count", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.count < 100 * len(SHAPES):
        parser.error(f"--count must be at least {100 * len(SHAPES)} (100 per shape: the 99th percentile of each needs it)")
    from diffusers import DiffusionPipeline

    setup(args.threads, args.seed)
    clock = Clock()
    pipe = DiffusionPipeline.from_pretrained(str(args.pipeline), local_files_only=True, safety_checker=None)
    evaluator = load_evaluator(args.evaluator)
    evaluator.generated_null = evaluator.generated_null_shapes = None  # a bank written before is replaced
    before = thresholds(evaluator)
    bank = build_null_bank(pipe, evaluator, args.count, args.seed)
    save_null_bank(args.evaluator, bank, {"pipeline": str(args.pipeline), "count": str(args.count), "seed": str(args.seed)},
                   shapes=[p.shape for p in null_prompts(args.count)])
    evaluator = load_evaluator(args.evaluator)
    after = thresholds(evaluator)
    evaluator.generated_null_shapes = None
    pooled = thresholds(evaluator)  # without the per-class bound, for comparison
    section = {
        "count": args.count, "seed": args.seed, "pipeline": str(args.pipeline),
        "instance_threshold_renders_only": before, "instance_threshold_pooled_bank": pooled,
        "instance_threshold": after,
        "command": "python -m benchmarks.miniworld.null_bank " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_seconds": round(clock.seconds(), 1),
    }
    update_report(args.evaluator.parent, "null_bank", section)
    for identifier in after:
        print(f"{identifier}: threshold {before[identifier]:.3f} (renders) -> {pooled[identifier]:.3f} (bank) "
              f"-> {after[identifier]:.3f} (own class)")


if __name__ == "__main__":
    main()
