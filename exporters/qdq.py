"""The QDQ placement rule: how one quantized layer becomes ONNX QuantizeLinear/DequantizeLinear.

This module is the only place that decides what a quantized layer looks like in ONNX. It
follows TensorRT's explicit-quantization rules (docs/design.md, "Export layouts"):

- the integer weight is an INT8 initializer feeding ``DequantizeLinear(axis=0, zero point 0)``,
  which feeds the Conv (input 1) or, for a Linear, ``Transpose -> MatMul`` (``Gemm`` for 2-D
  inputs); INT4 bases export their unpacked values as INT8 (the same integers, exact);
- the activation input gets ``QuantizeLinear -> DequantizeLinear`` with a per-tensor scale and
  an INT8 zero point 0, directly in front of the Conv/MatMul/Gemm;
- input-channel scales ``s_in`` are a ``Mul`` on the activation before its Q;
- a shortcut-split layer is two convolutions over the two channel groups (each with its own
  activation Q/DQ) plus an ``Add``, which is exact because convolution is linear;
- nothing is quantized on outputs, and skipped layers are ordinary float modules.

:class:`QDQLayer` is the export twin of a :class:`~qpdeploy.layers.QuantLayer`. Its scales are
not buffers but per-call tensors (``consts``) that the UNet wrapper passes in as graph inputs
during tracing, so the TorchScript exporter can neither fold them into the weights nor merge
equal ones; :mod:`qpdeploy.exporters.unet` turns them into initializers afterwards, one set per
graph. Two forms exist:

- baked (per-interval layout): ``w_scale = s_out[e]`` (the trained set of the interval, or
  ``s_ptq`` for post-training), ``s_in = s_in[e]``; since ``s_ptq * W_int * (s_out / s_ptq)``
  equals ``s_out * W_int`` the scale set costs nothing at run time;
- table (masked and multi-expert layouts): ``w_scale = s_ptq`` and the conv/matmul output is
  multiplied per channel by ``Gather(out_ratio_table, selector)``, the order of operations
  of :meth:`QuantLayer.forward` where it scales the weight (where the torch layer scales the
  output instead, the product is the same up to float rounding); docs/design.md: the
  rescale after the integer conv is what makes one engine with K scale tables exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qpdeploy.layers import QuantConv2d, QuantLayer, fake_quant

# Names of the per-call tensors of one layer (graph inputs while tracing, initializers after).
W_SCALE = "w_scale"  # (C_out,) scale of the weight DequantizeLinear
ACT_SCALE = "act_scale"  # () per-tensor activation scale (channel group 0 of a split layer)
ACT_SCALE_TAIL = "act_scale_tail"  # () activation scale of channel group 1 of a split layer
S_IN = "s_in"  # (C_in, 1, 1) or (C_in,) input-channel scales (baked form)
S_IN_TABLE = "s_in_table"  # (R, C_in, 1, 1) or (R, 1, C_in) input-channel scale rows (table form)
OUT_RATIO_TABLE = "out_ratio_table"  # (R, C_out, 1, 1) or (R, 1, C_out) rows of s_out / s_ptq (table form)


class ActQDQ(torch.autograd.Function):
    """INT8 per-tensor fake quantization, exported as QuantizeLinear -> DequantizeLinear.

    The torch side is :func:`qpdeploy.layers.fake_quant` itself (round half to even, like
    ONNX QuantizeLinear), so the traced model and the quantized UNet compute the same thing.
    """

    @staticmethod
    def forward(ctx, x, scale):
        return fake_quant(x, scale)

    @staticmethod
    def symbolic(g, x, scale):
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        q = g.op("QuantizeLinear", x, scale, zero)
        return g.op("DequantizeLinear", q, scale, zero)


class WeightDQ(torch.autograd.Function):
    """``scale[c] * W_int[c]`` for an int8 weight, exported as DequantizeLinear(axis=0, zp 0)."""

    @staticmethod
    def forward(ctx, w_int, scale):
        return w_int.float() * scale.view(-1, *([1] * (w_int.ndim - 1)))

    @staticmethod
    def symbolic(g, w_int, scale):
        channels = w_int.type().sizes()[0]
        zero = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int8))
        return g.op("DequantizeLinear", w_int, scale, zero, axis_i=0)


class QDQLayer(nn.Module):
    """Export twin of a quantized Conv2d/Linear (see the module docstring).

    Before each traced call the UNet wrapper sets ``consts`` (name -> tensor, names above)
    and, for the table form, ``select`` (the (B,) selector input).
    """

    def __init__(self, layer: QuantLayer):
        super().__init__()
        self.is_conv = isinstance(layer, QuantConv2d)
        self.split, self.in_features = layer.split, layer.in_features
        self.quantize_input = layer.act_bits is not None
        if self.is_conv:
            if layer.split and layer.groups != 1:
                raise ValueError("a shortcut-split convolution must have groups=1")
            self.geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)
        w = layer.int_weight()  # int8 values (INT4 unpacked): exported as INT8, same integers
        if self.split:
            self.register_buffer("w_int_head", w[:, : self.split].contiguous())
            self.register_buffer("w_int_tail", w[:, self.split:].contiguous())
        else:
            self.register_buffer("w_int", w)
        bias = layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.consts: dict[str, torch.Tensor] = {}
        self.select: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.consts
        if S_IN in c:
            x = x * c[S_IN]
        elif S_IN_TABLE in c:
            x = x * self._rows(c[S_IN_TABLE], x)
        table = OUT_RATIO_TABLE in c
        # The bias rides inside the Conv/Gemm when nothing comes between them (TensorRT fuses it).
        fuse_bias = not table and not self.split
        if self.split:
            channel_dim = 1 if self.is_conv else -1
            head, tail = x.split([self.split, self.in_features - self.split], dim=channel_dim)
            z = self._part(head, self.w_int_head, c.get(ACT_SCALE), None)
            z = z + self._part(tail, self.w_int_tail, c.get(ACT_SCALE_TAIL), None)
        else:
            z = self._part(x, self.w_int, c.get(ACT_SCALE), self.bias if fuse_bias else None)
        if table:
            z = z * self._rows(c[OUT_RATIO_TABLE], z)
        if self.bias is not None and not fuse_bias:
            z = z + (self.bias[:, None, None] if self.is_conv else self.bias)
        return z

    def _part(self, x, w_int, act_scale, bias):
        if self.quantize_input:
            x = ActQDQ.apply(x, act_scale)
        weight = WeightDQ.apply(w_int, self.consts[W_SCALE])
        if self.is_conv:
            stride, padding, dilation, groups = self.geometry
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return F.linear(x, weight, bias)

    def _rows(self, table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The selected per-sample rows: one Gather on the selector input.

        Tables are stored pre-shaped ((R, C, 1, 1) for convolutions, (R, 1, C) for linear
        layers) so the gathered rows broadcast without reshape nodes.
        """
        rows = table.index_select(0, self.select)  # (B, C, 1, 1) or (B, 1, C)
        if not self.is_conv and like.ndim == 2:
            rows = rows.squeeze(1)  # (B, C) for a 2-D linear input
        return rows


