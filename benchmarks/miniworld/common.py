"""Helpers the miniworld recipes share: threads and seeds, the shipped report, timing."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[2] / "qpdeploy" / "assets" / "miniworld"
REPORT_NAME = "report.json"


def setup(threads: int, seed: int) -> None:
    """Fix torch's thread count and every random seed the recipes use."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)


def update_report(folder: Path, section: str, data: dict) -> Path:
    """Replace one section of ``folder/report.json`` (other sections are kept), atomically."""
    path = Path(folder) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    report[section] = data
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def folder_megabytes(folder: Path, pattern: str = "*.safetensors") -> float:
    """Total size in MB (10^6 bytes) of the files matching ``pattern`` under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob(pattern)) / 1e6


class Clock:
    """Wall and CPU time since creation, and a progress line printer with an ETA."""

    def __init__(self):
        self.start = time.time()
        self.cpu_start = time.process_time()

    def seconds(self) -> float:
        return time.time() - self.start

    def cpu_seconds(self) -> float:
        """CPU time of this process, all threads: on a busy machine, cpu / threads is the
        wall time the same work takes with the cores to itself."""
        return time.process_time() - self.cpu_start

    def log(self, step: int, total: int, **values) -> None:
        done = self.seconds()
        eta = done / max(step, 1) * (total - step)
        fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"[{done / 60:6.1f} min] step {step}/{total} {fields} eta {eta / 60:.1f} min", flush=True)


def bind_work(work: Path, settings: dict) -> None:
    """Tie a work folder (checkpoints of a resumable run) to the run's ``settings``, kept in its
    ``settings.json``: resuming it with other settings would mix two runs, so that exits."""
    work.mkdir(parents=True, exist_ok=True)
    path, mine = work / "settings.json", json.loads(json.dumps(settings, default=str))
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")) != mine:
        sys.exit(f"error: {work} holds a run with other settings ({path}); use another --work or remove it")
    path.write_text(json.dumps(mine, indent=2) + "\n", encoding="utf-8")


class LoopCheckpoint:
    """Resumable training loops for the rebuild recipes: every ``every`` steps the loop's
    modules, optimizer, learning-rate schedule and random generators go to ``folder``
    (``state.safetensors`` + ``state.json``, written together by ``qpdeploy.io.atomic_dir``,
    so a kill leaves the previous checkpoint whole, never a mix of two). :meth:`load` puts them back and returns the
    step to continue after, so an interrupted run ends bit-identical to an uninterrupted one.
    No pickle: tensors in safetensors, everything else in JSON.
    """

    def __init__(self, folder: Path | None, every: int = 500):
        self.folder, self.every = (Path(folder) if folder is not None else None), every

    def due(self, step: int, steps: int) -> bool:
        return self.folder is not None and (step % self.every == 0 or step == steps)

    def save(self, step: int, modules: dict, optimizer, schedule, rng, generator) -> None:
        from safetensors.torch import save_file

        tensors = {f"module.{name}.{k}": v.detach().cpu().contiguous().clone()
                   for name, module in modules.items() for k, v in module.state_dict().items()}
        optim = optimizer.state_dict()
        for index, state in optim["state"].items():
            tensors.update({f"optim.{index}.{k}": v.detach().cpu().contiguous().clone() for k, v in state.items()})
        tensors["generator"] = generator.get_state()
        meta = {"step": step, "param_groups": optim["param_groups"], "schedule": schedule.state_dict(),
                "optim_keys": {str(i): sorted(s) for i, s in optim["state"].items()},
                "numpy": rng.bit_generator.state}
        meta["schedule"].pop("lr_lambdas", None)  # functions: rebuilt by the caller
        from qpdeploy.io import atomic_dir

        with atomic_dir(self.folder, force=True) as tmp:
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")

    def load(self, modules: dict, optimizer, schedule, rng, generator) -> int:
        """Restore the latest checkpoint into the given objects; returns its step (0: none)."""
        if self.folder is None or not (self.folder / "state.json").is_file():
            return 0
        from safetensors.torch import load_file

        tensors = load_file(str(self.folder / "state.safetensors"))
        meta = json.loads((self.folder / "state.json").read_text(encoding="utf-8"))
        for name, module in modules.items():
            prefix = f"module.{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        state = {int(i): {k: tensors[f"optim.{i}.{k}"] for k in keys} for i, keys in meta["optim_keys"].items()}
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        schedule.load_state_dict({**meta["schedule"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        rng.bit_generator.state = meta["numpy"]
        generator.set_state(tensors["generator"])
        print(f"resumed from {self.folder} at step {meta['step']}", flush=True)
        return int(meta["step"])
