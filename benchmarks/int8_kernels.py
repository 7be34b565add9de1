"""Could training run on integer kernels here? INT8 GEMM against float GEMM on this CPU.

A training step of ours converts every integer weight to float before its op (and again in
backward), where LoRA's float weights are ready. Running the forward op on the integers
themselves would skip the conversion and read a quarter of the bytes. This benchmark asks
whether the CPU it runs on can do that exactly, and how fast, on the GEMMs of SD 1.5's
linear layers at the training benchmark's 32x32 latents (``benchmarks/train_memory.py``):

- ``float``: a float32 GEMM whose float weight is ready (LoRA's frozen layers);
- ``convert_float``: int8 -> float32 conversion, then the same GEMM (what ours does);
- ``int8``: oneDNN's u8 x s8 GEMM with float32 output (``torch.ops.onednn.qlinear_pointwise``,
  the kernel PyTorch's x86 quantization lowers to), activations shifted by a zero point of 128;
- ``int_mm``: ``torch._int_mm`` (s8 x s8 -> int32) and the conversion of its sums to float32:
  what the layers' integer forward runs where it is exact (``qpdeploy.layers.IntGemmOp``).

Exactness is checked on full-range INT8 weights ([-127, 127]) and on 7-bit weights
([-63, 63]): without VNNI instructions, x86 int8 kernels multiply u8 by s8 and add pairs in
saturating int16 (``vpmaddubsw``), which 255 * 127 * 2 overflows and 255 * 63 * 2 does not.
A kernel that is fast but inexact cannot run what the engine computes; the report also says
whether ``qpdeploy.layers.int_gemm_available`` lets the layers use ``torch._int_mm`` here.

    python -m benchmarks.int8_kernels --out benchmarks/results/int8_kernels.json

Times are medians of interleaved repeats in one process (ratios side by side; absolute
milliseconds vary with load); the ratio intervals bootstrap over the rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from qpdeploy.io import write_file_atomic, write_json

# (tokens, in features, out features) of SD 1.5's linear layers at 32x32 latents, batch 1:
# attention projections and feed-forward at the 32x32, 16x16 and 8x8 levels
SD15_GEMMS = {
    "attn 32x32 (1024 x 320 -> 320)": (1024, 320, 320),
    "ff in 32x32 (1024 x 320 -> 2560)": (1024, 320, 2560),
    "attn 16x16 (256 x 640 -> 640)": (256, 640, 640),
    "ff in 16x16 (256 x 640 -> 5120)": (256, 640, 5120),
    "attn 8x8 (64 x 1280 -> 1280)": (64, 1280, 1280),
    "ff in 8x8 (64 x 1280 -> 10240)": (64, 1280, 10240),
    "ff out 8x8 (64 x 5120 -> 1280)": (64, 5120, 1280),
}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
WAYS = ("float", "convert_float", "int8", "int_mm")  # what time_gemm times, see the module docstring


def cpu_flags() -> dict:
    """Which of :data:`CPU_FLAGS` the CPU reports (Linux), and PyTorch's own capability level."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
        present = {f: f in flags for f in CPU_FLAGS}
    except (OSError, StopIteration):
        present = {}
    return {"machine": platform.machine(), "flags": present,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


class Int8Gemm:
    """``x @ w.T`` for int8 ``x`` (M, K) and int8 ``w`` (N, K), float32 result, on oneDNN.

    The activations go in as uint8 with zero point 128 (oneDNN's x86 int8 path), the weight
    prepacked once. Raises RuntimeError where this PyTorch build has no oneDNN int8 ops.
    """

    def __init__(self, w: torch.Tensor, tokens: int):
        if not hasattr(torch.ops.onednn, "qlinear_prepack"):
            raise RuntimeError("this PyTorch build has no oneDNN int8 linear")
        n = w.shape[0]
        self.packed = torch.ops.onednn.qlinear_prepack(w, [tokens, w.shape[1]])
        self.w_scales = torch.ones(n)
        self.w_zero_points = torch.zeros(n, dtype=torch.long)

    def __call__(self, x_u8: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(x_u8, 1.0, 128, self.packed, self.w_scales, self.w_zero_points,
                                                  None, 1.0, 0, torch.float32, "none", [], "")


def shifted(x: torch.Tensor) -> torch.Tensor:
    """int8 activations as the uint8 the kernel takes (zero point 128)."""
    return (x.to(torch.int16) + 128).to(torch.uint8)


def exactness(tokens: int, k: int, n: int, weight_max: int, seed: int = 0) -> dict:
    """Largest absolute difference of the int8 kernel from the exact integer sums (and the
    largest sum, for scale), for full-range int8 activations and weights drawn from
    [-weight_max, weight_max]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (tokens, k), dtype=torch.int8, generator=g)
    w = torch.randint(-weight_max, weight_max + 1, (n, k), dtype=torch.int8, generator=g)
    exact = x.double() @ w.double().T  # integer sums, exact in float64
    error = (Int8Gemm(w, tokens)(shifted(x)).double() - exact).abs().max().item()
    int_mm_error = (torch._int_mm(x, w.T).double() - exact).abs().max().item()
    return {"max_abs_error": error, "exact": error == 0.0, "largest_abs_sum": exact.abs().max().item(),
            "int_mm_max_abs_error": int_mm_error, "int_mm_exact": int_mm_error == 0.0}


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_gemm(tokens: int, k: int, n: int, repeats: int, seed: int = 0) -> dict:
    """Median milliseconds of the three ways of :mod:`this benchmark <benchmarks.int8_kernels>`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (tokens, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    x_float, w_float, x_u8 = x.float(), w.float(), shifted(x)
    scratch = torch.empty(n, k)
    int8 = Int8Gemm(w, tokens)
    ways = {"float": lambda: x_float @ w_float.T,
            "convert_float": lambda: x_float @ scratch.copy_(w).T,
            "int8": lambda: int8(x_u8),
            "int_mm": lambda: torch._int_mm(x, w.T).float()}
    for fn in ways.values():  # warm up (first calls pick kernels, touch pages)
        fn()
    return {way: _median_ms(ways[way], repeats) for way in WAYS}


def run(rounds: int = 5, repeats: int = 5, threads: int = 1, gemms: dict = SD15_GEMMS) -> dict:
    from qpdeploy.layers import int_gemm_available
    from qpdeploy.miniworld.stats import bootstrap_mean

    torch.set_num_threads(threads)
    started = time.perf_counter()
    report = {"cpu": cpu_flags(), "threads": threads, "torch": torch.__version__,
              "layers_use_int_mm": int_gemm_available()}
    try:
        shape = next(iter(gemms.values()))
        report["exactness"] = {"int8 weights [-127, 127]": exactness(*shape, weight_max=127),
                               "7-bit weights [-63, 63]": exactness(*shape, weight_max=63)}
    except RuntimeError as error:
        report["int8_kernel"] = f"unavailable: {error}"
        return report
    per_round = []
    for _ in range(rounds):  # whole rounds interleave the shapes, so load changes hit every way alike
        per_round.append({name: time_gemm(*shape, repeats) for name, shape in gemms.items()})
    report["milliseconds"] = {name: {way: statistics.median(r[name][way] for r in per_round) for way in WAYS}
                              for name in gemms}
    totals = [{way: sum(r[name][way] for name in gemms) for way in WAYS} for r in per_round]
    report["ratios_of_the_summed_gemms"] = {
        "int8 / convert_float": bootstrap_mean([[t["int8"] / t["convert_float"] for t in totals]]),
        "int_mm / convert_float": bootstrap_mean([[t["int_mm"] / t["convert_float"] for t in totals]]),
        "int8 / float": bootstrap_mean([[t["int8"] / t["float"] for t in totals]]),
        "convert_float / float": bootstrap_mean([[t["convert_float"] / t["float"] for t in totals]]),
    }
    report["setup"] = {"rounds": rounds, "repeats_per_round": repeats, "gemms": {k: list(v) for k, v in gemms.items()},
                       "seconds_total": round(time.perf_counter() - started, 1)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON report to write")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per way, shape and round (median)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: the training benchmark's setting)")
    args = parser.parse_args()
    report = run(args.rounds, args.repeats, args.threads)
    if args.out:
        write_file_atomic(args.out, lambda tmp: write_json(tmp, report))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
