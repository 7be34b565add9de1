"""Several subjects personalized in one run over one frozen base (``qpdeploy train --subjects``).

Each subject gets its own block of the strategy's scale sets in the same layer tables
(subject i owns sets ``i * E .. i * E + E - 1``) and is an ordinary lane of
:class:`~qpdeploy.train.ScaleTrainer`: its own images, prompts, class images and random
streams, exactly those of training it alone with the same settings. A step runs each
subject's micro-batches in turn (forward and backward, routed to its sets), then one AdamW
step over every set that was routed to; a subject's sets receive only its own gradients, so
its pack is bit for bit the pack of training it alone (tested), and the peak memory is that
of one subject's micro-batch. Checkpoints hold every subject's sets and AdamW state; a
resumed run ends bit-identical to an uninterrupted one.

The subjects file (TOML) lists the subjects; ``images`` is relative to the file::

    [[subject]]
    identifier = "sks"
    images = "photos/dog"
    prompt = "a photo of sks dog"
    class_prompt = "a photo of a dog"   # optional: prior preservation (with --prior-images)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import QPDeployError
from .io import check_output, claim_output, read_json
from .pack import PACK_ARTIFACT, save_pack

SUBJECT_KEYS = {"identifier", "images", "prompt", "class_prompt"}


@dataclass(frozen=True)
class SubjectSpec:
    """One subject of a subjects file: its identifier word, instance images and prompts."""

    identifier: str
    images: Path
    prompt: str
    class_prompt: str | None = None

    def config(self, shared: TrainConfig, prior_images: int = 0) -> TrainConfig:
        """The subject's own run settings: ``shared`` with its prompts, and ``prior_images``
        class images when it has a class prompt (its class prompt is used only then)."""
        prior = bool(prior_images and self.class_prompt)
        return dataclasses.replace(shared, prompt=self.prompt, identifier=self.identifier,
                                   class_prompt=self.class_prompt if prior else None,
                                   prior_images=prior_images if prior else 0)


def read_subjects(path) -> list[SubjectSpec]:
    """Read a subjects file (see module doc).

    Raises:
        QPDeployError: not TOML, no ``[[subject]]``, a missing or unknown key, two subjects
            with one identifier (one line naming the file and the entry).
    """
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise QPDeployError(f"cannot read subjects file {path}: {exc}") from None
    entries = data.get("subject")
    if not isinstance(entries, list) or not entries:
        raise QPDeployError(f"subjects file {path} lists no [[subject]]")
    specs = []
    for n, entry in enumerate(entries, 1):
        where = f"{path}, subject {n}"
        if not isinstance(entry, dict):
            raise QPDeployError(f"{where}: not a table")
        unknown = set(entry) - SUBJECT_KEYS
        missing = {"identifier", "images", "prompt"} - set(entry)
        if unknown or missing:
            raise QPDeployError(f"{where}: {'unknown key ' + sorted(unknown)[0] if unknown else 'missing ' + sorted(missing)[0]}")
        if not all(isinstance(entry[k], str) and entry[k].strip() for k in entry):
            raise QPDeployError(f"{where}: every value must be a non-empty string")
        specs.append(SubjectSpec(entry["identifier"], path.parent / entry["images"], entry["prompt"],
                                 entry.get("class_prompt")))
    seen = [s.identifier for s in specs]
    twice = next((i for i in seen if seen.count(i) > 1), None)
    if twice is not None:
        raise QPDeployError(f"subjects file {path} names subject {twice!r} twice")
    return specs


class SubjectsTrainer:
    """Several :class:`~qpdeploy.train.ScaleTrainer` lanes over one UNet and one optimizer.

    Exposes what checkpoints and the loop read from a trainer: ``optimizer``, ``step``,
    ``losses`` (the sum over subjects per step), ``samples_per_interval`` (summed),
    ``config`` (subject 0's, for the settings every subject shares) and ``base``.
    """

    tuner = None

    def __init__(self, lanes: list):
        self.lanes = lanes
        self.base, self.config, self.optimizer = lanes[0].base, lanes[0].config, lanes[0].optimizer
        self.unet = lanes[0].unet
        self.scaler = lanes[0].scaler
        for lane in lanes[1:]:  # fp16 on CUDA: one loss scale for the one optimizer step
            lane.scaler = self.scaler
        self.step = 0
        self.losses: list[float] = []

    @property
    def samples_per_interval(self) -> list[int]:
        return [sum(col) for col in zip(*(lane.samples_per_interval for lane in self.lanes))]

    def train_step(self) -> float:
        """Every subject's micro-batches, then one optimizer step; returns the summed loss."""
        trained = torch.zeros(self.optimizer.num_sets + 1, dtype=torch.bool)
        losses = [lane.accumulate(trained) for lane in self.lanes]
        self.optimizer.step(trained[:-1].tolist(), self.scaler)
        if self.scaler is not None:
            self.scaler.update()
        for lane, loss in zip(self.lanes, losses):
            lane.step += 1
            lane.losses.append(loss)
        self.step += 1
        self.losses.append(float(sum(losses)))
        return self.losses[-1]

    def finish(self) -> None:
        self.lanes[0].finish()

    def lane_state(self) -> list[dict]:
        """What a checkpoint keeps per subject (its settings, losses and samples per interval)."""
        return [{"train": lane.config.to_json(), "losses": lane.losses,
                 "samples_per_interval": lane.samples_per_interval} for lane in self.lanes]

    def load_lane_state(self, lanes: list[dict], folder) -> None:
        """Restore :meth:`lane_state` (after the optimizer state), checking every subject's
        settings against this run's."""
        from .checkpoint import compare_settings

        if len(lanes) != len(self.lanes):
            raise QPDeployError(f"checkpoint {folder} holds {len(lanes)} subjects, this run has {len(self.lanes)}")
        for lane, saved in zip(self.lanes, lanes):
            compare_settings(saved["train"], lane.config, folder)
            lane.losses, lane.samples_per_interval = list(saved["losses"]), list(saved["samples_per_interval"])
            lane.step = self.step


def train_subjects(base, subjects: list[SubjectSpec], out, config: TrainConfig, *, prior_images: int = 0,
                   pipe=None, source=None, config_dir=None, run_dir=None, class_dir=None, resume=None,
                   device="auto", force: bool = False, show_progress: bool | str = False) -> tuple[Path, dict]:
    """Personalize ``subjects`` together on one base; writes ``out/<identifier>/`` packs.

    ``config`` holds the settings every subject shares (strategy, intervals, steps, batch,
    learning rates...; its prompt, identifier and class prompt are the subjects'); each
    subject adds its prompts and images, and ``prior_images`` class images when it has a
    class prompt. Returns ``(out, {identifier: report})``.

    Raises:
        QPDeployError: bad input (named), before any long work.
    """
    from .base import QuantizedBase, load_base, load_base_pipeline
    from .checkpoint import find_checkpoint, load_checkpoint, read_checkpoint_state
    from .memory import PeakMemory
    from .ptq import resolve_device
    from .train import (RUN_SUFFIX, ScaleTrainer, autocast_dtype, check_train_inputs, prepare_data, run_report,
                        run_training)

    start = time.perf_counter()
    if config.train_token:
        raise QPDeployError("--train-token trains one identifier row per run; train such subjects one at a time")
    if config.validate_every:
        raise QPDeployError("validation grids are drawn for one subject; train with --validate-every 0 here")
    out = Path(out)
    run_dir = Path(run_dir) if run_dir is not None else Path(f"{out}{RUN_SUFFIX}")
    base_dir = base.path if isinstance(base, QuantizedBase) else base
    outs = {s.identifier: out / s.identifier for s in subjects}
    inputs = [base_dir, *(s.images for s in subjects), source, config_dir, class_dir, resume]
    for spec in subjects:
        check_train_inputs(spec.images, spec.config(config, prior_images), outs[spec.identifier], force, inputs, run_dir, resume)
    check_output(out, True, None, [i for i in inputs if i is not None])
    with contextlib.ExitStack() as claims:
        for path in outs.values():
            claims.enter_context(claim_output(path, force, PACK_ARTIFACT, inputs))
        base = base if isinstance(base, QuantizedBase) else load_base(base)
        device = resolve_device(device)
        autocast_dtype(config.precision, device)
        config.make_intervals(base.intervals)
        checkpoint = find_checkpoint(resume) if resume is not None else None
        if checkpoint is not None:  # every subject's settings are compared once the lanes exist
            from .checkpoint import check_resumable

            check_resumable(read_checkpoint_state(checkpoint), base.base_hash, subjects[0].config(config, prior_images), checkpoint)
        # data of every subject, encoded once with one pipeline
        pipe = pipe if pipe is not None else load_base_pipeline(base, source, config_dir)
        prepared = [prepare_data(base, s.images, s.config(config, prior_images), pipe, class_dir, device, show_progress)
                    for s in subjects]
        pipe = None
        gc.collect()
        lanes, shared = [], None
        for i, (spec, (examples, scheduler_config, _, resolution, _)) in enumerate(zip(subjects, prepared)):
            lane = ScaleTrainer(base, examples, spec.config(config, prior_images), scheduler_config, device, None,
                                (i, len(subjects), shared))
            shared = lane.optimizer
            lanes.append(lane)
        trainer = SubjectsTrainer(lanes)
        resumed = None
        if checkpoint is not None:
            resumed = load_checkpoint(trainer, checkpoint)
        memory = PeakMemory(device).reset()
        try:
            run_training(trainer, run_dir, None, show_progress)
            peak = memory.peak()
        finally:
            trainer.finish()
        reports = {}
        seconds = time.perf_counter() - start
        for spec, lane, (examples, _, _, resolution, _) in zip(subjects, lanes, prepared):
            report = {**run_report(lane, examples, resolution, device, seconds, peak, memory.kind, resumed),
                      "subjects_trained_together": [s.identifier for s in subjects]}
            pack = lane.pack({"instance_images": examples.meta["instance_images"]})
            path = save_pack(outs[spec.identifier], pack, report, force)
            reports[spec.identifier] = read_json(path / "report.json")
    return out, reports
