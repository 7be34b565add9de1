"""Checks that need no TensorRT: ONNX validity, the QDQ placement rules, ORT versus torch.

1. :func:`check_graph`: ``onnx.checker`` with ``full_check`` and strict shape inference.
2. :func:`qdq_structure`: walks a graph and proves TensorRT's explicit-quantization rules
   (the ones :mod:`qpdeploy.exporters.qdq` emits): every INT8 weight initializer feeds a
   DequantizeLinear with per-channel axis 0 and zero point 0 that feeds a Conv, Gemm or
   Transpose -> MatMul; the activation input of that op comes from a Q -> DQ pair with a
   constant per-tensor scale and zero point 0; nothing quantized is a graph output. It
   returns, per quantized layer (from the node scopes), how many such units it has.
3. :func:`compare_with_torch`: runs each interval through ONNX Runtime and through the torch
   quantized UNet (routed by the timestep, as in sampling) with Polygraphy's runners and
   comparator, and gives the SQNR in dB per interval.

ONNX Runtime runs the graph with the runtime's default session settings (basic optimizations:
constant folding and redundancy elimination; the weights' DequantizeLinear nodes stay, and ORT
has no Q/DQ fusions at that level). At "extended" and above ORT fuses Q/DQ into
QLinearConv/QLinearMatMul kernels, and on CPUs without VNNI their u8s8 int16 intermediate sums
saturate (ORT documents this; it is why its quantizer offers ``reduce_range``), which would
measure ORT's kernels, not the graph. At "basic", ORT computes the graph's Q/DQ math in float,
as torch does, bit for bit what the unoptimized graph gives.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qpdeploy.calibrate import sqnr_db

SQNR_CAP_DB = 300.0  # reported for bit-identical outputs (JSON has no infinity)
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


def check_graph(path) -> None:
    """``onnx.checker`` (full check) and strict shape inference on one graph file."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


@dataclass
class QDQStructure:
    """What :func:`qdq_structure` found in one graph."""

    layers: dict[str, int] = field(default_factory=dict)  # quantized layer -> Conv/Gemm/MatMul units
    act_qdq: int = 0  # quantized units whose activation input has its Q/DQ pair
    float_layers: int = 0  # Conv/Gemm/MatMul with a float initializer weight (skipped layers)
    violations: list[str] = field(default_factory=list)

    @property
    def units(self) -> int:
        return sum(self.layers.values())


class _Graph:
    """Producer/consumer/constant lookups over one ONNX graph."""

    def __init__(self, model):
        from onnx import numpy_helper

        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers = defaultdict(list)
        for n in g.node:
            for i, name in enumerate(n.input):
                self.consumers[name].append((n, i))
        self.outputs = {o.name for o in g.output}
        self._array = numpy_helper.to_array

    def source(self, name: str) -> str:
        """``name`` with Identity nodes followed back (the exporter links merged duplicate
        initializers through Identity nodes)."""
        node = self.producer.get(name)
        while node is not None and node.op_type == "Identity":
            name = node.input[0]
            node = self.producer.get(name)
        return name

    def const(self, name: str):
        """The value of an initializer or Constant node output (None if computed)."""
        name = self.source(name)
        if name in self.inits:
            t = self.inits[name]
            return None if t.data_location == 1 else self._array(t)  # external: not needed for checks
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return self._array(node.attribute[0].t)
        return None

    def dtype(self, name: str):
        name = self.source(name)
        if name in self.inits:
            return self.inits[name].data_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return node.attribute[0].t.data_type
        return None


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def qdq_structure(model) -> QDQStructure:
    """Walk ``model`` (a ModelProto; external data need not be loaded) and check the QDQ rules."""
    from onnx import TensorProto

    graph, result = _Graph(model), QDQStructure()
    quantized_ops = set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or graph.source(node.input[0]) not in graph.inits:
            continue
        compute = _check_weight_dq(graph, node, result.violations)
        if compute is None:
            continue
        quantized_ops.add(compute.name)
        layer = _layer_of(compute)
        result.layers[layer] = result.layers.get(layer, 0) + 1
        if _check_act_qdq(graph, compute, result.violations):
            result.act_qdq += 1
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            consumers = graph.consumers[node.output[0]]
            if not consumers or any(c.op_type != "DequantizeLinear" for c, _ in consumers):
                result.violations.append(f"{node.name}: QuantizeLinear not followed only by DequantizeLinear")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.output[0] in graph.outputs:
            result.violations.append(f"{node.name}: a graph output is quantized")
        if node.op_type in COMPUTE_OPS and node.name not in quantized_ops and len(node.input) > 1:
            weight = node.input[1]
            source = graph.producer.get(weight)
            if source is not None and source.op_type == "Transpose":
                weight = source.input[0]
            if graph.source(weight) in graph.inits and graph.dtype(weight) in (TensorProto.FLOAT, TensorProto.FLOAT16):
                result.float_layers += 1
    return result


