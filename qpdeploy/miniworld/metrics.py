"""Fidelity metrics of the miniworld, all read off the evaluator.

- ``subject_fidelity``: mean probability that images show the target subject (CLIP-I/DINO
  analog) and mean cosine similarity of their embeddings to the subject's instance images.
- ``prompt_fidelity``: share of images whose prompted attributes (background, shape, colour
  where the prompt names them) all match (CLIP-T analog); ``attribute_accuracy`` splits it.
- ``preservation``: attribute accuracy on class prompts (no identifier), plus how often the
  subject leaks into them; compare before and after personalization for language drift.
- ``frechet_distance``: Frechet distance between evaluator embeddings of images and of real
  renders (FID analog).

Images are anything ``Evaluator.predict`` takes: PIL images, uint8 (N, H, W, 3) arrays, or
float (N, 3, H, W) tensors in [0, 1]. ``prompts`` are ``Prompt`` specs, one per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .evaluator import NO_SUBJECT, Evaluator, Predictions
from .prompts import Prompt
from .subjects import SUBJECTS, get_subject, mixed_scenes
from .world import render_batch

ATTRIBUTES = ("background", "shape", "colour")


def attribute_matches(predictions: Predictions, prompts: Sequence[Prompt]) -> dict[str, np.ndarray]:
    """Per attribute, an (N,) float array: 1 match, 0 mismatch, NaN where the prompt is silent."""
    if len(prompts) != len(predictions.embedding):
        raise ValueError(f"{len(prompts)} prompts for {len(predictions.embedding)} images")
    result = {}
    for attribute in ATTRIBUTES:
        predicted = predictions.names(attribute)
        wanted = [getattr(p, attribute) for p in prompts]
        result[attribute] = np.array([np.nan if w is None else float(w == g) for w, g in zip(wanted, predicted)])
    return result


def attribute_accuracy(evaluator: Evaluator, images, prompts: Sequence[Prompt]) -> dict[str, float]:
    """Accuracy of each attribute over the images whose prompt names it (attributes no prompt
    names are left out), and ``all``: the share of images matching every attribute their
    prompt names (= ``prompt_fidelity``)."""
    return accuracy_of(attribute_matches(evaluator.predict(images), prompts))


def accuracy_of(matches: dict[str, np.ndarray]) -> dict[str, float]:
    """:func:`attribute_accuracy` from :func:`attribute_matches`' arrays."""
    result = {a: float(np.nanmean(m)) for a, m in matches.items() if np.isfinite(m).any()}
    result["all"] = float(all_match(matches).mean())
    return result


def prompt_matches(evaluator: Evaluator, images, prompts: Sequence[Prompt]) -> np.ndarray:
    """Per image, 1.0 when background, shape and colour match its prompt (where named), else 0.0."""
    return all_match(attribute_matches(evaluator.predict(images), prompts))


def all_match(matches: dict[str, np.ndarray]) -> np.ndarray:
    """Per image, 1.0 when every attribute of :func:`attribute_matches` matches or is not named."""
    stacked = np.stack(list(matches.values()))  # (A, N)
    return np.all(np.nan_to_num(stacked, nan=1.0) == 1.0, axis=0).astype(np.float64)


def prompt_fidelity(evaluator: Evaluator, images, prompts: Sequence[Prompt]) -> float:
    """Share of images whose background, shape and colour match their prompt (where named)."""
    return attribute_accuracy(evaluator, images, prompts)["all"]


def subject_fidelity(evaluator: Evaluator, images, identifier: str, instance_images=None,
                     shape: str | None = None) -> dict[str, float]:
    """How much images look like subject ``identifier``: the means of :func:`subject_scores`.

    Returns:
        ``probability``: mean evaluator probability of the subject; ``recognised``: share of
        images whose most probable subject is it; ``cosine``: mean cosine similarity of image
        embeddings to instance-image embeddings (default instances: the subject's own 5).
        With an evaluator that has an instance embedding (the world's DINO), also
        ``instance_cosine``: mean cosine of image instance embeddings to the instances'
        centroid, and ``instance_recognised``: share of images above
        :func:`instance_threshold`. The classifier head needs the subject's exact shape; the
        instance embedding also recognises the imperfect subjects a personalized model draws.
    """
    scores = subject_scores(evaluator, images, identifier, instance_images, shape)
    return {k: float(v.mean()) for k, v in scores.items()}


