"""Step-level continuous batching: many requests, one UNet call per denoising step.

Each request (prompt, negative prompt, subject, seed, steps, guidance) keeps its own
scheduler, latents and text conditioning. :meth:`StepBatcher.tick` gathers the next step of
every active request (both halves of classifier-free guidance) into one batch: per sample its
own timestep and, in a multi-subject deploy dir, its own scale row (the subject's set of the
interval its timestep falls in), and runs the UNet once. Requests may join at any tick and
finish at different ticks, so requests at different steps share a call. Everything but the
UNet call is what :class:`diffusers.StableDiffusionPipeline` does for one request (its own
``encode_prompt``, ``prepare_latents``, ``prepare_extra_step_kwargs`` and VAE decoding), so an
image made in a mixed batch equals the image generated alone, up to the UNet engine's
arithmetic on a different batch size (tests assert >= 60 dB PSNR).

Stable Diffusion 1.x, 2.x and XL deploy dirs: an SDXL request also carries its pooled text
embeddings and size conditioning (``time_ids``), batched beside its latents, as
:class:`diffusers.StableDiffusionXLPipeline` prepares them (no refiner, no size overrides).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from qpdeploy.errors import QPDeployError
from qpdeploy.models import FALLBACK_SAMPLING


@dataclass(frozen=True)
class Request:
    """One image to make."""

    prompt: str
    subject: str | None = None
    seed: int = 0
    steps: int = FALLBACK_SAMPLING["steps"]
    guidance: float = FALLBACK_SAMPLING["guidance"]
    negative_prompt: str | None = None


@dataclass
class _Active:
    """A request in flight: its scheduler, latents, conditioning and progress."""

    ticket: int
    request: Request
    scheduler: object
    timesteps: list
    latents: torch.Tensor
    embeds: torch.Tensor  # (2 or 1, L, D): [negative, positive] with guidance
    extra: dict
    rows: tuple[int, ...] | None  # scale row per interval (multi-subject), else None
    added: dict | None = None  # SDXL: text_embeds (pooled) and time_ids, one row per UNet sample
    index: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def guided(self) -> bool:
        return self.embeds.shape[0] == 2


class StepBatcher:
    """Runs requests through a deploy dir's pipeline, one shared UNet call per tick.

    Args:
        pipe: a pipeline from :func:`~.pipeline.load_deploy_pipeline` (its UNet is an
            :class:`~.unet.EngineUNet`; load it without a subject).
        max_requests: most requests in one tick (each is 2 UNet samples with guidance).
    """

    def __init__(self, pipe, max_requests: int = 8):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise QPDeployError(f"the step batcher runs Stable Diffusion 1.x/2.x/XL deploy dirs, not {type(pipe).__name__}")
        self.pipe, self.max_requests = pipe, max_requests
        self.xl = isinstance(pipe, StableDiffusionXLPipeline)
        self.manifest = pipe.unet.manifest
        self.multi_subject = self.manifest.layout == "multi-subject"
        self.waiting: list[tuple[int, Request]] = []
        self.active: list[_Active] = []
        self.calls = 0  # UNet calls made
        self.samples = 0  # UNet samples computed
        self._tickets = 0

    def submit(self, request: Request) -> int:
        """Queue a request; returns its ticket. An unknown subject fails here."""
        self.manifest.subject_dispatch(request.subject)
        if request.subject is not None and not self.multi_subject:
            raise QPDeployError("subjects by name need a multi-subject deploy dir")
        ticket, self._tickets = self._tickets, self._tickets + 1
        self.waiting.append((ticket, request))
        return ticket

    def _start(self, ticket: int, request: Request) -> _Active:
        pipe = self.pipe
        guided = request.guidance > 1.0
        h, w = self.manifest.size
        added = None
        if self.xl:
            positive, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=request.prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                do_classifier_free_guidance=guided, negative_prompt=request.negative_prompt)
            projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                          else pipe.text_encoder_2.config.projection_dim)
            time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=positive.dtype,
                                              text_encoder_projection_dim=projection)
            added = {"text_embeds": torch.cat([negative_pooled, pooled]) if guided else pooled,
                     "time_ids": torch.cat([time_ids, time_ids]) if guided else time_ids}
        else:
            positive, negative = pipe.encode_prompt(request.prompt, torch.device("cpu"), 1, guided,
                                                    request.negative_prompt)
        embeds = torch.cat([negative, positive]) if guided else positive
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(request.steps, device="cpu")
        generator = torch.Generator("cpu").manual_seed(request.seed)
        latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, h, w, embeds.dtype, torch.device("cpu"),
                                       generator, None)
        extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
        rows = self.manifest.subject_dispatch(request.subject).selector_values if self.multi_subject else None
        return _Active(ticket, request, scheduler, list(scheduler.timesteps), latents, embeds, extra, rows, added)

    def tick(self) -> list[tuple[int, object]]:
        """Admit waiting requests (up to ``max_requests`` active), run one UNet call for the
        next step of each, and finish those at their last step. Returns ``[(ticket, PIL
        image)]`` of the requests finished in this tick."""
        while self.waiting and len(self.active) < self.max_requests:
            self.active.append(self._start(*self.waiting.pop(0)))
        if not self.active:
            return []
        inputs, timesteps, embeds, selector, added = [], [], [], [], []
        intervals = self.manifest.intervals
        for job in self.active:
            t = job.timesteps[job.index]
            copies = 2 if job.guided else 1
            model_input = job.scheduler.scale_model_input(torch.cat([job.latents] * copies), t)
            inputs.append(model_input)
            timesteps += [float(t)] * copies
            embeds.append(job.embeds)
            if job.added is not None:
                added.append(job.added)
            if job.rows is not None:
                selector += [job.rows[intervals.index(float(t))]] * copies
        unet = self.pipe.unet
        feeds = {"sample": unet._feed("sample", torch.cat(inputs)),
                 "timestep": torch.tensor(timesteps, dtype=torch.float32),
                 "encoder_hidden_states": unet._feed("encoder_hidden_states", torch.cat(embeds))}
        if added:
            feeds.update({name: unet._feed(name, torch.cat([a[name] for a in added])) for name in ("text_embeds", "time_ids")})
        noise = unet.engines(feeds, feeds["timestep"], selector=selector if self.multi_subject else None)
        self.calls += 1
        self.samples += noise.shape[0]
        done, offset = [], 0
        for job in list(self.active):
            copies = 2 if job.guided else 1
            pred = noise[offset:offset + copies].to(job.latents.dtype)
            offset += copies
            if job.guided:
                uncond, text = pred.chunk(2)
                pred = uncond + job.request.guidance * (text - uncond)
            t = job.timesteps[job.index]
            job.latents = job.scheduler.step(pred, t, job.latents, **job.extra, return_dict=False)[0]
            job.index += 1
            if job.index == len(job.timesteps):
                self.active.remove(job)
                done.append(job)
        if not done:
            return []
        # the requests finishing in this tick share one VAE call
        images = self._decode(torch.cat([job.latents for job in done]))
        return [(job.ticket, image) for job, image in zip(done, images)]

    def _decode(self, latents: torch.Tensor) -> list:
        """PIL images of a batch of final latents."""
        pipe = self.pipe
        config = pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if self.xl and mean is not None and std is not None:  # as the SDXL pipeline un-normalizes
            latents = latents * torch.tensor(std).view(1, -1, 1, 1) / config.scaling_factor + torch.tensor(mean).view(1, -1, 1, 1)
        else:
            latents = latents / config.scaling_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * len(image))

    def run(self, requests: list[Request]) -> list:
        """All ``requests`` to completion (as many at once as ``max_requests`` allows);
        returns their images in order."""
        tickets = [self.submit(r) for r in requests]
        done = {}
        while self.waiting or self.active:
            done.update(self.tick())
        return [done[t] for t in tickets]
