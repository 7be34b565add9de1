"""Personalization by training quantization scales (``qpdeploy train``).

PEQA DreamBooth on a quantized base: the noise-prediction loss on a few instance images
(plus, optionally, the prior-preservation loss on class images the base generates itself)
trains only the layers' scale sets; integer weights, biases, text encoders and VAE stay
frozen. Strategies (docs/design.md): ``baseline`` one set over all timesteps, ``s1`` one set
trained and applied in chosen intervals, ``s2`` one set per interval, all trained in the
same mixed-interval batches with an exactly equal share of samples per interval.

:func:`train` reads as its steps:

1. load the base (or take one in memory) and check the output, the config and any checkpoint;
2. read and encode the data once (:mod:`qpdeploy.data`); the text encoders and VAE are
   then released, so the loop holds only the quantized UNet (and the VAE if validating);
3. install fresh scale sets (equal to the post-training scales) and an optimizer with one
   parameter per set (:mod:`qpdeploy.optim`), restoring a checkpoint if resuming
   (:mod:`qpdeploy.checkpoint`);
4. run the steps, with checkpoints and validation grids (:mod:`qpdeploy.validate`) in the
   run directory;
5. write the scale pack and its report atomically.

Every random draw is a pure function of the seed and the sample's position in the run
(:func:`derived_generator`), so a run resumed from a checkpoint is bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .base import QuantizedBase, load_base, load_base_pipeline, source_hash
from .checkpoint import (check_resumable, checkpoint_path, find_checkpoint, load_checkpoint, read_checkpoint_state,
                         save_checkpoint)
from .config import TrainConfig
from .data import (Examples, check_prompt, class_images, default_resolution, encode_examples, load_instance_images,
                   prompt_embeddings, read_masks, readable_images)
from .distributed import process_group
from .errors import QPDeployError
from .intervals import Intervals
from .io import check_output, claim_output, read_json
from .layers import quant_layers
from .memory import PeakMemory, release_free_heap
from .optim import ScaleSetOptimizer
from .pack import (PACK_ARTIFACT, ScalePack, init_scale_sets, num_sets_for, reset_to_post_training, save_pack,
                   scales_of, subject_set_map)
from .progress import stage
from .prompts import check_text
from .models import check_resolution, model_sampling_defaults, resolve_sampling
from .ptq import resolve_device
from .qunet import get_router
from .strategies import get_strategy
from .token import TokenTuner, identifier_token_ids
from .validate import Validator, quantized_pipeline

RUN_SUFFIX = ".run"
FINAL_LOSS_STEPS = 10  # final_loss / initial_loss: mean over this many steps at each end

# Independent random streams of a run, keyed with the seed (see derived_generator).
_IMAGES, _PRIOR, _INTERVALS, _DRAWS = 1, 2, 3, 4


def derived_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by hashing ``(seed, *keys)`` (numpy SeedSequence).

    Draws made through it depend only on the seed and on where they happen in the run
    (step, epoch, round), never on how many draws came before, which makes resuming exact.
    """
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _cycle(count: int, seed: int, stream: int, first: int, n: int) -> torch.Tensor:
    """Positions ``first .. first+n-1`` of an endless sequence of seeded permutations of ``count``."""
    out = []
    for g in range(first, first + n):
        epoch, pos = divmod(g, count)
        out.append(int(torch.randperm(count, generator=derived_generator(seed, stream, epoch))[pos]))
    return torch.tensor(out, dtype=torch.long)


