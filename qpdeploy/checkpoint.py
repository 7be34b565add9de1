"""Training checkpoints: everything needed to continue a run bit for bit, without pickle.

A checkpoint is a directory (written atomically) holding

- ``state.safetensors``: per scale set its trained values (``optim.delta.<e>``) and AdamW
  state (``optim.adam.<e>.exp_avg`` / ``exp_avg_sq`` / ``step``), with pivotal tuning the
  identifier rows and their AdamW state (``token.row.<encoder>``, ``token.adam.<encoder>.*``),
  and the torch RNG states (``rng.torch``, ``rng.cuda.<i>``);
- ``state.json``: format version, step, base hash, the :class:`~qpdeploy.config.TrainConfig`,
  AdamW's hyperparameters (and the rows' as ``token_adamw``), the loss of every step so far,
  samples per interval, and the SHA-256 of the tensors file.

Data order, timesteps and noise are pure functions of the seed and the step
(:func:`qpdeploy.train.derived_generator`), so they need no saved state. A run directory
keeps its checkpoints as ``checkpoints/step-NNNNNN``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import TrainConfig
from .errors import QPDeployError
from .io import atomic_dir, check_format_version, file_sha256, read_json, write_json

CHECKPOINT_KIND = "qpdeploy.train-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
STATE_FILE, TENSORS_FILE = "state.json", "state.safetensors"


def save_checkpoint(trainer, folder) -> Path:
    """Write a :class:`~qpdeploy.train.ScaleTrainer`'s state to ``folder`` atomically."""
    from safetensors.torch import save_file

    tensors = {f"optim.{k}": v for k, v in trainer.optimizer.state_tensors().items()}
    if trainer.tuner is not None:
        tensors.update({f"token.{k}": v for k, v in trainer.tuner.state_tensors().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    with atomic_dir(folder, force=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
        write_json(tmp / STATE_FILE, {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "kind": CHECKPOINT_KIND,
            "step": trainer.step,
            "base_hash": trainer.base.base_hash,
            "train": trainer.config.to_json(),
            "adamw": trainer.optimizer.hyperparameters(),
            **({"token_adamw": trainer.tuner.hyperparameters()} if trainer.tuner is not None else {}),
            "losses": trainer.losses,
            "samples_per_interval": trainer.samples_per_interval,
            **({"lanes": trainer.lane_state()} if hasattr(trainer, "lane_state") else {}),
            "tensors_sha256": file_sha256(tmp / TENSORS_FILE),
        })
    return Path(folder)


def load_checkpoint(trainer, folder) -> int:
    """Restore a checkpoint into a freshly built trainer; returns the checkpoint's step.

    Raises:
        QPDeployError: another base, other training settings (only
            ``TrainConfig.RUN_CONTROL`` fields may change), or a damaged checkpoint.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    state = read_checkpoint_state(folder)
    check_resumable(state, trainer.base.base_hash, trainer.config, folder)
    tensors = load_file(str(folder / TENSORS_FILE))
    trainer.optimizer.load_state({k.removeprefix("optim."): v for k, v in tensors.items() if k.startswith("optim.")},
                                 state["adamw"])
    if trainer.tuner is not None:
        trainer.tuner.load_state({k.removeprefix("token."): v for k, v in tensors.items() if k.startswith("token.")},
                                 state["token_adamw"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda])
    trainer.step = state["step"]
    trainer.losses = list(state["losses"])
    if hasattr(trainer, "load_lane_state"):  # several subjects (qpdeploy.multisubject)
        if "lanes" not in state:
            raise QPDeployError(f"checkpoint {folder} is a one-subject run; resume it without --subjects")
        trainer.load_lane_state(state["lanes"], folder)
    else:
        if "lanes" in state:
            raise QPDeployError(f"checkpoint {folder} holds {len(state['lanes'])} subjects; resume it with --subjects")
        trainer.samples_per_interval = list(state["samples_per_interval"])
    return trainer.step


def read_checkpoint_state(folder: Path) -> dict:
    """Read and validate a checkpoint's state.json (and its tensors' hash)."""
    state = read_json(folder / STATE_FILE)
    if state.get("kind") != CHECKPOINT_KIND:
        raise QPDeployError(f"{folder} is not a qpdeploy training checkpoint")
    check_format_version("training checkpoint", state.get("format_version"), CHECKPOINT_FORMAT_VERSION,
                         folder / STATE_FILE)
    tensors = folder / TENSORS_FILE
    if not tensors.is_file() or file_sha256(tensors) != state.get("tensors_sha256"):
        raise QPDeployError(f"checkpoint {folder} is incomplete or corrupted ({TENSORS_FILE})")
    return state


def check_resumable(state: dict, base_hash: str, config: TrainConfig, folder) -> None:
    """Refuse a checkpoint of another base, other settings, or beyond ``config.steps``."""
    if state["base_hash"] != base_hash:
        raise QPDeployError(f"checkpoint {folder} was trained on base {state['base_hash'][:12]}, "
                            f"not on this base {base_hash[:12]}")
    compare_settings(state["train"], config, folder)
    if state["step"] > config.steps:
        raise QPDeployError(f"checkpoint {folder} is at step {state['step']}, beyond --steps {config.steps}")


def compare_settings(saved: dict, config: TrainConfig, folder) -> None:
    """Refuse a checkpoint whose settings (``saved``, a TrainConfig as JSON) differ from
    ``config`` in anything but the run-control fields."""
    # Read back through the config class: a field added after the checkpoint was written takes
    # its default, so a newer qpdeploy resumes an older run whose settings it can express.
    saved, now = TrainConfig.from_json(saved, str(folder)).to_json(), config.to_json()
    for key in now:
        if key not in TrainConfig.RUN_CONTROL and saved.get(key) != now[key]:
            raise QPDeployError(f"checkpoint {folder} was trained with {key}={saved.get(key)!r}, this run has "
                                f"{now[key]!r}; on resume only {', '.join(TrainConfig.RUN_CONTROL)} may change")


def find_checkpoint(path) -> Path:
    """A checkpoint folder, or the latest checkpoint of a run directory (or of its checkpoints/).

    Raises:
        QPDeployError: nothing resumable at ``path``.
    """
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        steps = sorted(s for s in folder.glob("step-*") if (s / STATE_FILE).is_file()) if folder.is_dir() else []
        if steps:
            return steps[-1]
    raise QPDeployError(f"no training checkpoint at {path}")


def checkpoint_path(run_dir, step: int) -> Path:
    """Where a run directory keeps its checkpoint of ``step``."""
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"
