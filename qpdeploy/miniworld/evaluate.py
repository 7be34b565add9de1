"""Evaluate any model on any miniworld prompts: generate, then read the images with the evaluator.

:func:`evaluate_prompts` works on any StableDiffusionPipeline (float, quantized, with or
without a pack); :func:`evaluate_pack` loads a quantized base and a scale pack from disk
first. Both return plain dicts of floats, the columns of ``benchmarks/fidelity.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .prompts import Prompt


def evaluate_prompts(
    pipe,
    prompts: Sequence[Prompt],
    evaluator=None,
    identifier: str | None = None,
    class_prompts: Sequence[Prompt] = (),
    images_per_prompt: int = 2,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    instance_images=None,
    shape: str | None = None,
    backdrop: str | None = None,
) -> dict:
    """Generate ``images_per_prompt`` images of every prompt and measure them.

    Args:
        pipe: any StableDiffusionPipeline over the miniworld vocabulary.
        prompts: what to draw; subject prompts when ``identifier`` is given.
        evaluator: the bundled evaluator by default.
        identifier: the subject the prompts name (adds ``subject_fidelity``).
        class_prompts: the prompts' class twins (adds ``preservation``).
        seed, steps, guidance: sampling (defaults: the gate's settings).
        instance_images, shape: the subject's instance images (uint8, N x H x W x 3)
            and class noun, for a subject the package does not ship (default: the bundled
            subject's, see :func:`qpdeploy.miniworld.metrics.subject_scores`).
        backdrop: the background of the subject's instance photos (adds the per-image
            ``backdrop_drawn``: the image's background is that one, whatever was asked).

    Returns:
        ``prompt_fidelity`` (share matching every named attribute), ``attributes`` (per
        attribute accuracy), ``frechet`` (against real renders of the world), and where
        asked ``subject_fidelity`` (dict) and ``preservation`` (dict), plus ``images`` (the
        count) and ``per_image``: per-image values behind the means (``prompt_match`` and
        its parts ``background_match`` and ``shape_match``, ``subject_recognised``,
        ``subject_probability``, ``preservation_match``, ``subject_leak``, and with
        ``backdrop`` ``backdrop_drawn``; lists of floats, for confidence intervals).
    """
    from .evaluator import load_evaluator
    from .metrics import (accuracy_of, all_match, attribute_matches, frechet_distance, preservation, prompt_matches,
                          subject_leak, subject_scores)
    from .sampling import GUIDANCE, STEPS, generate

    evaluator = evaluator if evaluator is not None else load_evaluator()
    sampling = dict(seed=seed, steps=steps or STEPS, guidance=GUIDANCE if guidance is None else guidance)
    wanted = [p for p in prompts for _ in range(images_per_prompt)]
    images = generate(pipe, wanted, **sampling)
    predictions = evaluator.predict(images)
    matches = attribute_matches(predictions, wanted)
    attributes = accuracy_of(matches)
    per_image = {"prompt_match": all_match(matches)}
    for attribute in ("background", "shape"):
        if not np.isnan(matches[attribute]).any():  # named by every prompt
            per_image[f"{attribute}_match"] = matches[attribute]
    if backdrop is not None:
        per_image["backdrop_drawn"] = np.array([float(b == backdrop) for b in predictions.names("background")])
    result = {
        "prompt_fidelity": attributes["all"],
        "attributes": attributes,
        "frechet": frechet_distance(evaluator, images),
        "images": len(images),
    }
    if identifier is not None:
        scores = subject_scores(evaluator, images, identifier, instance_images, shape)
        result["subject_fidelity"] = {k: float(v.mean()) for k, v in scores.items()}
        per_image["subject_probability"] = scores["probability"]
        if "instance_recognised" in scores:
            per_image["subject_recognised"] = scores["instance_recognised"]
    if class_prompts:
        twins = [p for p in class_prompts for _ in range(images_per_prompt)]
        class_images = generate(pipe, twins, **sampling)
        result["preservation"] = preservation(evaluator, class_images, twins)
        per_image["preservation_match"] = prompt_matches(evaluator, class_images, twins)
        per_image["subject_leak"] = subject_leak(evaluator, class_images)
    result["per_image"] = {k: [float(x) for x in v] for k, v in per_image.items()}
    return result


def evaluate_pack(base_dir, pack_dir, prompts: Sequence[Prompt], **kwargs) -> dict:
    """:func:`evaluate_prompts` on a quantized base (from ``qpdeploy quantize``) with a scale
    pack (from ``qpdeploy train``; None: post-training scales) applied, in PyTorch (with its
    identifier rows, when it was trained with pivotal tuning)."""
    from qpdeploy.base import load_base, load_base_pipeline
    from qpdeploy.pack import apply_pack, load_pack
    from qpdeploy.token import apply_tokens

    base = load_base(base_dir)
    pack = None if pack_dir is None else load_pack(pack_dir)
    if pack is not None:
        apply_pack(base, pack)
    base.unet.eval()
    pipe = load_base_pipeline(base)  # the source pipeline holding the quantized UNet
    if pack is not None and pack.token:
        apply_tokens(pipe, pack.token, pack.tokens)  # pivotal tuning: the identifier's row
    return evaluate_prompts(pipe, prompts, **kwargs)
