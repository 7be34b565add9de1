"""The QDQ placement rule on single layers: the export twin computes exactly what the quantized
layer computes (torch and ONNX Runtime), and the structural checker accepts the emitted
pattern and rejects broken ones."""

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from qpdeploy.calibrate import sqnr_db
from qpdeploy.exporters.qdq import QDQLayer, baked_consts, table_consts
from qpdeploy.exporters.tracing import torchscript_export
from qpdeploy.exporters.unet import bind_consts
from qpdeploy.exporters.verify import ort_session, qdq_structure
from qpdeploy.intervals import Intervals
from qpdeploy.layers import QuantConv2d, QuantLinear, ScaleRouter
from qpdeploy.qunet import integer_weight, search_weight_scale

SETS = 3  # trainable scale sets; row 3 is post-training


def make_layer(kind="conv", split=0, bits=8, act_sets=2, input_scales=True, seed=0):
    """A calibrated-looking quantized layer with SETS distinct scale sets."""
    gen = torch.Generator().manual_seed(seed)
    fp = nn.Conv2d(16, 8, 3, padding=1) if kind == "conv" else nn.Linear(16, 8)
    with torch.no_grad():
        fp.weight.copy_(torch.randn(fp.weight.shape, generator=gen) * 0.1)
    cls = QuantConv2d if kind == "conv" else QuantLinear
    layer = cls.from_float(fp, bits, 8, act_sets, split)
    scale = search_weight_scale(fp.weight, bits)
    layer.set_int_weight(integer_weight(fp.weight, scale, bits))
    layer.s_ptq.copy_(scale)
    layer.act_scale.copy_(0.01 + 0.03 * torch.rand(layer.act_scale.shape, generator=gen))
    s_out = layer.s_ptq * torch.exp(0.3 * torch.randn(SETS, 8, generator=gen))
    s_in = torch.exp(0.3 * torch.randn(SETS, 16, generator=gen)) if input_scales else None
    layer.set_scale_sets(s_out, s_in)
    router = ScaleRouter(Intervals.uniform(act_sets), SETS)
    object.__setattr__(layer, "router", router)
    return layer


def reference(layer, x, interval, scale_set):
    layer.router.set(torch.full((x.shape[0],), interval), torch.full((x.shape[0],), scale_set))
    with torch.no_grad():
        return layer(x)


