"""benchmarks/int8_kernels.py: the integer GEMM it times computes the exact integer sums
where no int16 pair can saturate, and its report holds every shape, way and ratio."""

import pytest
import torch

from benchmarks import int8_kernels

if not hasattr(torch.ops.onednn, "qlinear_prepack"):
    pytest.skip("this PyTorch build has no oneDNN int8 linear", allow_module_level=True)


@pytest.mark.parametrize("tokens, k, n", [(7, 40, 24), (64, 320, 96)])
def test_seven_bit_weights_give_the_exact_integer_sums(tokens, k, n):
    result = int8_kernels.exactness(tokens, k, n, weight_max=63)
    assert result["max_abs_error"] == 0.0 and result["exact"] and result["largest_abs_sum"] > 1000


def test_the_kernel_subtracts_the_zero_point():
    x = torch.tensor([[-127, 0, 127, -1]], dtype=torch.int8)
    w = torch.tensor([[1, 2, 3, 4], [-5, 6, -7, 8]], dtype=torch.int8)
    out = int8_kernels.Int8Gemm(w, 1)(int8_kernels.shifted(x))
    assert out.tolist() == [[-127 + 381 - 4, 635 - 889 - 8]]


def test_the_report_times_every_shape_every_way():
    gemms = {"a": (16, 32, 48), "b": (8, 64, 16)}
    report = int8_kernels.run(rounds=2, repeats=1, gemms=gemms)
    assert set(report["milliseconds"]) == set(gemms)
    assert all(set(ms) == {"float", "convert_float", "int8", "int_mm"} and min(ms.values()) > 0
               for ms in report["milliseconds"].values())
    assert report["exactness"]["7-bit weights [-63, 63]"]["exact"]
    for ratio in report["ratios_of_the_summed_gemms"].values():
        assert ratio["n"] == 2 and ratio["low"] <= ratio["mean"] <= ratio["high"]
    assert set(report["cpu"]["flags"]) <= set(int8_kernels.CPU_FLAGS)
    full_range = report["exactness"]["int8 weights [-127, 127]"]
    assert full_range["int_mm_exact"] or not report["layers_use_int_mm"]  # the layers never use an inexact kernel