class TimestepSampler:
    """Training timesteps for a strategy.

    - baseline: uniform over [0, T);
    - s1: uniform over the union of the chosen intervals;
    - s2: the run's samples are cut into rounds of K consecutive samples and each round
      holds every interval exactly once, in a seeded random order; the timestep is uniform
      inside its interval. Every interval gets an equal share of training, and a batch of
      B samples mixes min(B, K) intervals.
    """

    def __init__(self, intervals: Intervals, strategy: str, s1_intervals=(), seed: int = 0):
        self.intervals, self.strategy, self.seed = intervals, get_strategy(strategy), seed
        trained = self.strategy.trained_intervals(intervals.k, tuple(s1_intervals))
        self.segments = _merge([intervals.bounds(i) for i in trained])

    def interval_order(self, first: int, n: int) -> torch.Tensor:
        """S2: the interval of each sample ``first .. first+n-1`` of the run (rounds of K)."""
        return _cycle(self.intervals.k, self.seed, _INTERVALS, first, n)

    def draw(self, first: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Timesteps (n,) long for samples ``first .. first+n-1`` of the run."""
        if self.strategy.balanced_intervals:
            chosen = self.interval_order(first, n)
            lo = torch.tensor([self.intervals.bounds(int(i))[0] for i in chosen], dtype=torch.float64)
            hi = torch.tensor([self.intervals.bounds(int(i))[1] for i in chosen], dtype=torch.float64)
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            return (lo + torch.floor(u * (hi - lo))).long()
        lengths = torch.tensor([hi - lo for lo, hi in self.segments])
        offset = torch.randint(0, int(lengths.sum()), (n,), generator=generator)
        ends = torch.cumsum(lengths, 0)
        seg = torch.bucketize(offset, ends, right=True)
        starts = torch.tensor([lo for lo, _ in self.segments])
        return starts[seg] + offset - (ends[seg] - lengths[seg])


def _merge(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent [lo, hi) segments joined (all intervals: one segment [0, T))."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(segments):
        if merged and merged[-1][1] == lo:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


@dataclass
class Batch:
    """One micro-batch: which examples, their clean latents, noise and timesteps."""

    example: torch.Tensor  # (n,) indices into Examples
    latents: torch.Tensor  # (n, 4, h, w)
    noise: torch.Tensor  # (n, 4, h, w)
    timesteps: torch.Tensor  # (n,) long


class ScaleTrainer:
    """The training state of one personalization: scale sets, optimizer, step, losses.

    Installs fresh scale sets on ``base.unet`` (every set equal to the post-training
    scales) and freezes everything else.

    Args:
        base: the quantized base (its UNet is trained in place).
        examples: encoded data (:func:`qpdeploy.data.encode_examples`).
        config: the run's settings.
        scheduler_config: the model's noise scheduler config (betas, prediction type).
        device: where to train.
    """

    def __init__(self, base: QuantizedBase, examples: Examples, config: TrainConfig, scheduler_config: dict,
                 device="cpu", pipe=None, lane: tuple[int, int, ScaleSetOptimizer | None] | None = None,
                 group=None):
        from diffusers import DDPMScheduler

        self.base, self.config, self.device = base, config, torch.device(device)
        self.group = group  # a data-parallel ProcessGroup (qpdeploy.distributed), or None
        self.intervals = config.make_intervals(base.intervals)
        self.schedule = DDPMScheduler.from_config(scheduler_config)
        if self.schedule.config.num_train_timesteps != self.intervals.num_train_timesteps:
            raise QPDeployError(f"the scheduler has {self.schedule.config.num_train_timesteps} timesteps but the "
                                f"intervals cover {self.intervals.num_train_timesteps}")
        if not len(examples.instance):
            raise QPDeployError("no instance image to train on")
        self.examples = examples.to(self.device)
        self.batch = config.batch_for(self.intervals.k)
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.sampler = TimestepSampler(self.intervals, config.strategy, config.s1_intervals, config.seed)

        unet = base.unet.to(self.device)
        # lane = (subject index, subjects, the optimizer of subject 0): several subjects train
        # together over one set of tables (SubjectsTrainer); subject 0 installs them
        index, count, shared = lane if lane is not None else (0, 1, None)
        self.lane = (index, count)
        if shared is None:
            unet.requires_grad_(False)
            init_scale_sets(base, config.strategy, self.intervals, config.s1_intervals, config.train_input_scales,
                            count)
            names = [name for name, _ in quant_layers(unet)]
            shared = ScaleSetOptimizer(unet, config.lr, config.weight_decay, keep=config.kept_layers(names),
                                       rates=config.layer_rates(names))
        self.optimizer = shared
        self.own_sets = num_sets_for(config.strategy, self.intervals.k)
        self.first_set = index * self.own_sets
        self.set_map = subject_set_map(config.strategy, self.intervals.k, config.s1_intervals, index, count)
        self.tuner = None
        if config.train_token:  # pivotal tuning: the text encoders stay for the identifier's row
            if pipe is None:
                raise QPDeployError("--train-token needs the pipeline's text encoders")
            self.text_pipe = pipe
            self.tuner = TokenTuner(pipe, config.identifier, config.token_lr)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.unet = unet
        self.step = 0
        self.losses: list[float] = []
        self.samples_per_interval = [0] * self.intervals.k
        self._trim_heap()  # what loading the base and building the sets left free goes back to the OS

    # -- one step ----------------------------------------------------------------------
    def make_batch(self, micro: int) -> Batch:
        """Micro-batch number ``micro`` of the run (B instance samples, + B class samples)."""
        ex, cfg = self.examples, self.config
        inst = ex.instance.cpu()
        idx = inst[_cycle(len(inst), cfg.seed, _IMAGES, micro * self.batch, self.batch)]
        prior = ex.prior.cpu()
        if len(prior):
            idx = torch.cat([idx, prior[_cycle(len(prior), cfg.seed, _PRIOR, micro * self.batch, self.batch)]])
        n = len(idx)
        generator = derived_generator(cfg.seed, _DRAWS, micro)
        timesteps = self.sampler.draw(micro * n, n, generator)
        shape = (n, *ex.latent_mean.shape[1:])
        eps = torch.randn(shape, generator=generator)
        noise = torch.randn(shape, generator=generator)
        idx_d = idx.to(self.device)
        latents = ex.latent_mean[idx_d] + ex.latent_std[idx_d] * eps.to(self.device)
        return Batch(idx_d, latents, noise.to(self.device), timesteps.to(self.device))

    def loss(self, batch: Batch) -> torch.Tensor:
        """DreamBooth loss: instance MSE + prior_weight * class MSE (noise or v target)."""
        ex = self.examples
        prompt = ex.prompt_index[batch.example]
        embeds, pooled = self.prompt_embeds()
        added = None
        if pooled is not None:
            added = {"text_embeds": pooled[prompt], "time_ids": ex.time_ids[batch.example]}
        noisy = self.schedule.add_noise(batch.latents, batch.noise, batch.timesteps)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            pred = self.unet(noisy, batch.timesteps, encoder_hidden_states=embeds[prompt],
                             added_cond_kwargs=added, return_dict=False)[0]
        squared = F.mse_loss(pred.float(), self._target(batch).float(), reduction="none")  # (n, C, h, w)
        per_sample = self._pixel_mean(squared, batch)
        is_prior = ex.is_prior[batch.example]
        loss = per_sample[~is_prior].mean()
        if is_prior.any():
            loss = loss + self.config.prior_weight * per_sample[is_prior].mean()
        return loss

    def _pixel_mean(self, squared: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(n,) mean squared error per sample; with a background weight below 1, a mean
        weighted by ``w + (1 - w) * subject share`` per latent pixel (class images: plain)."""
        w, masks = self.config.background_weight, self.examples.subject_mask
        if w >= 1 or masks is None:
            return squared.mean(dim=(1, 2, 3))
        weight = w + (1.0 - w) * masks[batch.example]  # (n, 1, h, w)
        return (squared * weight).sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3)) * squared.shape[1]).clamp_min(1e-12)

    def prompt_embeds(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning per prompt row: encoded once, except the instance prompt's under
        pivotal tuning, which is encoded again at every step through the trainable row."""
        ex = self.examples
        if self.tuner is None:
            return ex.prompt_embeds, ex.pooled_embeds
        embeds, pooled = prompt_embeddings(self.text_pipe, [self.config.prompt], self.device)
        embeds = torch.cat([embeds.float(), ex.prompt_embeds[1:]])
        if pooled is not None:
            pooled = torch.cat([pooled.float(), ex.pooled_embeds[1:]])
        return embeds, pooled

    def _target(self, batch: Batch) -> torch.Tensor:
        kind = self.schedule.config.prediction_type
        if kind == "epsilon":
            return batch.noise
        if kind == "v_prediction":
            return self.schedule.get_velocity(batch.latents, batch.noise, batch.timesteps)
        if kind == "sample":
            return batch.latents
        raise QPDeployError(f"unsupported prediction type {kind!r}")

    def sets_routed(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The scale set each timestep is routed to (values >= E mean post-training)."""
        return get_router(self.unet).set_of_interval[self.intervals.index(timesteps.to(self.device))]

    def accumulate(self, trained: torch.Tensor) -> float:
        """Forward and backward of this step's ``grad_accum`` micro-batches (gradients add up);
        marks the sets they were routed to in ``trained`` and returns the step's loss."""
        total = 0.0
        if self.lane[1] > 1:  # the tables hold several subjects: route this one's calls to its sets
            get_router(self.unet).configure(self.intervals, self.optimizer.num_sets, self.set_map)
        for m in range(self.config.grad_accum):
            batch = self.make_batch(self.step * self.config.grad_accum + m)
            if self.group is None or self.group.owns(m):  # data parallel: every process draws every batch
                with self._tables_cached():
                    loss = self.loss(batch) / self.config.grad_accum
                self._trim_heap()
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
                total += float(loss.detach())
            trained[self.sets_routed(batch.timesteps).cpu()] = True
            for k in self.intervals.index(batch.timesteps.cpu()).tolist():
                self.samples_per_interval[k] += 1
        return total

    def _tables_cached(self):
        """Each layer's scale tables computed once per forward instead of at every use (they
        are parametrized, :mod:`qpdeploy.optim`). Not with gradient checkpointing: its
        recomputation in backward runs outside the cache and must repeat the forward's ops."""
        return contextlib.nullcontext() if self.config.gradient_checkpointing else parametrize.cached()

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's loss."""
        trained = torch.zeros(self.optimizer.num_sets + 1, dtype=torch.bool)
        total = self.accumulate(trained)
        if self.group is not None:
            self.optimizer.sum_gradients(trained[:-1].tolist(), self.group.sum_)
            total = float(self.group.sum_(torch.tensor([total], dtype=torch.float64, device=self.device)))
        self.optimizer.step(trained[:-1].tolist(), self.scaler)
        if self.tuner is not None:
            self.tuner.step(self.scaler)
        if self.scaler is not None:
            self.scaler.update()
        # No trim here: the next forward reuses backward's free blocks; trimming them made it
        # fault fresh pages in (measured on SD 1.5: about 10% more time per step for a peak at
        # most 0.04 GiB lower; README, "Training memory").
        self.step += 1
        self.losses.append(total)
        return total

    def _trim_heap(self) -> None:
        """On CPU, return the heap holes left by the layers' transient float weights (see
        :func:`qpdeploy.memory.release_free_heap`); numbers are unaffected."""
        if self.device.type == "cpu":
            release_free_heap()

    def finish(self) -> None:
        """End training: scales frozen again, checkpointing off, UNet in eval mode."""
        self.optimizer.release()
        if self.tuner is not None:
            self.tuner.release()
        if self.config.gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()
        self.unet.eval()

    def pack(self, meta: dict | None = None) -> ScalePack:
        """The trained scale sets as a :class:`ScalePack` bound to the base."""
        cfg = self.config
        info = {"prompt": cfg.prompt, "class_prompt": cfg.class_prompt, "identifier": cfg.identifier,
                "steps": self.step, "train": cfg.to_json(), **(meta or {})}
        token = {"identifier": cfg.identifier, "ids": self.tuner.ids} if self.tuner is not None else None
        own = slice(self.first_set, self.first_set + self.own_sets)
        scales = {k: v[own].clone() for k, v in scales_of(self.unet).items()}
        return ScalePack(cfg.strategy, self.intervals, self.base.base_hash, scales,
                         cfg.s1_intervals, info, token, self.tuner.tensors() if self.tuner is not None else {})

    @property
    def trainable_params(self) -> int:
        """Scale values of this subject's sets, plus the identifier rows under pivotal tuning."""
        return self.optimizer.size * self.own_sets + (self.tuner.size if self.tuner is not None else 0)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on a device (None: plain fp32)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise QPDeployError(f"precision {precision} needs a CUDA device; on {device.type} training runs in fp32")
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


# --------------------------------------------------------------------------------------
# Data preparation (the only stage that uses the full pipeline)
# --------------------------------------------------------------------------------------

def prepare_data(base: QuantizedBase, images, config: TrainConfig, pipe=None, class_dir=None, device="cpu",
                 show_progress: bool | str = False, source=None, config_dir=None):
    """Read and encode everything the loop needs, then let the encoders go.

    Args:
        base: the quantized base; class images are sampled with its post-training scales.
        images: folder of instance images.
        pipe: the base's source pipeline (None: :func:`qpdeploy.base.load_base_pipeline`
            with ``source`` and ``config_dir``); its content must match the base's source hash.

    Returns:
        ``(examples, scheduler_config, validator or None, resolution, pipe)``; ``pipe`` (the
        pipeline over the quantized UNet) is kept only for pivotal tuning (else None).
    """
    if pipe is None:
        pipe = load_base_pipeline(base, source, config_dir)
    elif "source_hash" in base.meta and source_hash(pipe) != base.meta["source_hash"]:
        raise QPDeployError("the pipeline given differs from the one this base was quantized from")
    reset_to_post_training(base)
    pipe = quantized_pipeline(pipe, base.unet)
    pipe.to(device)
    check_resolution(pipe, config.resolution, "resolution")
    resolution = config.resolution or default_resolution(pipe)
    check_prompt(config.prompt, config.identifier, pipe.tokenizer)
    if config.train_token:
        identifier_token_ids(pipe, config.identifier)  # one token, or fail before any long work
    instance = load_instance_images(images, resolution, config.crop, config.crops_per_image, config.seed,
                                    masks=config.background_weight < 1)
    steps, guidance = resolve_sampling(model_sampling_defaults(pipe), config.sample_steps, config.guidance)
    prior = []
    if config.prior_images:
        with stage("class images", config.prior_images, show_progress) as advance:
            prior = class_images(pipe, base.base_hash, config.class_prompt, config.prior_images, resolution,
                                 class_dir, steps, guidance, config.seed, advance)
    examples = encode_examples(pipe, instance, config.prompt, prior, config.class_prompt, device)
    examples.meta["resolution"] = resolution
    validator = (Validator(pipe, base.unet, config, resolution, device, (steps, guidance))
                 if config.validate_every else None)
    return examples, dict(pipe.scheduler.config), validator, resolution, (pipe if config.train_token else None)


# --------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------

def train(base, images, out, config: TrainConfig, *, pipe=None, source=None, config_dir=None, run_dir=None,
          class_dir=None, resume=None, device="auto", force: bool = False,
          show_progress: bool | str = False) -> tuple[Path, dict]:
    """Personalize a quantized base on a folder of images and write a scale pack.

    Args:
        base: a base directory or a loaded :class:`QuantizedBase` (whose UNet ends up
            holding the trained scales).
        images: folder of 3-10 instance images.
        out: the pack directory to write (atomically; an existing one needs ``force``).
        config: the run's settings.
        pipe: the base's source pipeline, if already loaded.
        source, config_dir: where the base's source model is now (it moved) and the configs
            of a single-file source (see :func:`qpdeploy.base.load_base_pipeline`).
        run_dir: where checkpoints and validation grids go (default ``<out>.run``).
        class_dir: root of the class-image cache (default ``~/.cache/qpdeploy/class-images``).
        resume: a checkpoint folder or run directory to continue from.

    Returns:
        ``(pack path, report)``; the report is also the pack's report.json.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else Path(f"{out}{RUN_SUFFIX}")
    base_dir = base.path if isinstance(base, QuantizedBase) else base
    inputs = [base_dir, images, source, config_dir, class_dir, resume]
    # 1. inputs: fail on bad ones before any long work
    check_train_inputs(images, config, out, force, inputs, run_dir, resume)
    group = process_group(cpu=str(device) == "cpu")
    if group is not None and not group.is_main:  # data parallel: process 0 writes everything
        return _train(base, images, out, config, pipe, source, config_dir, run_dir, class_dir, resume, device,
                      force, False, start, group)
    with claim_output(out, force, PACK_ARTIFACT, inputs):
        return _train(base, images, out, config, pipe, source, config_dir, run_dir, class_dir, resume, device,
                      force, show_progress, start, group)


def check_train_inputs(images, config: TrainConfig, out, force: bool, inputs, run_dir=None, resume=None) -> None:
    """Everything about a run that can be checked without a model: the text options, the
    instance images (each is decoded once), the pack output and the run directory.
    ``qpdeploy train --model`` calls it before quantizing.

    Raises:
        QPDeployError: one line naming the problem.
    """
    for name in ("prompt", "class_prompt", "identifier", "validation_prompt"):
        check_text(getattr(config, name), f"--{name.replace('_', '-')}")
    if config.train_token and len(config.identifier.split()) != 1:  # the tokenizer's verdict comes with the model
        raise QPDeployError(f"--train-token needs a one-word identifier, got {config.identifier!r}")
    readable = readable_images(images)
    if config.background_weight < 1:
        read_masks(readable)
    check_output(out, force, PACK_ARTIFACT, inputs)
    run_dir = Path(run_dir) if run_dir is not None else Path(f"{out}{RUN_SUFFIX}")
    # A resumed run reads its checkpoint from inside the run dir: that overlap is the point.
    check_output(run_dir, True, None, [i for i in inputs if i is not None and i is not resume])


def _train(base, images, out, config, pipe, source, config_dir, run_dir, class_dir, resume, device, force,
           show_progress, start, group=None):
    """The body of :func:`train`, run while the output is claimed (by process 0 of a
    data-parallel ``group``; the others write nothing and return ``(None, report)``)."""
    # 1. inputs
    base = base if isinstance(base, QuantizedBase) else load_base(base)
    device = group.device if group is not None and str(device) == "auto" else resolve_device(device)
    autocast_dtype(config.precision, device)
    config.make_intervals(base.intervals)
    config.layer_rates(name for name, _ in quant_layers(base.unet))  # kept and rated layers: before data
    checkpoint = None
    if resume is not None:
        checkpoint = find_checkpoint(resume)
        check_resumable(read_checkpoint_state(checkpoint), base.base_hash, config, checkpoint)

    # 2. data, encoded once; the encoders are released with the pipeline (process 0 first: it
    # fills the class-image cache the others then read)
    with group.accelerator.main_process_first() if group is not None else contextlib.nullcontext():
        examples, scheduler_config, validator, resolution, pipe = prepare_data(
            base, images, config, pipe, class_dir, device, show_progress, source, config_dir)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3. scale sets, optimizer, checkpoint
    trainer = ScaleTrainer(base, examples, config, scheduler_config, device, pipe, group=group)
    writer = group is None or group.is_main
    pipe = None  # the trainer keeps the text encoders it needs (pivotal tuning), nothing else
    resumed = load_checkpoint(trainer, checkpoint) if checkpoint is not None else None

    # 4. the loop
    memory = PeakMemory(device).reset()
    try:
        run_training(trainer, run_dir, validator if writer else None, show_progress, checkpoints=writer)
        peak = memory.peak()
    finally:  # even when the loop stops (Ctrl-C, an error), the caller's base is left frozen and plain
        trainer.finish()

    # 5. the pack
    report = run_report(trainer, examples, resolution, device, time.perf_counter() - start, peak, memory.kind,
                        resumed)
    if group is not None:
        report["processes"] = group.world
    if not writer:
        return None, report
    path = save_pack(out, trainer.pack({"instance_images": examples.meta["instance_images"]}), report, force)
    return path, read_json(path / "report.json")


def run_report(trainer: ScaleTrainer, examples, resolution: int, device, seconds: float, peak: int, peak_kind: str,
               resumed: int | None) -> dict:
    """A pack's report.json: what one subject's training did, cost and saw."""
    n = max(1, min(FINAL_LOSS_STEPS, len(trainer.losses) // 2))
    return {
        "strategy": trainer.config.strategy,
        "trainable_params": trainer.trainable_params,
        "token_params": trainer.tuner.size if trainer.tuner is not None else 0,
        "pack_bytes": None,  # filled in by save_pack
        "steps": trainer.step,
        "final_loss": float(np.mean(trainer.losses[-n:])),
        "seconds": seconds,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "initial_loss": float(np.mean(trainer.losses[:n])),
        "num_sets": trainer.own_sets,
        "intervals": list(trainer.intervals.boundaries),
        "s1_intervals": list(trainer.config.s1_intervals),
        "samples_per_interval": trainer.samples_per_interval,
        "batch_size": trainer.batch,
        "instance_images": len(examples.meta["instance_images"]),
        "class_images": examples.meta["class_images"],
        "resolution": resolution,
        "device": str(device),
        "resumed_from_step": resumed,
        "base_hash": trainer.base.base_hash,
    }


def run_training(trainer: ScaleTrainer, run_dir: Path, validator=None, show_progress: bool | str = False,
                 checkpoints: bool = True) -> None:
    """Step until ``config.steps``, writing checkpoints (unless ``checkpoints`` is False: a
    data-parallel process other than 0) and validation grids on schedule."""
    cfg = trainer.config
    with stage("train", cfg.steps, show_progress) as advance:
        advance(trainer.step)
        while trainer.step < cfg.steps:
            tick = time.perf_counter()
            loss = trainer.train_step()
            advance(loss=loss, it_s=1.0 / max(time.perf_counter() - tick, 1e-9))
            if checkpoints and cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
                save_checkpoint(trainer, checkpoint_path(run_dir, trainer.step))
            if validator is not None and trainer.step % cfg.validate_every == 0:
                validator(trainer.unet, run_dir / "validation" / f"step-{trainer.step:06d}.png")
