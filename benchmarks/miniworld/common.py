"""Helpers the miniworld recipes share: threads and seeds, the shipped report, timing."""

from __future__ import annotations

import json
import os
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
