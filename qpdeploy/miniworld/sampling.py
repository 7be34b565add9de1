"""Generate miniworld images from ``Prompt`` specs with any StableDiffusionPipeline.

One place for the sampling settings the quality gate uses, and seeding per image (image i of
a call always gets the same starting noise, whatever the batch size), so that two models
(say, before and after personalization) are compared on identical noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .prompts import Prompt

STEPS = 25  # DDIM steps
GUIDANCE = 4.0  # classifier-free guidance scale


def generate(
    pipe,
    prompts: Sequence[Prompt | str],
    seed: int = 0,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """One image per prompt, as a uint8 (N, H, W, 3) array.

    Args:
        pipe: a diffusers StableDiffusionPipeline (e.g. ``load_pipeline("miniworld")``).
        prompts: ``Prompt`` specs or caption strings; repeat a prompt to get several images.
        seed: image i starts from noise seeded with (seed, i).
    """
    import torch

    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    pipe.set_progress_bar_config(disable=not progress)
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(batch))]
        with torch.no_grad():
            out = pipe(prompt=batch, num_inference_steps=steps, guidance_scale=guidance,
                       generator=generators, output_type="np").images  # (B, H, W, 3) in [0, 1]
        chunks.append(np.clip(np.rint(out * 255), 0, 255).astype(np.uint8))
    return np.concatenate(chunks) if chunks else np.zeros((0, 32, 32, 3), np.uint8)
