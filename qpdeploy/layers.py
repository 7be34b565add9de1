"""Quantized Conv2d / Linear with timestep-aware scale sets (the method's "Weights" and
"The quantized layer" in docs/design.md).

A quantized layer computes, for sample b whose timestep falls in interval i(b) and whose
scale set is e(b):

    x'  = x * s_in[e]                                   (optional input-channel scales)
    x_q = a * clamp(round(x' / a), -128, 127)           (INT8 per-tensor, a = act_scale[i])
    z   = x_q (*) (s_ptq * W_int)                        (integer weight, post-training scale)
    y   = z * (s_out[e] / s_ptq) + bias                  (per-output-channel rescale)

so the effective weight is ``s_out[e] * W_int * s_in[e]``. Row ``E`` of the scale tables is
the post-training set (``s_out = s_ptq``, ``s_in = 1``) and never trains; rows ``0..E-1`` are
the trainable sets of a scale pack. Writing the rescale after the convolution is what makes
a single engine with K scale tables exact (docs/design.md, "Export layouts"), and keeping z in
``s_ptq`` units keeps fp16 sums in range.

Training touches only ``s_out`` (and ``s_in``). The integer weight goes into backward as
itself: :class:`IntWeightOp` saves the int8 (or packed int4) tensor and rebuilds the float
weight when the input gradient is needed, so no float copy of any weight stays alive
between forward and backward. Where the CPU has an exact int8 GEMM (VNNI or AMX; see
:func:`int_gemm_available`), the forward runs ``x_q (*) W_int`` on the integers themselves,
as the INT8 engine does (:class:`IntGemmOp`): no float weight at all in forward.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

ACT_QMIN, ACT_QMAX = -128, 127


def weight_qrange(bits: int) -> tuple[int, int]:
    """Signed symmetric integer range used for weights of ``bits`` bits: (-2^(b-1), 2^(b-1)-1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


# ------------------------------------------------------------------------------------
# INT4 packing: two signed nibbles per byte, low nibble first, rows padded to even length
# ------------------------------------------------------------------------------------

def pack_int4(w: torch.Tensor) -> torch.Tensor:
    """Pack an int8 tensor of values in [-8, 7] into uint8, two values per byte.

    The tensor is flattened per output channel (dim 0); rows of odd length get one zero pad.

    Returns:
        uint8 tensor of shape (C_out, ceil(N / 2)), N = numel / C_out.
    """
    rows = w.reshape(w.shape[0], -1).to(torch.int16)
    if rows.shape[1] % 2:
        rows = F.pad(rows, (0, 1))
    nibbles = rows & 0xF  # two's complement nibble
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: an int8 tensor of ``shape``.

    Works in int8 throughout (the bytes reinterpreted as int8; arithmetic shifts sign-extend
    each nibble), so its temporaries stay at about twice the unpacked size in bytes: this
    runs for every layer in every training forward and backward.
    """
    x = packed.view(torch.int8)
    nibbles = torch.stack([(x << 4) >> 4, x >> 4], dim=-1).reshape(x.shape[0], -1)  # low nibble first
    n = 1
    for d in shape[1:]:
        n *= d
    return nibbles[:, :n].contiguous().reshape(shape)


# ------------------------------------------------------------------------------------
# Autograd functions
# ------------------------------------------------------------------------------------

class FakeQuantSTE(torch.autograd.Function):
    """Symmetric INT8 fake quantization with a straight-through gradient.

    The gradient passes where the input was inside the representable range and is zero
    where it was clipped. Only a bool mask is saved for backward (1 byte per element).
    The scale gets no gradient: activation scales are calibrated, not trained.
    """

    @staticmethod
    def forward(ctx, x, scale):
        codes, inside = int8_codes(x, scale)
        ctx.save_for_backward(inside)
        return codes.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def int8_codes(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``clamp(round(x / scale), -128, 127)`` (integer values, in x's float dtype) and where
    it was not clipped (the straight-through gradient's mask)."""
    q = x / scale
    q.round_()
    codes = q.clamp(ACT_QMIN, ACT_QMAX)
    return codes, codes == q  # one comparison instead of two and an AND (NaN: outside)


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """INT8 fake quantization of x with ``scale`` broadcastable to x (straight-through grad)."""
    return FakeQuantSTE.apply(x, scale.to(x.dtype))


class IntWeightOp(torch.autograd.Function):
    """``z = op(x, W)`` for a frozen integer weight, saving only the integers.

    ``op`` is conv2d or linear; ``W`` is ``s_ptq * W_int`` when ``s_ptq`` is given and the raw
    integers ``W_int`` when it is None (the caller then scales the output per channel, see
    :meth:`QuantLayer.scales_output`). Backward returns the input gradient only (the integer
    weight and its post-training scale are frozen), rebuilding the float weight from the
    saved integer tensor. That is the memory win of training scales instead of weights.
    """

    @staticmethod
    def forward(ctx, x, w_int, s_ptq, layer):
        ctx.layer = layer
        ctx.x_shape = x.shape
        ctx.save_for_backward(w_int, s_ptq)
        return layer.apply_weight(x, layer.weight_for_op(w_int, s_ptq, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        w_int, s_ptq = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        layer = ctx.layer
        return layer.input_grad(ctx.x_shape, layer.weight_for_op(w_int, s_ptq, grad.dtype), grad), None, None, None


class IntGemmOp(torch.autograd.Function):
    """``z = x_q (*) W_int`` computed in integers, for float32 inputs on a CPU with an exact
    int8 GEMM (:func:`int_gemm_available`).

    The input is quantized to INT8 codes with its per-sample activation scale (one or two
    channel groups, see :meth:`QuantLayer.quantize_input`), each group is multiplied by its
    slice of the integer weight on ``torch._int_mm`` (int8 x int8 -> int32, exact), and the
    sums are scaled back per sample: z is ``a * sum(codes * W_int)``, the raw-integer output
    of :class:`IntWeightOp` on ``fake_quant(x)`` without its float rounding. Backward is
    theirs, unchanged: the input gradient through the float weight rebuilt from the saved
    integers, masked where the input was clipped (straight through elsewhere).
    """

    @staticmethod
    def forward(ctx, x, scales, w_int, layer):
        weight, batch_view = layer.int_weight(w_int), (-1,) + (1,) * (x.ndim - 1)
        z, masks = None, []
        for group, (start, size) in enumerate(layer.channel_groups(x)):
            part = x.narrow(layer.channel_dim, start, size) if size != x.shape[layer.channel_dim] else x
            scale = scales[:, group].to(x.dtype).view(batch_view)
            codes, inside = int8_codes(part, scale)
            masks.append(inside)
            sums = layer.int_apply(layer.int_codes(codes), weight.narrow(1, start, size))  # int32, exact
            z = sums * scale if z is None else z.addcmul_(sums, scale)  # int32 * float32: float32, one pass
        ctx.layer, ctx.x_shape = layer, x.shape
        ctx.save_for_backward(masks[0] if len(masks) == 1 else torch.cat(masks, dim=layer.channel_dim), w_int)
        return z

    @staticmethod
    def backward(ctx, grad):
        inside, w_int = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        layer = ctx.layer
        grad_x = layer.input_grad(ctx.x_shape, layer.weight_for_op(w_int, None, grad.dtype), grad)
        return grad_x * inside, None, None, None


INT_GEMM_ENV = "QPDEPLOY_INT8_GEMM"  # "0": never use integer kernels (the float path everywhere)


@functools.cache
def int_gemm_available() -> bool:
    """Whether quantized layers may run their forward on ``torch._int_mm`` on this CPU.

    Only where it is exact: x86 int8 kernels without VNNI (or AMX) add pairs of u8 x s8
    products in saturating int16, which full-range codes overflow (measured in
    ``benchmarks/int8_kernels.py``). So the answer is a test, run once per process, of
    the largest products INT8 codes can make, against float64 sums; ``QPDEPLOY_INT8_GEMM=0``
    turns the integer path off.
    """
    if os.environ.get(INT_GEMM_ENV, "1") == "0" or not hasattr(torch, "_int_mm"):
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(ACT_QMIN, ACT_QMAX + 1, (32, 1024), generator=generator, dtype=torch.int8)
    b = torch.randint(ACT_QMIN, ACT_QMAX + 1, (1024, 24), generator=generator, dtype=torch.int8)
    a[:8], a[8:16], b[:, :8], b[:, 8:16] = 127, -128, 127, -128  # 127 * 127 and -128 * -128 pairs overflow int16
    try:
        return torch.equal(torch._int_mm(a, b).double(), a.double() @ b.double())
    except RuntimeError:  # no CPU kernel for these shapes in this build
        return False


def int_conv2d(codes: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    """conv2d of int8 ``codes`` (B, C, H, W) with an int8 ``weight`` (O, C, kh, kw), groups 1 and
    dilation 1, exact in int32: one int8 GEMM over the input's patches, gathered channels-last
    (codes in channels-last memory, as :meth:`QuantConv2d.int_codes` makes them, need no copy
    for a 1x1 stride-1 convolution). Returns (B, O, H', W') int32 (a channels-last view)."""
    (batch, channels, height, width), (out, _, kh, kw) = codes.shape, weight.shape
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    x = codes.permute(0, 2, 3, 1)  # (B, H, W, C)
    if kh == kw == 1 and ph == pw == 0:
        patches = x[:, ::sh, ::sw]
    else:
        if ph or pw:
            x = F.pad(x, (0, 0, pw, pw, ph, ph))
        # (B, H', W', C, kh * kw): the weight's own (c, i, j) order, so the weight needs no copy
        patches = torch.stack([x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
                               for i in range(kh) for j in range(kw)], dim=4)
    sums = torch._int_mm(patches.reshape(-1, kh * kw * channels), weight.reshape(out, -1).t())
    return sums.view(batch, out_h, out_w, out).permute(0, 3, 1, 2)


# dtypes in which a layer may convolve the raw integers and scale the output (range as float32)
SCALE_AFTER = (torch.float32, torch.float64, torch.bfloat16)

_SCRATCH = threading.local()


def _scratch(numel: int, dtype) -> torch.Tensor:
    """A CPU buffer of at least ``numel`` values of ``dtype``, one per thread and dtype, kept
    at the largest size asked for (the model's largest weight)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffers[dtype] = buffer = None  # free the smaller one first
        buffers[dtype] = buffer = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


# ------------------------------------------------------------------------------------
# Routing: which interval and scale set each sample of a batch uses
# ------------------------------------------------------------------------------------

class ScaleRouter(nn.Module):
    """Per-sample interval and scale-set indices shared by the quantized layers of one UNet.

    Attached to the UNet as ``qp_router``; a forward pre-hook on the UNet calls
    :meth:`route` with the call's timestep, so the layers see this call's routing and
    nothing global. ``set_of_interval[k]`` is the scale-set row used in interval k;
    the value ``num_sets`` (one past the trainable sets) means the post-training scales.
    """

    def __init__(self, intervals, num_sets: int = 0, set_of_interval=None):
        super().__init__()
        self.intervals = intervals
        if set_of_interval is None:
            set_of_interval = [num_sets] * intervals.k
        self.register_buffer("set_of_interval", torch.as_tensor(set_of_interval, dtype=torch.long))
        self.num_sets = num_sets
        self.interval: torch.Tensor | None = None  # (B,) long
        self.scale_set: torch.Tensor | None = None  # (B,) long
        self.automatic = True  # route() follows each call's timestep; off inside manual()

    def configure(self, intervals, num_sets: int, set_of_interval) -> None:
        """Install a new partition and interval -> scale-set map (used when a pack loads)."""
        self.intervals = intervals
        self.num_sets = num_sets
        self.set_of_interval = torch.as_tensor(
            set_of_interval, dtype=torch.long, device=self.set_of_interval.device
        )

    @contextlib.contextmanager
    def manual(self):
        """Within the block the UNet's timestep argument does not route; callers use :meth:`set`.

        The exporter traces with this, so the graph holds no timestep -> interval lookup.
        """
        self.automatic = False
        try:
            yield self
        finally:
            self.automatic = True

    def route(self, timestep, batch: int, device) -> None:
        """Set (interval, scale set) per sample from ``timestep`` (scalar or (B,) tensor)."""
        if not self.automatic:
            return
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        self.set(self.intervals.index(t.reshape(batch)))

    def set(self, interval: torch.Tensor, scale_set: torch.Tensor | None = None) -> None:
        """Set the per-sample interval indices (B,), and scale sets if not derived from the map."""
        self.interval = interval
        self.scale_set = self.set_of_interval[interval] if scale_set is None else scale_set

    def selection(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (interval, scale set) tensors of the current call.

        Raises:
            RuntimeError: the layer runs outside a routed UNet call (nothing set the call's
                intervals), which would otherwise silently use the post-training scales.
        """
        if self.interval is None:
            raise RuntimeError("a quantized layer ran before its UNet call was routed: call the UNet (its "
                               "timestep routes every layer) or set the routing with router.set(...)")
        if self.interval.shape[0] != batch:
            raise RuntimeError(
                f"quantized layer got batch {batch} but the UNet call was routed for "
                f"{self.interval.shape[0]} samples"
            )
        return self.interval, self.scale_set


def unrouted_selection(batch: int, device, num_sets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval 0 and the post-training scale row for every sample (no routing installed)."""
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    return zeros, zeros + num_sets


# ------------------------------------------------------------------------------------
# The quantized layers
# ------------------------------------------------------------------------------------

class QuantLayer(nn.Module):
    """Shared state and forward of :class:`QuantConv2d` and :class:`QuantLinear`.

    Buffers: ``w_int`` (int8, or uint8 packed INT4), ``s_ptq`` (C_out,), ``act_scale``
    (K_a, P) with K_a = 1 (global) or K (per interval) and P = 2 when the input is split
    into two channel groups, and ``bias``. Parameters: ``s_out`` (E, C_out) and optional
    ``s_in`` (E, C_in), the trainable scale sets (E = 0 for a post-training base).
    """

    channel_dim = 1  # where input channels live (conv: dim 1; linear overrides: dim -1)

    def __init__(self, in_features: int, out_features: int, weight_shape, weight_bits: int,
                 act_bits: int | None, act_sets: int, split: int):
        super().__init__()
        if weight_bits not in (4, 8):
            raise ValueError(f"weight_bits must be 4 or 8, got {weight_bits}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = torch.Size(weight_shape)
        self.weight_bits, self.act_bits, self.split = weight_bits, act_bits, split
        numel = self.weight_shape.numel()
        if weight_bits == 8:
            self.register_buffer("w_int", torch.zeros(self.weight_shape, dtype=torch.int8))
        else:
            self.register_buffer("w_int", torch.zeros(out_features, (numel // out_features + 1) // 2, dtype=torch.uint8))
        self.register_buffer("s_ptq", torch.ones(out_features))
        self.register_buffer("act_scale", torch.ones(act_sets, 2 if split else 1))
        self.register_buffer("bias", None)
        self.s_out = nn.Parameter(torch.ones(0, out_features), requires_grad=False)
        self.s_in: nn.Parameter | None = None
        object.__setattr__(self, "router", None)  # set by attach_router; not a submodule

    # -- integer weight --------------------------------------------------------------
    def int_weight(self, w_int: torch.Tensor | None = None) -> torch.Tensor:
        """The integer weight as int8 of the float layer's shape (INT4 unpacked)."""
        w_int = self.w_int if w_int is None else w_int
        return w_int if self.weight_bits == 8 else unpack_int4(w_int, self.weight_shape)

    def float_int_weight(self, w_int: torch.Tensor, dtype) -> torch.Tensor:
        """The integer weight's values in ``dtype``, for one op and no longer.

        On CPU the values go into a per-thread scratch buffer that every layer reuses
        (:func:`_scratch`) instead of a fresh tensor per call: a training step converts
        every weight twice, and those short-lived tensors, allocated between the
        activations kept for backward, otherwise leave the C heap full of holes (measured
        on SD 1.5: see ``benchmarks/train_memory.py``). The caller must not keep the
        result past the op it feeds.
        """
        w = self.int_weight(w_int)
        if w.device.type != "cpu":
            return w.to(dtype)
        return _scratch(w.numel(), dtype).view(w.shape).copy_(w)

    def set_int_weight(self, w_int: torch.Tensor) -> None:
        """Store an int8 tensor of the float weight's shape (packed if INT4)."""
        lo, hi = weight_qrange(self.weight_bits)
        if w_int.dtype != torch.int8 or w_int.shape != self.weight_shape or w_int.min() < lo or w_int.max() > hi:
            raise ValueError(f"integer weight must be int8 of shape {tuple(self.weight_shape)} in [{lo}, {hi}]")
        self.w_int = w_int.clone() if self.weight_bits == 8 else pack_int4(w_int)

    def dequantized_weight(self, w_int, s_ptq, dtype, transient: bool = False) -> torch.Tensor:
        """``s_ptq * W_int`` in ``dtype``; with ``transient`` on CPU it is written into the
        scratch buffer of :meth:`float_int_weight` (valid for one op only)."""
        w = self.float_int_weight(w_int, dtype) if transient else self.int_weight(w_int).to(dtype)
        return w.mul_(s_ptq.to(dtype).view(-1, *([1] * (w.ndim - 1))))

    def weight_for_op(self, w_int, s_ptq, dtype) -> torch.Tensor:
        """The float weight one op uses: ``s_ptq * W_int``, or the raw integers when ``s_ptq``
        is None (valid for that op only, see :meth:`float_int_weight`)."""
        if s_ptq is None:
            return self.float_int_weight(w_int, dtype)
        return self.dequantized_weight(w_int, s_ptq, dtype, transient=True)

    def output_numel(self, x: torch.Tensor) -> int:
        """Values of this layer's output for input ``x``."""
        raise NotImplementedError

    def scales_output(self, x: torch.Tensor) -> bool:
        """Whether this call multiplies the per-channel scale into the output, not the weight.

        ``s_out * W_int`` applied to x is ``s_out * (W_int applied to x)``: the same product,
        and one pass over the smaller of the weight and the output. In an SD-size UNet the
        deep layers' weights are hundreds of times larger than their outputs; in a small
        UNet at high resolution it is the other way round. float16 always scales the
        weight: sums over raw integers could leave its range.
        """
        return x.dtype in SCALE_AFTER and self.output_numel(x) < self.weight_shape.numel()

    # -- scale sets ------------------------------------------------------------------
    @property
    def num_sets(self) -> int:
        return self.s_out.shape[0]

    def set_scale_sets(self, s_out: torch.Tensor, s_in: torch.Tensor | None = None) -> None:
        """Install trainable scale sets: s_out (E, C_out) and optionally s_in (E, C_in)."""
        if s_out.ndim != 2 or s_out.shape[1] != self.out_features:
            raise ValueError(f"s_out must have shape (E, {self.out_features}), got {tuple(s_out.shape)}")
        if s_in is not None and tuple(s_in.shape) != (s_out.shape[0], self.in_features):
            raise ValueError(f"s_in must have shape ({s_out.shape[0]}, {self.in_features}), got {tuple(s_in.shape)}")
        device = self.s_ptq.device
        self.s_out = nn.Parameter(s_out.detach().to(device, torch.float32).clone(), requires_grad=False)
        self.s_in = None if s_in is None else nn.Parameter(s_in.detach().to(device, torch.float32).clone(), requires_grad=False)

    def out_scale_table(self) -> torch.Tensor:
        """(E + 1, C_out) table of output-channel scales; the last row is ``s_ptq``."""
        return torch.cat([self.s_out, self.s_ptq[None]])

    def out_ratio_table(self) -> torch.Tensor:
        """(E + 1, C_out) table of ``s_out / s_ptq``; the last row (post-training) is all ones."""
        ones = torch.ones(1, self.out_features, device=self.s_ptq.device)
        return torch.cat([self.s_out / self.s_ptq, ones])

    def in_scale_table(self) -> torch.Tensor | None:
        """(E + 1, C_in) table of input-channel scales, last row ones; None without s_in."""
        if self.s_in is None:
            return None
        return torch.cat([self.s_in, torch.ones(1, self.in_features, device=self.s_in.device)])

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is not None:
            interval, scale_set = self.router.selection(x.shape[0], x.device)
        else:
            interval, scale_set = unrouted_selection(x.shape[0], x.device, self.num_sets)
        in_table = self.in_scale_table()
        if in_table is not None:
            x = x * self._per_sample(in_table[scale_set], x)
        # The output-channel scale is s_out (s_ptq for the post-training row). Either it goes
        # into the output after the op on the raw integers (one multiply-add with the bias), or
        # s_ptq goes into the weight and the output is multiplied by s_out / s_ptq.
        scale_after = self.scales_output(x)
        if scale_after and self.act_bits is not None and self.runs_on_integers(x):
            z = IntGemmOp.apply(x, self.act_scales_for(interval), self.w_int, self)
        else:
            if self.act_bits is not None:
                x = self.quantize_input(x, self.act_scales_for(interval))
            z = IntWeightOp.apply(x, self.w_int, None if scale_after else self.s_ptq, self)
        if scale_after:  # the post-training row is s_ptq, so a base without sets takes this path too
            scale = self._per_sample(self.out_scale_table()[scale_set], z)
        elif self.num_sets:
            scale = self._per_sample(self.out_ratio_table()[scale_set], z)
        else:
            scale = None
        if self.bias is None:
            return z if scale is None else z * scale
        bias = self.bias.to(z.dtype).view(self._bias_view(z))
        return z + bias if scale is None else torch.addcmul(bias, z, scale)

    def runs_on_integers(self, x: torch.Tensor) -> bool:
        """Whether this call's op runs on :class:`IntGemmOp`: a float32 CPU input, a geometry
        :meth:`int_apply` computes, and an exact int8 GEMM here."""
        return x.dtype == torch.float32 and x.device.type == "cpu" and self.int_geometry() and int_gemm_available()

    def int_geometry(self) -> bool:
        """Whether :meth:`int_apply` computes this layer's op."""
        return True

    def int_apply(self, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The op on int8 codes and an int8 weight (its input-channel slice), in exact int32."""
        raise NotImplementedError

    def int_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer-valued float codes as the int8 tensor :meth:`int_apply` reads best."""
        return codes.to(torch.int8)

    def channel_groups(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """(start, size) of the input's channel groups that share an activation scale."""
        channels = x.shape[self.channel_dim]
        return [(0, self.split), (self.split, channels - self.split)] if self.split else [(0, channels)]

    def quantize_input(self, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Fake-quantize x with per-sample scales (B, P); P = 2 splits channels at ``split``."""
        batch_view = (-1,) + (1,) * (x.ndim - 1)
        groups = self.channel_groups(x)
        if len(groups) == 1:
            return fake_quant(x, scales[:, 0].view(batch_view))
        return torch.cat([fake_quant(x.narrow(self.channel_dim, start, size), scales[:, g].view(batch_view))
                          for g, (start, size) in enumerate(groups)], dim=self.channel_dim)

    def act_scales_for(self, interval: torch.Tensor) -> torch.Tensor:
        """Per-sample activation scales (B, P): the sample's interval row, or the global row."""
        if self.act_scale.shape[0] == 1:
            return self.act_scale.expand(interval.shape[0], -1)
        return self.act_scale[interval]

    def _per_sample(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Reshape per-sample channel rows (B, C) to broadcast against ``like``."""
        raise NotImplementedError

    def _bias_view(self, z: torch.Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        act = f"a{self.act_bits}" if self.act_bits else "a-fp"
        extra = f", split={self.split}" if self.split else ""
        return f"{self.in_features}, {self.out_features}, w{self.weight_bits}{act}, sets={self.num_sets}{extra}"


class QuantConv2d(QuantLayer):
    """Quantized replacement of ``nn.Conv2d`` (zero padding only)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 weight_bits=8, act_bits=8, act_sets=1, split=0):
        kernel_size = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * 2
        shape = (out_channels, in_channels // groups, *kernel_size)
        super().__init__(in_channels, out_channels, shape, weight_bits, act_bits, act_sets, split)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_bits=8, act_bits=8, act_sets=1, split=0) -> "QuantConv2d":
        """An (uncalibrated) quantized layer with the conv's geometry and bias."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero padding is supported, got {conv.padding_mode}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, weight_bits, act_bits, act_sets, split)
        layer.bias = None if conv.bias is None else conv.bias.detach().clone().float()
        return layer.to(conv.weight.device)

    def apply_weight(self, x, weight):
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def int_geometry(self):
        return self.groups == 1 and _pair(self.dilation) == (1, 1) and not isinstance(self.padding, str)

    def int_apply(self, codes, weight):
        return int_conv2d(codes, weight, self.stride, self.padding)

    def int_codes(self, codes):
        return codes.to(torch.int8, memory_format=torch.channels_last)  # the conversion and the layout in one pass

    def output_numel(self, x):
        if isinstance(self.padding, str):  # "same" keeps the size; "valid" pads nothing
            if self.padding == "same":
                return x.shape[0] * self.out_features * x.shape[-2] * x.shape[-1]
            padding = (0, 0)
        else:
            padding = _pair(self.padding)
        size = 1
        for n, k, stride, pad, dil in zip(x.shape[-2:], self.weight_shape[-2:], _pair(self.stride), padding,
                                          _pair(self.dilation)):
            size *= (n + 2 * pad - dil * (k - 1) - 1) // stride + 1
        return x.shape[0] * self.out_features * size

    def input_grad(self, x_shape, weight, grad):
        return torch.nn.grad.conv2d_input(x_shape, weight, grad, self.stride, self.padding, self.dilation, self.groups)

    def _per_sample(self, rows, like):
        return rows.to(like.dtype)[:, :, None, None]  # (B, C, 1, 1)

    def _bias_view(self, z):
        return (1, -1, 1, 1)


class QuantLinear(QuantLayer):
    """Quantized replacement of ``nn.Linear`` for inputs (B, C) or (B, L, C)."""

    channel_dim = -1

    def __init__(self, in_features, out_features, weight_bits=8, act_bits=8, act_sets=1, split=0):
        super().__init__(in_features, out_features, (out_features, in_features), weight_bits, act_bits, act_sets, split)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits=8, act_bits=8, act_sets=1, split=0) -> "QuantLinear":
        """An (uncalibrated) quantized layer with the linear's geometry and bias."""
        layer = cls(linear.in_features, linear.out_features, weight_bits, act_bits, act_sets, split)
        layer.bias = None if linear.bias is None else linear.bias.detach().clone().float()
        return layer.to(linear.weight.device)

    def apply_weight(self, x, weight):
        return F.linear(x, weight)

    def int_apply(self, codes, weight):
        sums = torch._int_mm(codes.reshape(-1, codes.shape[-1]), weight.t())
        return sums.view(*codes.shape[:-1], self.out_features)

    def output_numel(self, x):
        return x.numel() // self.in_features * self.out_features

    def input_grad(self, x_shape, weight, grad):
        return (grad @ weight).reshape(x_shape)

    def _per_sample(self, rows, like):
        return rows.to(like.dtype).view(rows.shape[0], *([1] * (like.ndim - 2)), rows.shape[1])  # (B, 1.., C)

    def _bias_view(self, z):
        return (-1,)


QUANT_TYPES = (QuantConv2d, QuantLinear)


def quant_layers(model: nn.Module):
    """Yield ``(name, layer)`` for every quantized layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QUANT_TYPES):
            yield name, module
