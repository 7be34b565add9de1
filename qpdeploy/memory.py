"""Peak memory of a stretch of work: CUDA max allocated on a GPU, peak resident memory on CPU.

On Linux the process's resident high-water mark can be reset (``/proc/self/clear_refs``,
value 5), so the peak of one stage (the training loop, not model loading) is measurable in
a long-lived process. Where that is not possible the process's lifetime peak is reported
(``ru_maxrss``), which can only overstate the stage's peak.
"""

from __future__ import annotations

import ctypes
import re
import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """Track peak memory on ``device`` from :meth:`reset` to :meth:`peak`.

    Attributes:
        kind: "cuda_max_allocated", "process_peak_rss" (reset worked) or
            "process_lifetime_peak_rss" (no reset possible).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "process_lifetime_peak_rss"

    def reset(self) -> "PeakMemory":
        """Start measuring now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _reset_rss_peak():
            self.kind = "process_peak_rss"
        return self

    def peak(self) -> int:
        """Peak bytes since :meth:`reset` (see :attr:`kind`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return rss_peak_bytes()


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


_LIBC = None  # glibc, loaded on first use (False: not available)


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``); False where unavailable.

    PyTorch's CPU tensors come from malloc. Freed blocks below glibc's mmap threshold (up
    to 32 MB) stay in the heap, and the holes between live blocks keep counting as resident
    memory. Training a quantized UNet makes many such holes: every layer builds a float
    copy of its weight in forward and again in backward and frees it at once, between the
    activations kept for backward. Trimming between forward and backward returns those
    pages before backward allocates its own (measured on SD 1.5: about 0.2 GB of a 2.6 GB
    peak); trimming again after the step lowered the peak by 0.04 GiB at most and made every
    next forward fault its pages in afresh (about 10% more time per step).
    """
    if not _load_libc():
        return False
    _LIBC.malloc_trim(0)
    return True


def _load_libc() -> bool:
    """Load glibc's malloc controls once; False where there is no glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return bool(_LIBC)


# glibc's mallopt parameter number, and the threshold of the low-memory mode
_M_MMAP_THRESHOLD = -3
LOW_MEMORY_MMAP_THRESHOLD = 128 * 1024


def cap_heap_retention(threshold: int = LOW_MEMORY_MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``threshold`` bytes or more from its own mapping, returned to
    the OS as soon as it is freed (glibc ``mallopt(M_MMAP_THRESHOLD)``, the process-wide
    setting ``MALLOC_MMAP_THRESHOLD_`` also gives); False where unavailable.

    glibc otherwise raises this threshold up to 32 MB as large blocks come and go, and the
    heap then keeps the freed blocks of a training step as holes between live ones. On
    SD 1.5 with gradient checkpointing this lowers the CPU peak from about 1.9 to 1.6 GiB at
    1.2-1.4x the time per step (every large tensor is a fresh mapping, zeroed by the kernel);
    ``benchmarks/train_memory.py`` measures it. The ``--low-memory`` mode of
    ``qpdeploy train``.
    """
    if not _load_libc():
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def rss_peak_bytes() -> int:
    """The process's resident-memory high-water mark in bytes."""
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def rss_bytes() -> int:
    """The process's current resident memory in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)
