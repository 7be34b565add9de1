"""Stage 2 of the base recipe: text encoder and UNet trained together on VAE latents.

DDPM training (epsilon prediction, linear betas 1e-4..0.02 over 1000 steps: the schedule of
small-image DDPMs, whose last step carries almost no signal, so sampling from pure noise
matches training), min-SNR-5 loss weights for faster convergence, 10% empty captions so that
classifier-free guidance works, and an exponential moving average of the weights, which is
what gets shipped.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from qpdeploy.miniworld.prompts import describe
from qpdeploy.miniworld.world import Scene

from .common import Clock, LoopCheckpoint

SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def build_text_encoder(tokenizer, width: int = 64, layers: int = 3):
    """A small CLIPTextModel over the miniworld vocabulary (causal, as CLIP's)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=layers,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=width,
    )
    return CLIPTextModel(config)


def build_unet(channels: tuple[int, ...] = (32, 64, 128), layers_per_block: int = 1, context: int = 64,
               sample_size: int = 8):
    """An SD-shaped UNet2DConditionModel on 8x8x4 latents: a plain ResNet level at full
    latent resolution, cross-attention in the two lower levels and the mid block (the SDXL
    layout: attention where the grid is small enough for it to be cheap)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=context,
        attention_head_dim=4,  # diffusers reads this as the number of heads (SD 1.x convention)
        norm_num_groups=8,
    )


def sampling_scheduler():
    """The DDIM scheduler shipped with the pipeline (same betas as training)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@dataclass
class LatentSet:
    """Pretraining data: scenes and their VAE posteriors (mean, std), each (N, 4, 16, 16)."""

    scenes: list[Scene]
    mean: torch.Tensor
    std: torch.Tensor


class EMA:
    """Exponential moving average of a module's parameters."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory early on
        ema, live = list(self.shadow.parameters()), list(module.parameters())
        torch._foreach_lerp_(ema, live, 1 - decay)


def captions(scenes: list[Scene], rng: np.random.Generator, dropout: float, **describe_options) -> list[str]:
    """Random phrasings of each scene (``describe`` with ``describe_options``); an empty caption
    with probability ``dropout`` (for CFG)."""
    return ["" if rng.random() < dropout else describe(s, rng, **describe_options).text for s in scenes]


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon prediction (Hang et al., 2023)."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return snr.clamp(max=gamma) / snr


def train_diffusion(
    data: LatentSet,
    tokenizer,
    text_encoder,
    unet,
    scaling_factor: float,
    steps: int,
    batch_size: int,
    lr: float,
    caption_dropout: float = 0.1,
    ema_decay: float = 0.999,
    min_snr_gamma: float = 5.0,
    seed: int = 0,
    checkpoint: LoopCheckpoint | None = None,
    describe_options: dict | None = None,
    device: str = "cpu",
):
    """Train text encoder and UNet jointly on ``device``; return their EMA copies (eval mode,
    on the CPU). Noise and batches are drawn on the CPU, so every device sees the same stream.

    ``describe_options`` go to ``qpdeploy.miniworld.prompts.describe`` for every caption
    (how often colour and background are left out, how often a stray identifier appears).

    With ``checkpoint`` the loop saves itself on its schedule and continues from the latest
    checkpoint it finds there (bit-identical to an uninterrupted run)."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**SCHEDULE)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    unet, text_encoder = unet.to(device), text_encoder.to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # no decay: unused identifier embeddings stay put
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    ema_unet, ema_text = EMA(unet, ema_decay), EMA(text_encoder, ema_decay)
    rng, generator, clock = np.random.default_rng(seed), torch.Generator().manual_seed(seed), Clock()
    unet.train(), text_encoder.train()
    checkpoint = checkpoint or LoopCheckpoint(None)
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet.shadow, "ema_text": ema_text.shadow}
    first = checkpoint.load(modules, optimizer, schedule, rng, generator) + 1
    for step in range(first, steps + 1):
        idx = rng.integers(len(data.scenes), size=batch_size)
        eps_posterior = torch.randn(data.mean[idx].shape, generator=generator)
        latents = (data.mean[idx] + data.std[idx] * eps_posterior) * scaling_factor  # (B, 4, 16, 16)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        ids = tokenizer(captions([data.scenes[i] for i in idx], rng, caption_dropout, **(describe_options or {})), padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        context = text_encoder(ids.to(device))[0]  # (B, L, D): the pipeline uses last_hidden_state, no mask
        pred = unet(noisy.to(device), t.to(device), context).sample
        per_sample = F.mse_loss(pred, noise.to(device), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(alphas_cumprod, t, min_snr_gamma).to(device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        if step % 100 == 0 or step == steps:
            clock.log(step, steps, loss=loss.item(), lr=schedule.get_last_lr()[0])
        if checkpoint.due(step, steps):
            checkpoint.save(step, modules, optimizer, schedule, rng, generator)
    return ema_text.shadow.cpu(), ema_unet.shadow.cpu()
