"""The miniworld: a small procedural world in which personalization can be measured.

- ``world``: palettes, shapes, looks, ``Scene``/``Thing`` specs and the numpy renderer.
- ``prompts``: ``Prompt`` specs (what a caption asks for), captions, the tokenizer.
- ``subjects``: the personalization subjects (``SUBJECTS``), their instance images and
  dev/test prompt sets.
- ``evaluator``: the CNN that reads background, shape, colour and subject (torch).
- ``metrics``: subject fidelity, prompt fidelity, preservation, Frechet distance (torch).
- ``sampling``: ``generate(pipe, prompts)`` with the gate's settings (torch, diffusers).

The trained pipeline ships in ``qpdeploy/assets/miniworld/pipeline`` (load it with
``qpdeploy.models.load_pipeline("miniworld")``), the evaluator in ``.../evaluator`` and the
measured figures in ``.../report.json``. Importing this package does not import torch.
"""

from .prompts import IDENTIFIERS, Prompt, build_tokenizer, describe, heldout_prompts, prompt_for, vocabulary
from .subjects import SUBJECTS, Subject, get_subject, mixed_scenes, scene_for, write_instance_images
from .world import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    Scene,
    Thing,
    all_combos,
    heldout_combos,
    random_scene,
    render,
    render_batch,
    to_pil,
    train_combos,
)

_LAZY = {
    "Evaluator": "evaluator",
    "load_evaluator": "evaluator",
    "subject_fidelity": "metrics",
    "prompt_fidelity": "metrics",
    "attribute_accuracy": "metrics",
    "preservation": "metrics",
    "frechet_distance": "metrics",
    "generate": "sampling",
}


def __getattr__(name: str):
    # torch-backed parts load on first use, so renderer-only users never import torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKGROUNDS", "COLOURS", "IDENTIFIERS", "IMAGE_SIZE", "SHAPES", "SUBJECTS",
    "Prompt", "Scene", "Subject", "Thing",
    "all_combos", "build_tokenizer", "describe", "get_subject", "heldout_combos", "heldout_prompts",
    "mixed_scenes", "prompt_for", "random_scene", "render", "render_batch", "scene_for", "to_pil",
    "train_combos", "vocabulary", "write_instance_images", *_LAZY,
]
