"""Post-training quantization side by side: qpdeploy against NVIDIA Model Optimizer.

    python benchmarks/ptq_peers.py [--model miniworld] [--calib-sizes 32,64,128] [--threads 2] \
        --out benchmarks/results/ptq_peers.json

One run records the float model's DDIM trajectories once (qpdeploy's calibration prompts and
guidance; the held-out prompts are never calibrated on) and gives every row the same UNet
calls: calibration calls spread over the schedule, ``--calib-sizes`` of them (three sizes show
how stable each method is), and every call of the held-out trajectories for scoring. Each
row reports the UNet-output SQNR against full precision overall and per timestep quarter,
the number of quantized layers and its seconds; each peer row also gives qpdeploy's SQNR minus
its own on the same calls, with a 95% paired bootstrap interval over the held-out calls.

Rows:
- ``qpdeploy``: ``quantize``'s W8A8 default (per-channel weights with the L2.4 clipping
  search, per-tensor activations, shortcut split, the skip list).
- ``qpdeploy_act_output``: the same with ``--act-search output`` (each activation range
  refined against its layer's output error).
- ``qpdeploy_w4a8`` / ``qpdeploy_w4a16``: INT4 per-channel weights with the same search, INT8
  or float activations, weights rounded to nearest; ``..._block``: the same with learned
  rounding (``quantize --rounding block``: BRECQ with AdaRound, ``qpdeploy.reconstruct``).
- ``modelopt_int8`` / ``modelopt_smoothquant``: Model Optimizer's ``INT8_DEFAULT_CFG`` and
  ``INT8_SMOOTHQUANT_CFG`` as shipped (their own layer selection), and ``..._matched``: the
  same algorithms on exactly the layers qpdeploy quantizes (every other quantizer off).
- ``modelopt_int4_awq`` (``_matched``): Model Optimizer's ``INT4_AWQ_CFG``, INT4 weights in
  blocks of 128 along a weight's last axis (128 inputs of a linear layer, but one kernel row
  of a 3x3 convolution), float activations; compared with ``qpdeploy_w4a16_block``.
  ``modelopt_int4_awq_matched_in128``: the same on qpdeploy's layers with the blocks along the
  input channels (128 weights per scale for convolutions and linear layers alike, the usual
  meaning of INT4 with group size 128). Every row reports ``weights_per_scale``, so such
  differences in format are visible.

Each row that has a reference row (``REFERENCE``) run on the same calls gets
``<reference>_minus_this_db``: the reference's SQNR minus its own, with the paired interval.

- ``ort_qdq`` / ``ort_qdq_matched``: ONNX Runtime's static quantizer
  (``onnxruntime.quantization.quantize_static``, QDQ format, INT8 weights per channel and INT8
  activations, MinMax calibration on the same calls) on the float UNet exported to ONNX, its
  default operator set (every operator it can quantize) or only the Conv / MatMul / Gemm nodes
  of qpdeploy's layers; scored by running the QDQ graph in ONNX Runtime (its integer kernels
  on a CPU). SD 1.x / 2.x UNets (no added conditioning inputs).

Model Optimizer is optional (``pip install -e ".[peers]"``): without it its rows are listed
under ``not_run`` with the reason. ONNX Runtime is a dependency of qpdeploy.
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qpdeploy.calibrate import sqnr_by_interval, spread_over_schedule, unet_outputs
from qpdeploy.config import QuantizeConfig
from qpdeploy.io import write_json
from qpdeploy.models import load_pipeline
from qpdeploy.ptq import calibration_prompts, quantize_unet, record_calibration, resolve_config
from qpdeploy.qunet import plan_layers

# qpdeploy's rows: QuantizeConfig changes from quantize's defaults.
QPDEPLOY_ROWS = {
    "qpdeploy": {},
    "qpdeploy_act_output": {"act_search": "output"},
    "qpdeploy_w4a8": {"weight_bits": 4},
    "qpdeploy_w4a8_block": {"weight_bits": 4, "rounding": "block"},
    "qpdeploy_w4a16": {"weight_bits": 4, "act_bits": None},
    "qpdeploy_w4a16_block": {"weight_bits": 4, "act_bits": None, "rounding": "block"},
}
MODELOPT_ROWS = ("modelopt_int8", "modelopt_int8_matched", "modelopt_smoothquant", "modelopt_smoothquant_matched",
                 "modelopt_int4_awq", "modelopt_int4_awq_matched", "modelopt_int4_awq_matched_in128")
ORT_ROWS = ("ort_qdq", "ort_qdq_matched")
ORT_WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")  # the nodes that carry a layer's weight
# The row each row is compared with (paired, same calls), when both ran: "<that>_minus_this_db".
REFERENCE = {
    **{name: "qpdeploy" for name in (*MODELOPT_ROWS, *ORT_ROWS) if "int4" not in name},  # the INT8 peers
    "qpdeploy_act_output": "qpdeploy",  # what the output-error activation search adds (negative: a gain)
    "qpdeploy_w4a8": "qpdeploy_w4a8_block",  # what learned rounding adds
    "qpdeploy_w4a16": "qpdeploy_w4a16_block",
    "modelopt_int4_awq": "qpdeploy_w4a16_block",  # weight-only INT4 against weight-only INT4
    "modelopt_int4_awq_matched": "qpdeploy_w4a16_block",
    "modelopt_int4_awq_matched_in128": "qpdeploy_w4a16_block",
}


def modelopt_config(name: str, layers: list[str]) -> dict:
    """The Model Optimizer config of a row: a shipped config, or its algorithm restricted to
    ``layers`` (the shipped config's weight and input quantizers on those layers only)."""
    import modelopt.torch.quantization as mtq

    shipped = (mtq.INT4_AWQ_CFG if "awq" in name else mtq.INT8_SMOOTHQUANT_CFG if "smoothquant" in name
               else mtq.INT8_DEFAULT_CFG)
    if "_matched" not in name:
        return copy.deepcopy(shipped)
    entries = [{"quantizer_name": "*", "enable": False}]
    for layer in layers:
        if "awq" in name:  # INT4 weights in blocks of 128 along the last axis as shipped, or the input channels
            axis = 1 if name.endswith("_in128") else -1
            entries.append({"quantizer_name": f"{layer}.weight_quantizer",
                            "cfg": {"num_bits": 4, "block_sizes": {axis: 128, "type": "static"}}})
            continue
        entries.append({"quantizer_name": f"{layer}.weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}})
        entries.append({"quantizer_name": f"{layer}.input_quantizer", "cfg": {"num_bits": 8, "axis": None}})
    return {"quant_cfg": entries, "algorithm": shipped["algorithm"]}


def modelopt_quantize(fp_unet, name: str, layers: list[str], calib, device) -> tuple[torch.nn.Module, int]:
    """A Model Optimizer fake-quantized copy of ``fp_unet`` calibrated on ``calib``, and how
    many layers have an enabled weight quantizer."""
    import modelopt.torch.quantization as mtq

    model = copy.deepcopy(fp_unet).to(device)

    def forward_loop(m):
        for call in calib:
            args, kwargs = call.to(device)
            m(*args, **kwargs)

    with torch.no_grad():
        model = mtq.quantize(model, modelopt_config(name, layers), forward_loop)
    quantized = sum(1 for n, m in model.named_modules() if n.endswith("weight_quantizer") and m.is_enabled)
    return model, quantized


def weights_per_scale(model) -> float:
    """Quantized weights per weight scale: a per-output-channel scale covers a whole row
    (C_in x kernel weights); Model Optimizer's INT4 blocks of 128 along a weight's last axis
    cover 128 inputs of a linear layer but only one kernel row (3 weights) of a 3x3 conv."""
    from qpdeploy.layers import QuantLayer

    weights = scales = 0
    for module in model.modules():
        if isinstance(module, QuantLayer):
            weights, scales = weights + module.weight_shape.numel(), scales + module.s_ptq.numel()
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is not None and quantizer.is_enabled and getattr(quantizer, "amax", None) is not None:
            weights, scales = weights + module.weight.numel(), scales + quantizer.amax.numel()
    return round(weights / max(scales, 1), 1)


def ort_feed(sample, timestep, encoder_hidden_states) -> dict:
    """A UNet call's arguments as the float graph's numpy inputs."""
    return {"sample": sample.float().numpy(), "timestep": torch.as_tensor(timestep).numpy(),
            "encoder_hidden_states": encoder_hidden_states.float().numpy()}


class OrtUNet:
    """A UNet-shaped callable over an ONNX Runtime session of ``(sample, timestep,
    encoder_hidden_states) -> noise``, so :func:`unet_outputs` scores it like a torch model."""

    def __init__(self, path: Path, threads: int):
        # ONNX Runtime's own default session (its fused integer kernels), as its users run a QDQ
        # graph; not qpdeploy's runtime settings (exporters.verify.ort_session), chosen to
        # compute the graph's Q/DQ math exactly
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, sample, timestep, encoder_hidden_states=None, return_dict=False, **extra):
        if extra:
            raise ValueError(f"ONNX Runtime rows take SD 1.x / 2.x UNet calls; this one also has {sorted(extra)}")
        return (torch.from_numpy(self.session.run(None, ort_feed(sample, timestep, encoder_hidden_states))[0]),)


class _FloatUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def ort_float_graph(fp_unet, call, folder: Path) -> Path:
    """The float UNet as ONNX (traced on ``call``'s shapes, batch dynamic), shape-inferred and
    pre-processed for quantization (``quant_pre_process``)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from qpdeploy.exporters.tracing import torchscript_export

    (sample, timestep), kwargs = call.args, call.kwargs
    if set(kwargs) != {"encoder_hidden_states"}:
        raise ValueError(f"ONNX Runtime rows take SD 1.x / 2.x UNets; calls carry {sorted(kwargs)}")
    names = ["sample", "timestep", "encoder_hidden_states"]
    cpu_unet = fp_unet if next(fp_unet.parameters()).device.type == "cpu" else copy.deepcopy(fp_unet).cpu()
    graph = torchscript_export(_FloatUNet(cpu_unet), (sample, timestep, kwargs["encoder_hidden_states"]),
                               names, ["noise"], 17, folder,
                               dynamic_axes={"sample": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
                                             "noise": {0: "batch"}})
    raw, prepared = folder / "unet_float_raw.onnx", folder / "unet_float.onnx"
    onnx.save(graph, str(raw))
    quant_pre_process(str(raw), str(prepared), skip_symbolic_shape=True)
    return prepared


def ort_layer_nodes(graph_path: Path, layers: list[str]) -> list[str]:
    """The Conv / MatMul / Gemm nodes that compute ``layers`` (TorchScript names a node
    ``/unet/<module path with / for .>/<op>``)."""
    import onnx

    wanted = set(layers)
    nodes = []
    for node in onnx.load(str(graph_path), load_external_data=False).graph.node:
        scope = node.name.rsplit("/", 1)[0].removeprefix("/unet/").replace("/", ".")
        if node.op_type in ORT_WEIGHTED_OPS and scope in wanted:
            nodes.append(node.name)
    return nodes


def ort_quantize(name: str, graph_path: Path, layers: list[str], calib, threads: int) -> tuple[OrtUNet, int, float]:
    """ONNX Runtime's static QDQ quantization of the float graph calibrated on ``calib``: the
    session, how many Conv / MatMul / Gemm nodes got quantized weights, and weights per scale."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.calls = iter(calib)

        def get_next(self):
            call = next(self.calls, None)
            if call is None:
                return None
            (sample, timestep), kwargs = call.args, call.kwargs
            return ort_feed(sample, timestep, kwargs["encoder_hidden_states"])

    out = graph_path.with_name(f"{name}.onnx")
    matched = name.endswith("_matched")
    nodes = ort_layer_nodes(graph_path, layers) if matched else None
    if matched and len(nodes) != len(layers):
        raise RuntimeError(f"found {len(nodes)} ONNX nodes for qpdeploy's {len(layers)} layers")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # per-channel axis warnings for every 1-D constant of a norm layer
    try:
        quantize_static(str(graph_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        op_types_to_quantize=list(ORT_WEIGHTED_OPS) if matched else None)
    finally:
        root.setLevel(level)
    graph = onnx.load(str(out)).graph
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    weighted = weights = scales = 0
    for node in graph.node:
        if node.op_type not in ORT_WEIGHTED_OPS or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in sizes:  # a constant weight
            weighted, weights, scales = weighted + 1, weights + sizes[dq.input[0]], scales + sizes[dq.input[1]]
    return OrtUNet(out, threads), weighted, round(weights / max(scales, 1), 1)


BOOTSTRAP = 2000  # resamples of the held-out calls


def quantized_layers(fp_unet, config: QuantizeConfig) -> list[str]:
    """The layers ``quantize`` quantizes with ``config`` (the matched peers' layer set)."""
    return [p.name for p in plan_layers(fp_unet, config) if p.quantized]


def score(fp_out, model, held, intervals, device) -> tuple[dict, list[float]]:
    """SQNR overall and per quarter, and each held-out call's noise energy (for the paired
    bootstrap of differences between rows)."""
    with torch.no_grad():
        out = unet_outputs(model, held, device)
    overall, quarters = sqnr_by_interval(fp_out, out, held, intervals)
    noise = [float(((r - t) ** 2).sum()) for r, t in zip(fp_out, out)]
    return {"sqnr_db": round(overall, 3), "sqnr_db_per_quarter": [None if q is None else round(q, 3) for q in quarters]}, noise


def paired_difference(signal: list[float], a: list[float], b: list[float], seed: int = 0) -> dict:
    """SQNR(a) - SQNR(b) in dB on the same held-out calls, with a 95% bootstrap interval over
    the calls (resampled together for both rows: the comparison is paired)."""
    signal, a, b = map(np.asarray, (signal, a, b))
    point = 10 * np.log10(b.sum() / a.sum())
    idx = np.random.default_rng(seed).integers(0, len(signal), size=(BOOTSTRAP, len(signal)))
    diffs = 10 * np.log10(b[idx].sum(axis=1) / a[idx].sum(axis=1))
    low, high = np.quantile(diffs, [0.025, 0.975])
    return {"mean": round(float(point), 3), "low": round(float(low), 3), "high": round(float(high), 3)}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pipe = load_pipeline(args.model)
    config = resolve_config(pipe, QuantizeConfig(calib_steps=args.calib_steps, seed=args.seed))
    if args.split == "dev":  # the held-out prompts stay unseen: score on the last calibration prompts instead
        config = config.replace(calib_prompts=tuple(calibration_prompts(pipe, config)[0]))
    pipe.to(device)
    fp_unet = pipe.unet.eval()
    timesteps = pipe.scheduler.config.num_train_timesteps
    intervals = config.make_intervals(timesteps)
    quarters = config.replace(intervals=4).make_intervals(timesteps)
    start = time.perf_counter()
    calib_all, held = record_calibration(pipe, config)
    if args.heldout_calls:
        held = spread_over_schedule(held, args.heldout_calls)
    trajectory_seconds = time.perf_counter() - start
    fp_out = [call.output for call in held]  # the float UNet's outputs, kept while recording
    signal = [float((r**2).sum()) for r in fp_out]
    rows, not_run = [], {}
    try:
        import modelopt.torch.quantization  # noqa: F401
        peers = [r for r in MODELOPT_ROWS if r in args.rows]
    except ImportError:
        peers = []
        not_run.update({r: "nvidia-modelopt not installed" for r in MODELOPT_ROWS if r in args.rows})
    scratch = Path(tempfile.mkdtemp(prefix="ptq-peers-"))  # the ONNX Runtime rows' graphs
    graph_path = None
    try:
        for size in args.calib_sizes:
            calib = spread_over_schedule(calib_all, size)
            noise, layers = {}, None
            for name in [r for r in QPDEPLOY_ROWS if r in args.rows]:
                t0 = time.perf_counter()
                info = {}
                qunet, plans = quantize_unet(fp_unet, config.replace(calib_samples=size, **QPDEPLOY_ROWS[name]),
                                             intervals, calib, device, info=info)
                layers = [p.name for p in plans if p.quantized]
                scores, noise[name] = score(fp_out, qunet, held, quarters, device)
                rows.append({"row": name, "calibration_calls": len(calib), "layers_quantized": len(layers),
                             "weights_per_scale": weights_per_scale(qunet), **scores,
                             "seconds": round(time.perf_counter() - t0, 2),
                             **({"rounding": info["rounding"]} if "rounding" in info else {})})
            for name in [r for r in ORT_ROWS if r in args.rows]:
                t0 = time.perf_counter()
                if graph_path is None:
                    graph_path = ort_float_graph(fp_unet, calib_all[0], scratch)
                model, count, per_scale = ort_quantize(name, graph_path, layers or quantized_layers(fp_unet, config),
                                                       calib, args.threads)
                scores, noise[name] = score(fp_out, model, held, quarters, device)
                rows.append({"row": name, "calibration_calls": len(calib), "layers_quantized": count,
                             "weights_per_scale": per_scale, **scores, "seconds": round(time.perf_counter() - t0, 2)})
                del model
            for name in peers:
                t0 = time.perf_counter()
                model, count = modelopt_quantize(fp_unet, name, layers or quantized_layers(fp_unet, config), calib, device)
                scores, noise[name] = score(fp_out, model, held, quarters, device)
                rows.append({"row": name, "calibration_calls": len(calib), "layers_quantized": count,
                             "weights_per_scale": weights_per_scale(model), **scores,
                             "seconds": round(time.perf_counter() - t0, 2)})
            for row in rows:
                reference = REFERENCE.get(row["row"])
                if row["calibration_calls"] == len(calib) and reference in noise:  # same calls: a paired comparison
                    row[f"{reference}_minus_this_db"] = paired_difference(signal, noise[reference], noise[row["row"]])
            for row in rows[-len(noise):]:
                print(_line(row), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "command": "python benchmarks/ptq_peers.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "settings": {"split": args.split, "calib_steps": config.calib_steps, "calib_guidance": config.guidance, "seed": config.seed,
                     "calib_sizes": args.calib_sizes, "heldout_calls": len(held), "trajectory_calls": len(calib_all),
                     "threads": args.threads, "device": str(device)},
        "rows": rows,
        "spread_db": spread(rows),
        "not_run": not_run,
        "trajectory_seconds": round(trajectory_seconds, 2),
        "versions": _versions(),
    }


def spread(rows: list[dict]) -> dict[str, float]:
    """Per row kind, max - min SQNR over the calibration sizes (stability)."""
    out = {}
    for name in dict.fromkeys(r["row"] for r in rows):
        values = [r["sqnr_db"] for r in rows if r["row"] == name]
        out[name] = round(max(values) - min(values), 3)
    return out


def _line(row: dict) -> str:
    quarters = " ".join("-" if q is None else f"{q:5.1f}" for q in row["sqnr_db_per_quarter"])
    return (f"{row['row']:>30} calib {row['calibration_calls']:4d}  layers {row['layers_quantized']:4d}  "
            f"SQNR {row['sqnr_db']:6.2f} dB  quarters {quarters}  {row['seconds']:.1f} s")


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import modelopt

        out["modelopt"] = modelopt.__version__
    except ImportError:
        pass
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="miniworld")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calib-sizes", default="32,64,128", help="calibration calls, comma-separated")
    parser.add_argument("--calib-steps", type=int, default=20)
    parser.add_argument("--heldout-calls", type=int, default=0, help="score on this many held-out calls (0: all)")
    parser.add_argument("--rows", default=",".join(("qpdeploy", *MODELOPT_ROWS)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("test", "dev"), default="test",
                        help="test: score on the held-out prompts; dev: on the last of the calibration prompts "
                             "(calibrating on the others), for choosing settings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.calib_sizes = [int(v) for v in args.calib_sizes.split(",")]
    args.rows = args.rows.split(",")
    unknown = set(args.rows) - {*QPDEPLOY_ROWS, *MODELOPT_ROWS, *ORT_ROWS}
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    report = run(args)
    write_json(args.out, report)
    print(f"report -> {args.out}")


if __name__ == "__main__":
    main()
