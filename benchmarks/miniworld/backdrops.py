"""Which background should a subject's instance photos be taken on? DreamBooth, then every background.

    python -m benchmarks.miniworld.backdrops --pairs sks:sky,sks:stone,qlv:snow,qlv:stone \
        [--seeds 0] [--out benchmarks/results/miniworld_backdrops.json] [-- FIDELITY OPTIONS]

For each pair of subject and instance background ("backdrop"), the subject's 5 instance images are
rendered on that backdrop, full-precision DreamBooth trains on them with the fidelity
benchmark's recipe (``benchmarks/fidelity.py``; its options go after ``--``, e.g.
``--dreambooth-lr 1e-4 --dreambooth-text-encoder-lr 5e-5``), and the personalized model draws
the subject on every one of the world's 8 backgrounds (2 phrasings x 8 images each). The
report gives, per backdrop, the share recognised as the subject (instance embedding, the
subject's own centroid on that backdrop) on each background and on the 7 others pooled
(mean with a 95% bootstrap interval over images and seeds).

A design diagnostic of the world, not a gate: it reads every background, so it is how the
bundled subjects' backdrops were chosen (README, "The bundled model"), and the gates then
measure the chosen world on its own dev/test split.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qpdeploy.io import write_file_atomic, write_json
from qpdeploy.miniworld import subjects as subject_registry
from qpdeploy.miniworld.stats import bootstrap_mean
from qpdeploy.miniworld.world import BACKGROUNDS

@contextlib.contextmanager
def photographed_on(identifier: str, background: str):
    """Bundled subject ``identifier`` with its instance images on ``background`` for the
    duration (the registry entry every metric reads is swapped, then restored)."""
    original = subject_registry.SUBJECTS[identifier]
    subject_registry.SUBJECTS[identifier] = dataclasses.replace(original, background=background)
    try:
        yield subject_registry.SUBJECTS[identifier]
    finally:
        subject_registry.SUBJECTS[identifier] = original


def recognition_by_background(pipe, evaluator, subject, images_per_prompt: int, seed: int) -> dict[str, list[float]]:
    """Per background, per image: 1.0 where the instance embedding recognises ``subject``."""
    from qpdeploy.miniworld.metrics import subject_scores
    from qpdeploy.miniworld.prompts import Prompt
    from qpdeploy.miniworld.sampling import generate

    out = {}
    for background in BACKGROUNDS:
        prompts = [Prompt(subject.shape, background=background, identifier=subject.identifier, template=t)
                   for t in subject_registry.PROMPT_TEMPLATES for _ in range(images_per_prompt)]
        images = generate(pipe, prompts, seed=1000 + seed)
        out[background] = subject_scores(evaluator, images, subject.identifier)["instance_recognised"].tolist()
    return out


def summarize(runs: list[dict]) -> dict:
    """Per subject and backdrop: recognition per background and on the other backgrounds pooled."""
    table: dict = {}
    for key in dict.fromkeys((r["subject"], r["backdrop"]) for r in runs):
        mine = [r for r in runs if (r["subject"], r["backdrop"]) == key]
        cell = {b: bootstrap_mean([r["recognised"][b] for r in mine]) for b in BACKGROUNDS}
        cell["other_backgrounds"] = bootstrap_mean(
            [[x for b in BACKGROUNDS if b != key[1] for x in r["recognised"][b]] for r in mine])
        table.setdefault(key[0], {})[key[1]] = cell
    return table


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True,
                        help="comma-separated subject:background pairs, e.g. sks:sky,sks:stone")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/miniworld_backdrops.json"))
    args = parser.parse_args(own)
    pairs = [tuple(item.split(":", 1)) for item in args.pairs.split(",")]
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in subject_registry.SUBJECTS or pair[1] not in BACKGROUNDS:
            parser.error(f"{':'.join(pair)!r} is not subject:background (subjects {', '.join(subject_registry.SUBJECTS)}; "
                         f"backgrounds {', '.join(BACKGROUNDS)})")
    import torch

    import benchmarks.fidelity as fidelity
    from qpdeploy.quiet import quiet_third_party

    bench_args = fidelity.build_parser().parse_args(["--out", str(args.out), *extra])
    torch.set_num_threads(bench_args.threads)
    quiet_third_party()
    runs, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qpdeploy-backdrops-") as tmp:
        bench = fidelity.Bench(bench_args, Path(tmp))

        def evaluate(pipe, subject, split, seed):  # every background instead of the subject's split
            return {"recognised": recognition_by_background(pipe, bench.evaluator, subject,
                                                            bench_args.images_per_prompt, seed)}

        bench.evaluate = evaluate
        for identifier, backdrop in pairs:
            with photographed_on(identifier, backdrop) as subject:
                images = Path(tmp) / f"instance-{identifier}-{backdrop}"
                subject_registry.write_instance_images(identifier, images)
                for seed in (int(s) for s in args.seeds.split(",")):
                    tick = time.perf_counter()
                    result = bench.float_row("fp_dreambooth", subject, images, seed)
                    runs.append({"subject": identifier, "backdrop": backdrop, "seed": seed,
                                 "recognised": result["recognised"]})
                    others = np.mean([x for b in BACKGROUNDS if b != backdrop for x in result["recognised"][b]])
                    print(f"{identifier} on {backdrop}, seed {seed}: other backgrounds {others:.2f} "
                          f"({time.perf_counter() - tick:.0f} s)", flush=True)
    report = {"command": "python -m benchmarks.miniworld.backdrops " + " ".join(argv),
              "recipe": {k: v for k, v in vars(bench_args).items() if k in (
                  "model", "evaluator", "steps", "batch_size", "dreambooth_lr", "dreambooth_text_encoder_lr")},
              "table": summarize(runs), "runs": runs, "seconds": round(time.perf_counter() - start, 1)}
    report["recipe"] = {k: str(v) if isinstance(v, Path) else v for k, v in report["recipe"].items()}
    write_file_atomic(args.out, lambda t: write_json(t, report))
    print(f"report -> {args.out}")


if __name__ == "__main__":
    main()
