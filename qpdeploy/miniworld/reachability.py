"""Can the yardstick see a subject at all? Gate 1 of the miniworld's own checks.

A personalization method can only draw what the model's VAE can carry, and a fidelity figure
only means something if the evaluator recognises a subject in a decoded image. Three
measurements, all on real renders passed through the model's own VAE (encode to the
posterior mean, decode):

- :func:`reachability`: for each bundled subject, the evaluator's mean probability that
  round-tripped renders of it, on every background, show that subject;
- :func:`instance_identification`: whether the evaluator's embedding is an instance-level
  feature: subjects it never saw (defined with the :class:`~.subjects.Subject` spec API) are
  identified by nearest-neighbour cosine, gallery = crisp renders on some backgrounds,
  queries = round-tripped renders on the others;
- :func:`decoy_rate`: how often a round-tripped two-colour object that is no subject is
  taken for one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .evaluator import NO_SUBJECT, Evaluator
from .metrics import unit_rows
from .subjects import Subject, mixed_scenes
from .world import BACKGROUNDS, Scene, render_batch


@torch.no_grad()
def decoded(vae, images: torch.Tensor) -> torch.Tensor:
    """Float images (B, 3, H, W) in [0, 1] encoded (posterior mean) and decoded by ``vae``."""
    return (vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2


def vae_round_trip(vae, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the same images after :func:`decoded`, as uint8."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 255.0
        out.append((decoded(vae, x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else images[:0]


def subject_renders(subject: Subject, backgrounds: Sequence[str], per_background: int, seed: int) -> list[Scene]:
    """``per_background`` random placements of ``subject`` on each of ``backgrounds``."""
    rng = np.random.default_rng([seed, *subject.identifier.encode()])
    return [subject.scene(rng, b) for b in backgrounds for _ in range(per_background)]


def reachability(vae, evaluator: Evaluator, subjects: dict[str, Subject], per_background: int = 8,
                 seed: int = 0) -> dict[str, float]:
    """Mean probability, per bundled subject, that its round-tripped renders on every background
    are recognised as that subject (the evaluator's subject head)."""
    result = {}
    for identifier, subject in subjects.items():
        images = vae_round_trip(vae, render_batch(subject_renders(subject, list(BACKGROUNDS), per_background, seed)))
        result[identifier] = float(evaluator.predict(images).probability("subject", identifier).mean())
    return result


def instance_identification(vae, evaluator: Evaluator, subjects: Sequence[Subject], gallery_backgrounds: int = 3,
                            per_background: int = 4, seed: int = 0) -> dict:
    """Nearest-neighbour identification of subjects by embedding cosine.

    Each subject's gallery embedding is the mean embedding of crisp renders on the first
    ``gallery_backgrounds`` backgrounds; queries are round-tripped renders on the remaining
    backgrounds; a query is right when its nearest gallery subject is its own.

    Returns:
        ``{"accuracy", "per_subject": {identifier: accuracy}, "queries"}``.
    """
    backgrounds = list(BACKGROUNDS)
    gallery_bg, query_bg = backgrounds[:gallery_backgrounds], backgrounds[gallery_backgrounds:]
    gallery, queries, owners = [], [], []
    for n, subject in enumerate(subjects):
        crisp = render_batch(subject_renders(subject, gallery_bg, per_background, seed))
        gallery.append(unit_rows(evaluator.predict(crisp).identity).mean(axis=0))
        trip = vae_round_trip(vae, render_batch(subject_renders(subject, query_bg, per_background, seed + 1)))
        queries.append(unit_rows(evaluator.predict(trip).identity))
        owners += [n] * len(trip)
    nearest = (np.concatenate(queries) @ unit_rows(np.stack(gallery)).T).argmax(axis=1)
    right = nearest == np.asarray(owners)
    per_subject = {s.identifier: float(right[np.asarray(owners) == n].mean()) for n, s in enumerate(subjects)}
    return {"accuracy": float(right.mean()), "per_subject": per_subject, "queries": int(len(right))}


def decoy_rate(vae, evaluator: Evaluator, n: int = 256, seed: int = 0) -> float:
    """Fraction of round-tripped decoys (two-colour looks that are no subject) whose most
    probable subject label is a subject."""
    scenes = mixed_scenes(np.random.default_rng(seed), n, plain=0.0, subjects=0.0)
    names = evaluator.predict(vae_round_trip(vae, render_batch(scenes))).names("subject")
    return float(np.mean([name != NO_SUBJECT for name in names]))
