"""Validation grids during training: the validation prompt sampled with the current scales.

The prompt's embeddings (and their unconditional pair) are computed before the text
encoders are released, so the validation pipeline holds the quantized UNet, the VAE and the
scheduler only.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .io import write_file_atomic


def quantized_pipeline(pipe, unet, **changes):
    """A pipeline of ``pipe``'s class sharing its components, with ``unet`` (and ``changes``),
    made by diffusers' ``from_pipe``."""
    new = type(pipe).from_pipe(pipe, unet=unet, **changes)
    new.set_progress_bar_config(disable=True)
    return new


class Validator:
    """Sample ``config.validation_prompt`` and save a grid PNG.

    Args:
        pipe: the source pipeline with its text encoders (used here once, then dropped).
        unet: the quantized UNet being trained.
        config: the run's :class:`~qpdeploy.config.TrainConfig` (prompt, image count, seed).
        resolution: image size.
        sampling: ``(steps, guidance)``, resolved (:func:`qpdeploy.models.resolve_sampling`).
    """

    def __init__(self, pipe, unet, config, resolution: int, device, sampling: tuple[int, float]):
        if getattr(pipe, "text_encoder_2", None) is not None:
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
            values = pipe.encode_prompt(config.validation_prompt, device=device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=True)
        else:
            names = ("prompt_embeds", "negative_prompt_embeds")
            values = pipe.encode_prompt(config.validation_prompt, device, 1, True)
        self.embeds = {k: v.detach() for k, v in zip(names, values)}
        drop = {k: None for k in ("text_encoder", "text_encoder_2") if k in pipe.components}
        self.pipe = quantized_pipeline(pipe, unet, **drop)
        self.config, self.resolution, (self.steps, self.guidance) = config, resolution, sampling

    @torch.no_grad()
    def __call__(self, unet, path: Path) -> Path:
        """Write a grid of ``validation_images`` images to ``path`` (atomically); same noise every time."""
        was_training = unet.training
        unet.eval()
        try:
            n = self.config.validation_images
            generators = [torch.Generator("cpu").manual_seed(self.config.seed + i) for i in range(n)]
            images = self.pipe(**self.embeds, num_images_per_prompt=n, num_inference_steps=self.steps,
                               guidance_scale=self.guidance, height=self.resolution, width=self.resolution,
                               generator=generators).images
        finally:
            unet.train(was_training)
        write_file_atomic(path, lambda tmp: image_grid(images).save(tmp, format="PNG"))
        return Path(path)


def image_grid(images):
    """Equally sized PIL images in a grid (one row up to 4 images, then square-ish; the last
    row padded with white), by diffusers' ``make_image_grid``."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    columns = len(images) if len(images) <= 4 else math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    blank = Image.new("RGB", images[0].size, (255, 255, 255))
    return make_image_grid([*images, *[blank] * (rows * columns - len(images))], rows, columns)