def _check_weight_dq(graph: _Graph, node, violations: list[str]):
    """Check one weight DequantizeLinear; return the Conv/Gemm/MatMul it feeds (or None)."""
    from onnx import TensorProto

    weight = graph.inits[graph.source(node.input[0])]
    where = f"{node.name} ({weight.name})"
    if weight.data_type != TensorProto.INT8:
        violations.append(f"{where}: weight is not INT8")
    scale = graph.const(node.input[1])
    if scale is None or scale.ndim != 1 or scale.shape[0] != weight.dims[0] or _attr(node, "axis", 1) != 0:
        violations.append(f"{where}: weight scale is not a constant per-output-channel (axis 0) vector")
    zero = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1, np.int8)
    if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
        violations.append(f"{where}: weight zero point is not INT8 zero")
    consumers = graph.consumers[node.output[0]]
    if len(consumers) != 1:
        violations.append(f"{where}: dequantized weight has {len(consumers)} consumers")
        return None
    op, index = consumers[0]
    if op.op_type == "Transpose" and list(_attr(op, "perm", [])) == [1, 0] and len(graph.consumers[op.output[0]]) == 1:
        op, index = graph.consumers[op.output[0]][0]
    if op.op_type not in COMPUTE_OPS or index != 1:
        violations.append(f"{where}: dequantized weight feeds {op.op_type} input {index}, not a Conv/Gemm/MatMul weight")
        return None
    return op


def _check_act_qdq(graph: _Graph, compute, violations: list[str]) -> bool:
    """Whether the compute op's input 0 is DQ(Q(x)) with a constant scalar scale and zero point 0."""
    dq = graph.producer.get(compute.input[0])
    q = graph.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear":
        return False
    ok = True
    for node in (q, dq):
        scale = graph.const(node.input[1])
        zero = graph.const(node.input[2]) if len(node.input) > 2 else None
        if scale is None or scale.ndim != 0 or not scale > 0:
            violations.append(f"{node.name}: activation scale is not a constant positive scalar")
            ok = False
        if zero is None or zero.dtype != np.int8 or zero.ndim != 0 or zero != 0:
            violations.append(f"{node.name}: activation zero point is not an INT8 scalar 0")
            ok = False
    if graph.const(q.input[1]) is not None and graph.const(dq.input[1]) is not None:
        if graph.const(q.input[1]) != graph.const(dq.input[1]):
            violations.append(f"{q.name}: Q and DQ scales differ")
            ok = False
    return ok


def _layer_of(node) -> str:
    """Module path of the layer a node was traced in: ``/unet/a/b.0/c/Conv_1`` -> ``a.b.0.c``."""
    scope = node.name.rsplit("/", 1)[0].strip("/").split("/")
    return ".".join(scope[1:] if scope and scope[0] == "unet" else scope)


def expected_qdq_units(unet) -> dict[str, int]:
    """Quantized layer -> Conv/Gemm/MatMul units it exports to (2 for a shortcut-split layer)."""
    from qpdeploy.layers import quant_layers

    return {name: 2 if layer.split else 1 for name, layer in quant_layers(unet)}


def float_layer_count(unet) -> int:
    """Conv2d/Linear modules left in floating point (skipped by the quantize config)."""
    return sum(1 for m in unet.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear))


# ------------------------------------------------------------------------------------
# ONNX Runtime versus torch
# ------------------------------------------------------------------------------------

def ort_session(path, threads: int = 1):
    """An ONNX Runtime CPU session built by the runtime's own loader with the runtime's default
    settings (``qpdeploy generate``'s), which compute the graph's Q/DQ math exactly (see the
    module doc): what verification measures is what the runtime runs."""
    from qpdeploy.runtimes.config import RuntimeConfig
    from qpdeploy.runtimes.runners import SessionFromOnnxPath

    return SessionFromOnnxPath(path, threads=threads, optimization=RuntimeConfig().ort_optimization)()


class _SQNR:
    """A comparator verdict that carries its SQNR (truthy when above the threshold)."""

    def __init__(self, db: float, min_db: float):
        self.db, self.passed = db, db >= min_db

    def __bool__(self):
        return self.passed


def compare_with_torch(unet, graph_files: list[Path], plan, inputs, outputs, intervals, batch: int,
                       seed: int = 0, min_db: float = 15.0) -> list[float]:
    """SQNR (dB, capped at ``SQNR_CAP_DB``) of ONNX Runtime versus the torch UNet, per interval.

    Interval k feeds its midpoint timestep, the selector value of k (table layouts) and
    seeded random latents and conditions; the torch UNet routes itself by the timestep,
    so this also checks that the manifest's interval -> graph/selector maps agree with the
    pack's routing.
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    from .unet import example_inputs

    from qpdeploy.runtimes.runners import TorchUNetRunner

    specs = [spec.to_json() for spec in inputs]
    torch_runner = TorchUNetRunner.from_unet(unet, specs, outputs[0].name)
    sessions = {}
    result = []
    dispatch = plan.dispatch
    for k in range(intervals.k):
        g = dispatch.graph(k)
        if g not in sessions:
            sessions[g] = ort_session(graph_files[g])
        lo, hi = intervals.bounds(k)
        feed = example_inputs(inputs, batch, seed=seed + k, timestep=(lo + hi) / 2)
        feed.update(dispatch.selector_feed([k] * batch))
        feed = {name: value.numpy() for name, value in feed.items()}
        ort_runner = OnnxrtRunner(sessions[g], name=f"onnxrt-{plan.graphs[g].name}")
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            runs = Comparator.run([torch_runner, ort_runner], data_loader=[feed])
            accuracy = Comparator.compare_accuracy(runs, compare_func=_sqnr_compare(min_db))
        verdict = next(iter(accuracy[0].values()))[0][outputs[0].name]  # (runner pair) -> iterations
        result.append(verdict.db)
    return result


def _sqnr_compare(min_db: float):
    def compare(reference, test):
        return {name: _SQNR(_capped_sqnr(reference[name], test[name]), min_db) for name in reference.keys()}

    return compare


def _capped_sqnr(reference, test) -> float:
    db = sqnr_db(torch.from_numpy(np.asarray(reference)), torch.from_numpy(np.asarray(test)))
    return SQNR_CAP_DB if math.isinf(db) or db > SQNR_CAP_DB else db