def baked_consts(layer: QuantLayer, interval: int, scale_set: int) -> dict[str, torch.Tensor]:
    """Per-interval form: the scales of scale-set row ``scale_set`` (E = post-training) and the
    activation scales of ``interval`` baked into one graph."""
    s_out_rows = layer.out_scale_table().detach()  # (E + 1, C_out): the sets, then s_ptq
    consts = {W_SCALE: s_out_rows[scale_set].clone()}
    consts.update(_act_consts(layer, interval))
    in_table = layer.in_scale_table()
    if in_table is not None:
        s_in = in_table[scale_set].detach().clone()
        consts[S_IN] = s_in[:, None, None] if isinstance(layer, QuantConv2d) else s_in
    return consts


def table_consts(layer: QuantLayer, rows: list[int]) -> dict[str, torch.Tensor]:
    """Table form: ``w_scale = s_ptq`` and one ratio row (and s_in row) per selector value;
    ``rows[v]`` is the scale-set row that selector value ``v`` picks."""
    index = torch.as_tensor(rows, dtype=torch.long)
    consts = {W_SCALE: layer.s_ptq.detach().clone(),
              OUT_RATIO_TABLE: _table_shape(layer, layer.out_ratio_table().detach()[index])}
    consts.update(_act_consts(layer, 0))
    in_table = layer.in_scale_table()
    if in_table is not None:
        consts[S_IN_TABLE] = _table_shape(layer, in_table.detach()[index])
    return consts


def _table_shape(layer: QuantLayer, table: torch.Tensor) -> torch.Tensor:
    """(R, C) -> (R, C, 1, 1) for a convolution, (R, 1, C) for a linear layer."""
    shaped = table[:, :, None, None] if isinstance(layer, QuantConv2d) else table[:, None, :]
    return shaped.contiguous()


def _act_consts(layer: QuantLayer, interval: int) -> dict[str, torch.Tensor]:
    if layer.act_bits is None:
        return {}
    row = layer.act_scale[interval if layer.act_scale.shape[0] > 1 else 0].detach()
    consts = {ACT_SCALE: row[0].clone()}
    if layer.split:
        consts[ACT_SCALE_TAIL] = row[1].clone()
    return consts
