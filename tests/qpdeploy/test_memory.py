"""Heap controls of CPU training: the float copies of integer weights reuse one buffer, and
the low-memory mode serves large blocks from mappings that go back to the OS when freed."""

import subprocess
import sys

import pytest
import torch

from qpdeploy.layers import QuantConv2d, QuantLinear, _scratch


def test_float_weights_share_one_scratch_buffer_per_dtype():
    conv = QuantConv2d(8, 16, 3)
    conv.set_int_weight(torch.randint(-127, 128, (16, 8, 3, 3), dtype=torch.int8))
    linear = QuantLinear(4, 6)
    linear.set_int_weight(torch.randint(-127, 128, (6, 4), dtype=torch.int8))
    a = conv.float_int_weight(conv.w_int, torch.float32)
    assert torch.equal(a, conv.w_int.float())
    b = linear.float_int_weight(linear.w_int, torch.float32)
    assert torch.equal(b, linear.w_int.float())
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # the same memory, reused
    assert _scratch(10, torch.float64).untyped_storage().data_ptr() != a.untyped_storage().data_ptr()


@pytest.mark.parametrize("size", [2, 12])  # output smaller than the weight (scaled after), larger (before)
def test_a_quantized_layer_computes_the_same_in_float32_and_float64(size):
    """float32 multiplies s_ptq on whichever is smaller, the output or the weight; either way
    the result matches the weight-scaled product computed in float64 to float32 rounding,
    forward and backward."""
    torch.manual_seed(0)
    conv = QuantConv2d(8, 16, 3, padding=1, act_bits=None)
    conv.set_int_weight(torch.randint(-127, 128, (16, 8, 3, 3), dtype=torch.int8))
    conv.s_ptq = torch.rand(16) * 1e-2 + 1e-3
    x = torch.randn(2, 8, size, size, requires_grad=True)
    assert (conv.output_numel(x) < conv.weight_shape.numel()) == (size == 2)
    y = conv(x)
    y.square().sum().backward()
    weight = conv.w_int.double() * conv.s_ptq.double().view(-1, 1, 1, 1)
    x64 = x.detach().double().requires_grad_(True)
    y64 = torch.nn.functional.conv2d(x64, weight, padding=1)
    y64.square().sum().backward()
    for ours, exact in ((y, y64), (x.grad, x64.grad)):
        assert (ours.double() - exact).abs().max() <= 1e-6 * exact.abs().max()  # float32 rounding


PROBE = """
import ctypes, sys, torch
from qpdeploy.memory import cap_heap_retention
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = Info
if sys.argv[1] == "capped":
    assert cap_heap_retention()
for _ in range(3):  # large blocks come and go: by default glibc raises its mmap threshold past 1 MiB
    t = torch.empty(8 << 20, dtype=torch.uint8)
    del t
before = libc.mallinfo2().hblkhd
t = torch.empty(1 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc controls")
def test_capped_heap_serves_a_one_megabyte_block_from_its_own_mapping():
    probes = {mode: subprocess.Popen([sys.executable, "-c", PROBE, mode], stdout=subprocess.PIPE, text=True)
              for mode in ("default", "capped")}  # the two start-ups (torch imports) overlap
    printed = {mode: probe.communicate()[0] for mode, probe in probes.items()}
    assert [probe.returncode for probe in probes.values()] == [0, 0]
    mapped = {mode: int(text) for mode, text in printed.items()}
    assert mapped["default"] == 0  # from the heap: a hole when freed
    assert mapped["capped"] >= 1 << 20  # a mapping of its own, unmapped when freed


@pytest.mark.parametrize("padding, stride", [(1, 1), (0, 2), ("same", 1), ("valid", 1)])
def test_output_size_is_known_before_the_op(padding, stride):
    conv = QuantConv2d(8, 16, 3, stride=stride, padding=padding)
    x = torch.randn(2, 8, 9, 7)
    assert conv.output_numel(x) == torch.nn.functional.conv2d(x, torch.zeros(16, 8, 3, 3), None, stride,
                                                              padding).numel()
    linear = QuantLinear(8, 5)
    assert linear.output_numel(torch.randn(2, 3, 8)) == 2 * 3 * 5