def subject_scores(evaluator: Evaluator, images, identifier: str, instance_images=None,
                   shape: str | None = None) -> dict[str, np.ndarray]:
    """Per image, the scores :func:`subject_fidelity` averages (each an (N,) float array).
    ``instance_images`` default to the bundled subject's own; given, ``identifier`` may name
    a subject the evaluator's subject head does not know (its ``probability`` and
    ``recognised`` are then 0).
    ``shape``: the subject's class noun, for the per-class bound of :func:`instance_threshold`
    (with the bundled subject's own instance images, always its class; with given ones,
    ``shape`` or else the bundled class of ``identifier``)."""
    if instance_images is None:
        subject = get_subject(identifier)
        shape, instance_images = subject.shape, render_batch(subject.instance_scenes())
    elif shape is None and identifier in SUBJECTS:
        shape = SUBJECTS[identifier].shape
    predictions = evaluator.predict(images)
    reference = evaluator.predict(instance_images)
    result = {
        "probability": (predictions.probability("subject", identifier).astype(np.float64)
                        if identifier in predictions.labels["subject"] else np.zeros(len(predictions.embedding))),
        "recognised": np.array([n == identifier for n in predictions.names("subject")], dtype=np.float64),
        "cosine": _cosine(predictions.embedding, reference.embedding).mean(axis=1).astype(np.float64),
    }
    if predictions.instance is not None:
        centroid = _centroid(reference.instance)
        similarity = predictions.instance @ centroid
        result["instance_cosine"] = similarity.astype(np.float64)
        threshold = instance_threshold(evaluator, centroid, shape=shape)
        result["instance_recognised"] = (similarity > threshold).astype(np.float64)
    return result


def instance_threshold(evaluator: Evaluator, centroid: np.ndarray, n: int = 1000, quantile: float = 0.99,
                       seed: int = 0, shape: str | None = None) -> float:
    """The instance-cosine above which an image counts as the subject.

    Non-subjects of three kinds bound it: ``n`` renders that are no subject (plain world
    objects and decoys on every background, a fixed seed); when the evaluator carries one
    (``Evaluator.generated_null``), the images its diffusion model draws for prompts without
    an identifier; and, given the subject's class noun ``shape`` and a bank that records
    each image's, the bank's images of that class alone. The threshold is the largest of
    their ``quantile``s of cosine to ``centroid``, so at most 1% of each kind passes.
    Generated images need the second bound: a soft, off-distribution drawing of some shape
    can sit closer to a fine-detailed subject's centroid than any crisp non-subject does.
    The third is the question a user asks ("is this my square, or just a square?"): pooled
    over every shape, the bank's 99th percentile let 9% of a model's plain squares pass as
    an orange square with a blue dot.
    """
    cache = evaluator.__dict__.setdefault("_non_subject_instances", {})
    if (n, seed) not in cache:
        scenes = mixed_scenes(np.random.default_rng(seed), n, plain=0.5, subjects=0.0)
        cache[n, seed] = evaluator.predict(render_batch(scenes)).instance
    threshold = float(np.quantile(cache[n, seed] @ centroid, quantile))
    bank = getattr(evaluator, "generated_null", None)
    if bank is not None:
        threshold = max(threshold, float(np.quantile(bank @ centroid, quantile)))
        shapes = getattr(evaluator, "generated_null_shapes", None)
        if shape is not None and shapes is not None:
            own = bank[shapes == shape]
            if len(own):
                threshold = max(threshold, float(np.quantile(own @ centroid, quantile)))
    return threshold


def _centroid(embeddings: np.ndarray) -> np.ndarray:
    return unit_rows(unit_rows(embeddings).mean(axis=0))


def subject_threshold(evaluator: Evaluator, identifier: str) -> float:
    """The instance-cosine threshold :func:`subject_scores` applies to bundled subject
    ``identifier`` (its own instance images' centroid, :func:`instance_threshold`)."""
    subject = get_subject(identifier)
    reference = evaluator.predict(render_batch(subject.instance_scenes())).instance
    return instance_threshold(evaluator, _centroid(reference), shape=subject.shape)


def preservation(evaluator: Evaluator, images, prompts: Sequence[Prompt]) -> dict[str, float]:
    """Class-prompt behaviour: attribute accuracy (as ``attribute_accuracy``) and
    ``subject_leak``, the mean probability that an image shows any subject at all."""
    if any(p.identifier for p in prompts):
        raise ValueError("preservation is measured on class prompts (without an identifier)")
    result = attribute_accuracy(evaluator, images, prompts)
    result["subject_leak"] = float(subject_leak(evaluator, images).mean())
    return result


def subject_leak(evaluator: Evaluator, images) -> np.ndarray:
    """Per image, the probability that it shows any subject at all."""
    return 1.0 - evaluator.predict(images).probability("subject", NO_SUBJECT).astype(np.float64)


def frechet_distance(evaluator: Evaluator, images, reference=None, n_reference: int = 1000, seed: int = 0) -> float:
    """Frechet distance between Gaussians fitted to evaluator embeddings of ``images`` and of
    ``reference`` images (default: ``n_reference`` fresh renders of world objects, subjects
    and decoys). Comparable only between image sets of equal size."""
    if reference is None:
        reference = render_batch(mixed_scenes(np.random.default_rng(seed), n_reference))
    a = evaluator.predict(images).embedding.astype(np.float64)
    b = evaluator.predict(reference).embedding.astype(np.float64)
    return _frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _frechet(mu1, sigma1, mu2, sigma2) -> float:
    # tr(sqrt(S1 S2)) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), all symmetric: eigh is exact enough
    root1 = _psd_sqrt(sigma1)
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row (last axis) scaled to unit length."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return unit_rows(a) @ unit_rows(b).T  # (N, M)
