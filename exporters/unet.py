"""Export the quantized UNet (with its pack installed) to ONNX graphs in one of three layouts.

Layouts (docs/design.md, "Export layouts"):

- ``per-interval``: one graph per distinct (scale set, activation-scale row) among the K
  intervals, scales baked into the weight DequantizeLinear. Intervals that use identical
  scales share one graph (a baseline pack on a base with global activation scales needs one
  graph; S2 needs K). All graphs reference one external weights file.
- ``masked``: one graph with an extra (B,) int32 input ``tuned``: 1 selects the pack's tuned
  scale set, 0 the post-training scales (S1 and baseline packs).
- ``multi-expert``: one graph with a (B,) int32 input ``expert`` selecting a row of each
  layer's scale table: rows 0..E-1 are the pack's sets, row E the post-training scales.
- ``multi-subject``: the multi-expert graph with its tables as inputs, fed from a small file
  that holds every subject's rows (:mod:`.subjects`).

The table layouts need per-tensor activation scales that do not depend on the interval
(TensorRT wants constant Q/DQ scales), so a base calibrated with per-interval activation
scales exports per-interval only.

How: the quantized layers are swapped for their export twins (:class:`~.qdq.QDQLayer`), the
UNet is traced once with the TorchScript exporter with every scale tensor as a graph input,
and the traced graph becomes each layout graph by turning those inputs into initializers
(one set of values per graph). The integer weights and float parameters are moved into one
shared external-data file, so K per-interval graphs cost K small .onnx files plus one copy
of the weights. The TorchScript exporter is used rather than the dynamo one because in
torch 2.13 the latter took ~65 s versus ~3 s on a tiny SDXL UNet and needs guards for
diffusers' batch-size branches (``shape[0] >= 64`` in upsampling); it is also the route
NVIDIA's diffusion demos use.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qpdeploy.errors import QPDeployError
from qpdeploy.layers import QuantLayer, quant_layers
from qpdeploy.qunet import get_router

from .config import LAYOUTS
from .qdq import QDQLayer, baked_consts, table_consts
from .tracing import torchscript_export

OUTPUT_NAME = "noise_pred"
SELECTOR_INPUT = {"masked": "tuned", "multi-expert": "expert", "multi-subject": "expert"}
SHARED_WEIGHTS_FILE = "unet.weights"
EXTERNAL_MIN_BYTES = 1024  # smaller shared tensors stay inline in each .onnx
ALIGN = 64  # byte alignment of tensors in the shared weights file (mmap-friendly)


@dataclass(frozen=True)
class UNetGraph:
    """One UNet graph: its name, the intervals it serves, and (per-interval layout) the
    scale-set row and activation-scale row baked into it."""

    name: str
    intervals: tuple[int, ...]
    scale_set: int | None = None
    act_row: int | None = None


@dataclass(frozen=True)
class UNetPlan:
    """Which graphs a layout needs and how the runtime picks one for an interval.

    ``selector_values[k]`` is what to feed the selector input in interval k (table layouts);
    ``table_rows[v]`` is the scale-set row that selector value v picks.
    """

    layout: str
    graphs: tuple[UNetGraph, ...]
    graph_of_interval: tuple[int, ...]
    selector: str | None = None
    selector_values: tuple[int, ...] | None = None
    table_rows: tuple[int, ...] | None = None

    @property
    def dispatch(self):
        """The interval -> graph / selector rule of this plan (:class:`.manifest.Dispatch`)."""
        from .manifest import Dispatch

        return Dispatch(self.graph_of_interval, self.selector, self.selector_values)


def plan_unet(base, layout: str) -> UNetPlan:
    """The graphs of ``layout`` for the base's UNet with its current pack (or none).

    Raises:
        QPDeployError: the layout does not fit the pack or the base (named in the message).
    """
    if layout not in LAYOUTS:
        raise QPDeployError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    router = get_router(base.unet)
    k, num_sets = router.intervals.k, router.num_sets
    set_of = [int(e) for e in router.set_of_interval.tolist()]
    per_interval_act = _per_interval_act(base)
    if layout == "per-interval":
        keys = [(set_of[i], i if per_interval_act else 0) for i in range(k)]
        distinct = list(dict.fromkeys(keys))
        graphs = tuple(
            UNetGraph("unet" if len(distinct) == 1 else f"unet_{g}",
                      tuple(i for i in range(k) if keys[i] == key), key[0], key[1])
            for g, key in enumerate(distinct)
        )
        return UNetPlan(layout, graphs, tuple(distinct.index(key) for key in keys))
    if per_interval_act:
        raise QPDeployError(
            f"the {layout} layout needs a base with global activation scales (TensorRT needs constant "
            "Q/DQ scales, and this base has one per interval); use --layout per-interval"
        )
    if layout == "masked":
        if num_sets != 1:
            raise QPDeployError(
                f"the masked layout chooses between one tuned scale set and the post-training scales, but "
                f"{'there is no pack' if num_sets == 0 else f'the pack has {num_sets} sets'}; use multi-expert or per-interval"
            )
        values = tuple(1 if e < num_sets else 0 for e in set_of)
        rows = (num_sets, 0)  # value 0 -> post-training row, value 1 -> tuned set 0
    elif layout == "multi-subject":
        # the tables are graph inputs fed by the runtime (.subjects); these rows only give
        # the traced graph its shapes, and every interval starts at row 0 (post-training)
        values, rows = (0,) * k, (num_sets,) + tuple(range(num_sets))
    else:
        values, rows = tuple(set_of), tuple(range(num_sets + 1))
    graph = UNetGraph("unet", tuple(range(k)))
    return UNetPlan(layout, (graph,), (0,) * k, SELECTOR_INPUT[layout], values, rows)


def default_layout(base, strategy: str | None) -> str:
    """The layout a pack exports to by default: masked for S1, else per-interval (also for
    S1 on a base with per-interval activation scales, which the masked layout cannot carry)."""
    from qpdeploy.strategies import get_strategy

    layout = "per-interval" if strategy is None else get_strategy(strategy).layout
    return "per-interval" if layout == "masked" and _per_interval_act(base) else layout


def _per_interval_act(base) -> bool:
    return base.config.act_bits is not None and base.config.act_scales == "per-interval"


# ------------------------------------------------------------------------------------
# Inputs and outputs
# ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (numpy name) and shape of a graph input/output; "batch" is dynamic."""

    name: str
    dtype: str
    shape: tuple

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def unet_io(unet, plan: UNetPlan, latent_hw: tuple[int, int], seq_len: int,
            text_embeds_dim: int | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of the UNet graphs (batch dynamic, everything else fixed)."""
    cfg = unet.config
    h, w = latent_hw
    inputs = [
        TensorSpec("sample", "float32", ("batch", cfg.in_channels, h, w)),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", seq_len, cfg.cross_attention_dim)),
    ]
    if cfg.addition_embed_type == "text_time":
        embeds, time_ids = sdxl_added_dims(cfg, text_embeds_dim)
        inputs += [TensorSpec("text_embeds", "float32", ("batch", embeds)),
                   TensorSpec("time_ids", "float32", ("batch", time_ids))]
    elif cfg.addition_embed_type is not None or cfg.class_embed_type is not None:
        raise QPDeployError(
            "export supports UNets without extra conditioning or with SDXL's text_time embedding, "
            f"not addition_embed_type={cfg.addition_embed_type!r} / class_embed_type={cfg.class_embed_type!r}"
        )
    if plan.selector is not None:
        inputs.append(TensorSpec(plan.selector, "int32", ("batch",)))
    outputs = [TensorSpec(OUTPUT_NAME, "float32", ("batch", cfg.out_channels, h, w))]
    return inputs, outputs


def sdxl_added_dims(cfg, text_embeds_dim: int | None = None) -> tuple[int, int]:
    """(pooled text embedding width, number of time ids) of an SDXL UNet.

    Without ``text_embeds_dim`` (the second text encoder's projection width) SDXL base's six
    time ids (original size, crop, target size) are assumed.
    """
    total, per_id = cfg.projection_class_embeddings_input_dim, cfg.addition_time_embed_dim
    if text_embeds_dim is None:
        return total - 6 * per_id, 6
    return text_embeds_dim, (total - text_embeds_dim) // per_id


def example_inputs(specs: list[TensorSpec], batch: int, seed: int = 0, timestep: float = 500.0,
                   selector_value: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random inputs of the given specs (batch ``batch``); timestep and selector fixed."""
    gen = torch.Generator().manual_seed(seed)
    feed = {}
    for spec in specs:
        shape = tuple(batch if d == "batch" else d for d in spec.shape)
        if spec.name == "timestep":
            feed[spec.name] = torch.full(shape, float(timestep))
        elif spec.dtype == "int32":
            feed[spec.name] = torch.full(shape, selector_value, dtype=torch.int32)
        elif spec.name == "time_ids":
            feed[spec.name] = torch.randint(0, 1024, shape, generator=gen).float()
        else:
            feed[spec.name] = torch.randn(shape, generator=gen)
    return feed


# ------------------------------------------------------------------------------------
# Tracing
# ------------------------------------------------------------------------------------

class UNetForExport(nn.Module):
    """The UNet with export twins, taking every scale tensor as an extra positional input.

    ``const_keys`` lists (layer name, const name) in the order of the extra inputs.
    """

    def __init__(self, unet, twins: dict[str, QDQLayer], const_keys, n_graph_inputs: int, selector: bool):
        super().__init__()
        self.unet = unet
        self.twins = twins
        self.const_keys = list(const_keys)
        self.n_graph_inputs = n_graph_inputs
        self.selector = selector

    def forward(self, *inputs):
        graph_inputs, consts = inputs[: self.n_graph_inputs], inputs[self.n_graph_inputs:]
        select = graph_inputs[-1] if self.selector else None
        for twin in self.twins.values():
            twin.consts, twin.select = {}, select
        for (layer, key), value in zip(self.const_keys, consts):
            self.twins[layer].consts[key] = value
        names = UNET_FEED[:5 if self.unet.config.addition_embed_type == "text_time" else 3]
        return call_unet(self.unet, dict(zip(names, graph_inputs)))


UNET_FEED = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")  # graph input order


def call_unet(unet, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    """The UNet's noise prediction for a feed named like the UNet graph's inputs (``UNET_FEED``;
    SDXL's ``text_embeds`` and ``time_ids`` when present): the one feed-to-UNet call of export
    tracing, export verification and the runtime's torch backend."""
    added = {"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]} if "time_ids" in feed else None
    return unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"], added_cond_kwargs=added,
                return_dict=False)[0]


@contextlib.contextmanager
def export_twins(unet):
    """Swap every quantized layer for its :class:`QDQLayer` twin (restored on exit).

    The router's per-call routing is switched off meanwhile: the twins get their scales as
    inputs, so the graph must not contain the timestep -> interval lookup.
    """
    originals: dict[str, QuantLayer] = dict(quant_layers(unet))
    twins = {name: QDQLayer(layer) for name, layer in originals.items()}
    router = get_router(unet)
    for name, twin in twins.items():
        _set_submodule(unet, name, twin)
    try:
        with router.manual():
            yield twins
    finally:
        for name, layer in originals.items():
            _set_submodule(unet, name, layer)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def graph_consts(unet, plan: UNetPlan, graph: UNetGraph) -> dict[tuple[str, str], torch.Tensor]:
    """Every scale tensor of one graph, keyed by (layer name, const name)."""
    consts = {}
    for name, layer in quant_layers(unet):
        if plan.layout == "per-interval":
            values = baked_consts(layer, graph.act_row, graph.scale_set)
        else:
            values = table_consts(layer, list(plan.table_rows))
        consts.update({(name, key): value for key, value in sorted(values.items())})
    return consts


def const_input_name(layer: str, key: str) -> str:
    """ONNX initializer name of one scale tensor (``<layer>.<const>``)."""
    return f"{layer}.{key}"


def trace_unet(unet, plan: UNetPlan, inputs: list[TensorSpec], outputs: list[TensorSpec], opset: int,
               scratch_dir):
    """Trace the UNet once; return (template ModelProto, scale input names, per-graph values).

    The template has the scale tensors as graph inputs; :func:`bind_consts` turns them into
    initializers holding one graph's values.
    """
    per_graph = [graph_consts(unet, plan, g) for g in plan.graphs]
    keys = list(per_graph[0])
    names = [const_input_name(*key) for key in keys]
    feed = example_inputs(inputs, batch=2)  # batch 2: a traced size of 1 could be specialised
    with export_twins(unet) as twins:
        wrapper = UNetForExport(unet, twins, keys, len(inputs), plan.selector is not None)
        model = torchscript_export(
            wrapper, tuple(feed.values()) + tuple(per_graph[0].values()),
            [s.name for s in inputs] + names, [s.name for s in outputs], opset, scratch_dir,
            dynamic_axes={s.name: {0: "batch"} for s in inputs + outputs},
        )
    values = [{name: graph[key] for name, key in zip(names, keys)} for graph in per_graph]
    return model, names, values


def bind_consts(template, values: dict[str, torch.Tensor]):
    """A copy of the template whose scale inputs are initializers holding ``values``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(template)
    kept = [i for i in model.graph.input if i.name not in values]
    missing = set(values) - {i.name for i in model.graph.input}
    if missing:
        # A scale the exporter dropped would silently use nothing: refuse.
        raise RuntimeError(f"traced UNet lost scale inputs, for example {sorted(missing)[0]}")
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for name, value in values.items():
        model.graph.initializer.append(numpy_helper.from_array(value.detach().float().numpy(), name))
    return model


def externalize_shared(template, const_names, weights_path: Path) -> int:
    """Move the template's shared initializers (all but the scales) into one external file.

    The tensors keep their names and get ``location/offset/length`` entries, so every graph
    copied from this template points at the same bytes. Returns the file size.
    """
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import set_external_data

    skip = set(const_names)
    offset = 0
    with open(weights_path, "wb") as f:
        for tensor in template.graph.initializer:
            if tensor.name in skip:
                continue
            data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            if len(data) < EXTERNAL_MIN_BYTES:
                continue
            pad = (-offset) % ALIGN
            f.write(b"\0" * pad + data)
            offset += pad
            for data_field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(data_field)
            tensor.raw_data = data
            set_external_data(tensor, weights_path.name, offset, len(data))
            tensor.data_location = TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            offset += len(data)
    return weights_path.stat().st_size


@dataclass
class UNetFiles:
    """What :func:`export_unet` wrote: one .onnx per graph plus the shared weights file;
    ``tables``: the scale-table inputs of a multi-subject graph (fed by the runtime)."""

    plan: UNetPlan
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    onnx_files: list[str]
    weights_file: str
    weights_bytes: int
    tables: list[TensorSpec] = field(default_factory=list)


def export_unet(base, layout: str, out_dir, latent_hw: tuple[int, int], seq_len: int, opset: int = 18,
                text_embeds_dim: int | None = None, plan: UNetPlan | None = None) -> UNetFiles:
    """Write the UNet graphs of ``layout`` into ``out_dir`` (the base's current pack installed).

    ``plan``: the graphs to write (default: :func:`plan_unet` of ``layout``). In the
    multi-subject layout the scale tables stay graph inputs with a dynamic ``rows`` dimension
    (:mod:`.subjects`); every other layout binds every scale as an initializer.

    Returns:
        The plan and file names (relative to ``out_dir``).
    """
    import onnx

    from .subjects import LAYOUT as SUBJECTS_LAYOUT, ROWS_DIM, is_table_input

    out_dir = Path(out_dir)
    plan = plan or plan_unet(base, layout)
    inputs, outputs = unet_io(base.unet, plan, latent_hw, seq_len, text_embeds_dim)
    template, names, values = trace_unet(base.unet.eval(), plan, inputs, outputs, opset, out_dir)
    weights_bytes = externalize_shared(template, names, out_dir / SHARED_WEIGHTS_FILE)
    free = [n for n in names if is_table_input(n)] if plan.layout == SUBJECTS_LAYOUT else []
    tables = [TensorSpec(n, "float32", (ROWS_DIM, *values[0][n].shape[1:])) for n in free]
    files = []
    for graph, graph_values in zip(plan.graphs, values):
        model = bind_consts(template, {n: v for n, v in graph_values.items() if n not in free})
        _dynamic_rows(model, free, ROWS_DIM)
        _annotate(model, plan, graph)
        onnx.save(model, str(out_dir / f"{graph.name}.onnx"))
        files.append(f"{graph.name}.onnx")
    return UNetFiles(plan, inputs, outputs, files, SHARED_WEIGHTS_FILE, weights_bytes, tables)


def _dynamic_rows(model, names: list[str], dim: str) -> None:
    """Make the first dimension of the graph inputs ``names`` the symbolic ``dim``."""
    wanted = set(names)
    for graph_input in model.graph.input:
        if graph_input.name in wanted:
            first = graph_input.type.tensor_type.shape.dim[0]
            first.ClearField("dim_value")
            first.dim_param = dim


def _annotate(model, plan: UNetPlan, graph: UNetGraph) -> None:
    import onnx

    model.producer_name = "qpdeploy"
    props = {"qpdeploy.layout": plan.layout, "qpdeploy.graph": graph.name,
             "qpdeploy.intervals": ",".join(str(i) for i in graph.intervals)}
    for key, value in props.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