def layer_input(kind, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((2, 16, 6, 6) if kind == "conv" else (2, 5, 16), generator=gen)


class OneLayer(nn.Module):
    """A twin whose scale tensors are inputs, as inside the traced UNet."""

    def __init__(self, twin, keys, selector):
        super().__init__()
        self.layer, self.keys, self.selector = twin, keys, selector

    def forward(self, x, *rest):
        select, consts = (rest[0], rest[1:]) if self.selector else (None, rest)
        self.layer.consts, self.layer.select = dict(zip(self.keys, consts)), select
        return self.layer(x)


def export_layer(layer, consts, tmp_path, selector=None):
    """ONNX model of one twin with ``consts`` bound as initializers."""
    keys = sorted(consts)
    twin = QDQLayer(layer)
    x = layer_input("conv" if isinstance(layer, QuantConv2d) else "linear")
    extra = () if selector is None else (selector,)
    names = ["x", *(["select"] if selector is not None else []), *keys]
    model = torchscript_export(OneLayer(twin, keys, selector is not None), (x, *extra, *[consts[k] for k in keys]),
                               names, ["y"], 18, tmp_path)
    return bind_consts(model, {k: consts[k] for k in keys})


CASES = [("conv", 0, 8), ("conv", 8, 8), ("linear", 0, 8), ("linear", 0, 4), ("conv", 6, 4)]


@pytest.mark.parametrize("kind,split,bits", CASES)
def test_twin_matches_the_quantized_layer_for_every_scale_set_and_interval(kind, split, bits):
    layer = make_layer(kind, split, bits)
    x = layer_input(kind)
    twin = QDQLayer(layer)
    for interval in range(2):
        for scale_set in range(SETS + 1):
            ref = reference(layer, x, interval, scale_set)
            twin.consts, twin.select = baked_consts(layer, interval, scale_set), None
            assert sqnr_db(ref, twin(x)) > 100  # identical up to float rounding order
    twin.consts = table_consts(layer, [SETS, 2, 0])  # selector value v -> scale-set row
    twin.select = torch.tensor([2, 0])  # sample 0 uses row 0, sample 1 the post-training row
    ref = torch.cat([reference(layer, x, 0, 0)[:1], reference(layer, x, 0, SETS)[1:]])
    assert sqnr_db(ref, twin(x)) > 100


@pytest.mark.parametrize("kind,split,bits", CASES)
def test_onnx_of_one_layer_matches_torch_and_follows_the_qdq_rules(kind, split, bits, tmp_path):
    layer = make_layer(kind, split, bits)
    x = layer_input(kind)
    model = export_layer(layer, baked_consts(layer, 1, 2), tmp_path)
    onnx.checker.check_model(model, full_check=True)
    found = qdq_structure(model)
    assert found.violations == []
    assert found.layers == {"layer": 2 if split else 1}
    assert found.act_qdq == found.units
    # INT4 bases export the same integers as INT8 initializers
    weights = [numpy_helper.to_array(t).copy() for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8
               and t.name.startswith("layer.w_int")]
    assert torch.equal(torch.cat([torch.from_numpy(w) for w in weights], dim=1), layer.int_weight())
    path = tmp_path / "layer.onnx"
    onnx.save(model, str(path))
    y = ort_session(path).run(None, {"x": x.numpy()})[0]
    assert sqnr_db(reference(layer, x, 1, 2), torch.from_numpy(y)) > 100


def test_selector_input_gathers_the_right_rows_in_onnx(tmp_path):
    layer = make_layer("conv", split=8)
    x = layer_input("conv")
    model = export_layer(layer, table_consts(layer, list(range(SETS + 1))), tmp_path,
                         selector=torch.zeros(2, dtype=torch.int32))
    path = tmp_path / "table.onnx"
    onnx.save(model, str(path))
    session = ort_session(path)
    for scale_set in range(SETS + 1):
        y = session.run(None, {"x": x.numpy(), "select": torch.full((2,), scale_set, dtype=torch.int32).numpy()})[0]
        assert sqnr_db(reference(layer, x, 0, scale_set), torch.from_numpy(y)) > 100


def _edit(model, op_type, fn):
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    for node in edited.graph.node:
        if node.op_type == op_type and fn(edited, node):
            return edited
    raise AssertionError(f"no {op_type} to edit")


def test_structural_check_rejects_broken_placements(tmp_path):
    layer = make_layer("linear")
    model = export_layer(layer, baked_consts(layer, 0, 0), tmp_path)
    assert qdq_structure(model).violations == []

    def weight_axis_1(m, node):
        if node.input[0] != "layer.w_int":
            return False
        for a in node.attribute:
            if a.name == "axis":
                a.i = 1
        return True

    assert any("axis 0" in v for v in qdq_structure(_edit(model, "DequantizeLinear", weight_axis_1)).violations)

    def nonzero_zero_point(m, node):
        if node.input[0] != "layer.w_int":
            return False
        m.graph.initializer.append(numpy_helper.from_array(torch.ones(8, dtype=torch.int8).numpy(), "zp1"))
        node.input[2] = "zp1"
        return True

    assert any("zero point" in v for v in qdq_structure(_edit(model, "DequantizeLinear", nonzero_zero_point)).violations)

    def drop_activation_q(m, node):
        # MatMul reads the raw activation: the layer keeps its weight DQ but loses its Q/DQ pair
        if node.op_type != "MatMul":
            return False
        node.input[0] = "x"
        return True

    broken = _edit(model, "MatMul", drop_activation_q)
    assert qdq_structure(broken).act_qdq == 0

    def weight_through_identity(m, node):
        # how the exporter links merged duplicate initializers: still a valid placement
        if node.input[0] != "layer.w_int":
            return False
        m.graph.node.append(onnx.helper.make_node("Identity", ["layer.w_int"], ["w_alias"]))
        node.input[0] = "w_alias"
        return True

    aliased = qdq_structure(_edit(model, "DequantizeLinear", weight_through_identity))
    assert aliased.violations == [] and aliased.layers == {"layer": 1}
