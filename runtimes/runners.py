"""Runners: one interface for every backend, and the loaders that build them from a deploy dir.

The interface is Polygraphy's ``BaseRunner``: a context manager (``activate`` loads the model,
``deactivate`` frees it, both may repeat) whose ``infer(feeds)`` maps input names to tensors
and returns output names to tensors. Feeds here are torch tensors; outputs come back as torch
tensors on the runner's device.

- ONNX Runtime: Polygraphy's own ``OnnxrtRunner`` over :class:`SessionFromOnnxPath`, a loader
  in Polygraphy's style that adds what its ``SessionFromOnnx`` lacks: thread count, the CUDA
  execution provider's device, one CPU memory arena shared by every session of the process
  (:func:`shared_cpu_arena`), and :class:`SharedWeights`.
- TensorRT: :class:`qpdeploy.runtimes.trt.TrtRunner` (tensorrt imported lazily).
- torch: :class:`TorchUNetRunner`, the quantized PyTorch UNet with the pack applied.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from polygraphy.backend.base import BaseLoader, BaseRunner

from qpdeploy.errors import QPDeployError

from .config import RuntimeConfig

OPTIMIZATION_LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                       "all": "ORT_ENABLE_ALL"}


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (library errors are often many lines long)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


# ------------------------------------------------------------------------------------
# ONNX Runtime
# ------------------------------------------------------------------------------------

class SharedWeights:
    """The UNet graphs' shared external-data file, memory-mapped once for every session.

    Each initializer stored in the file becomes an ``OrtValue`` over its slice of the map and
    is handed to every session with ``SessionOptions.add_initializer``, which ONNX Runtime
    uses instead of reading (and copying) the bytes itself: K per-interval sessions then hold
    one copy of the weights, not K.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._map = None
        self._values = {}  # name -> (array, OrtValue); the arrays keep the map's pages alive
        self._lock = threading.Lock()  # sessions may load on a prefetch thread

    def initializers(self, model_path) -> dict:
        """``{name: OrtValue}`` for the initializers of ``model_path`` stored in this file."""
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)
        with self._lock:
            for tensor in model.graph.initializer:
                record = {e.key: e.value for e in tensor.external_data}
                if tensor.data_location == onnx.TensorProto.EXTERNAL and record.get("location") == self.path.name:
                    if tensor.name not in self._values:
                        self._values[tensor.name] = self._value(tensor, record)
            names = [t.name for t in model.graph.initializer if t.name in self._values]
        return {name: self._values[name][1] for name in names}

    def _value(self, tensor, record):
        import numpy as np
        import onnxruntime as ort
        from onnx import helper

        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        offset, length = int(record.get("offset", 0)), int(record["length"])
        array = np.frombuffer(self._map, dtype=dtype, count=length // dtype.itemsize, offset=offset)
        array = array.reshape(tuple(tensor.dims))
        return array, ort.OrtValue.ortvalue_from_numpy(array)


_ARENA_LOCK = threading.Lock()
_ARENA_REGISTERED = False


def shared_cpu_arena() -> None:
    """Register one CPU memory arena with ONNX Runtime's process-wide environment (once).

    Sessions opened with ``session.use_env_allocators`` take their CPU tensors from it, so
    the buffers of one call (activations, and the FP32 weights each DequantizeLinear makes
    when the INT8 weights are kept) are reused by the next call of any session, instead of
    being mapped and faulted in afresh every call: a session's own arena would keep a
    peak-sized arena per resident session, and no arena pays the page faults each call
    (measured with ``benchmarks/runtime.py``; README, "Runtime measurements"). The arena
    grows by what is asked (no power-of-two rounding) and keeps its memory for the process.
    """
    global _ARENA_REGISTERED
    import onnxruntime as ort

    with _ARENA_LOCK:
        if not _ARENA_REGISTERED:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
            _ARENA_REGISTERED = True


class SessionFromOnnxPath(BaseLoader):
    """Loader: an ONNX Runtime ``InferenceSession`` for an ONNX file (external data beside it).

    Args:
        path: the .onnx file.
        providers: execution providers in priority order (names or (name, options) pairs).
        threads: intra-op threads (0: ONNX Runtime's default).
        optimization: "none", "basic", "extended" or "all" (see RuntimeConfig). At "none" and
            "basic" the session computes the graph's Q/DQ arithmetic exactly as exported
            (bit for bit the unoptimized graph's outputs, with or without ``fold_weights``):
            these are the settings export verification measures
            (``qpdeploy.exporters.verify.ort_session``).
        fold_weights: at "basic", dequantize the weights once at load (see RuntimeConfig):
            ORT's Q/DQ handling is turned off (``session.disable_quant_qdq``), so its
            constant folding turns each weight's DequantizeLinear into an FP32 initializer,
            and weight prepacking is off (``session.disable_prepacking``): prepacked constant
            weights go through other GEMM kernels, whose different summation order changes
            the last bits, which the next activation quantizer can round to another code.
            Left at basic without it, ORT keeps the DequantizeLinear nodes (constant folding
            skips them) and has no Q/DQ fusions at that level (they come with "extended").
        shared: :class:`SharedWeights` whose initializers replace the file's own, or None.
        arena: CPU tensors come from the process's shared arena (:func:`shared_cpu_arena`);
            ORT's memory patterns are then off (with an arena they allocate a second
            peak-sized block). False: each call's buffers are allocated and freed afresh
            (memory patterns on): the least resident memory between calls, the slowest calls.
    """

    def __init__(self, path, providers=("CPUExecutionProvider",), threads: int = 0, optimization: str = "basic",
                 shared: SharedWeights | None = None, fold_weights: bool = False, arena: bool = True):
        if fold_weights and optimization != "basic":
            raise ValueError(f"fold_weights needs optimization 'basic', got {optimization!r}")
        self.path = Path(path)
        self.providers = list(providers)
        self.threads, self.optimization, self.shared, self.fold_weights = threads, optimization, shared, fold_weights
        self.arena = arena

    def session_options(self):
        """The ``SessionOptions`` this loader opens the file with (shared initializers aside)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[self.optimization])
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = False  # never a session's own arena (see shared_cpu_arena)
        options.log_severity_level = 3
        if self.fold_weights:  # see the class docstring
            options.add_session_config_entry("session.disable_quant_qdq", "1")
            options.add_session_config_entry("session.disable_prepacking", "1")
        if self.arena:
            options.enable_mem_pattern = False
            options.add_session_config_entry("session.use_env_allocators", "1")
        return options

    def call_impl(self):
        """Returns: the session. Raises: QPDeployError naming the file when it cannot load."""
        import onnxruntime as ort

        options = self.session_options()
        if self.arena:
            shared_cpu_arena()
        try:
            for name, value in (self.shared.initializers(self.path) if self.shared else {}).items():
                options.add_initializer(name, value)
            return ort.InferenceSession(str(self.path), options, providers=self.providers)
        except Exception as exc:  # onnx / onnxruntime raise many types; the user needs one line
            raise QPDeployError(f"cannot load {self.path}: {first_line(exc)}") from None


def ort_providers(device: str) -> tuple[list, torch.device]:
    """Execution providers for ``device`` and the device ONNX Runtime's outputs live on.

    "auto" picks the CUDA execution provider when onnxruntime-gpu sees a GPU, else the CPU.

    Raises:
        QPDeployError: "cuda" was asked for but onnxruntime has no CUDA execution provider.
    """
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    if device == "cpu" or (device == "auto" and not has_cuda):
        return ["CPUExecutionProvider"], torch.device("cpu")
    if not has_cuda:
        raise QPDeployError(f"device {device} needs onnxruntime-gpu and a CUDA GPU "
                            f"(onnxruntime has {', '.join(ort.get_available_providers())}); "
                            "install it with pip install 'qpdeploy[gpu]' or use --device cpu")
    index = torch.device(device if device != "auto" else "cuda").index or 0
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], torch.device("cpu")


def ort_runner(path, config: RuntimeConfig, shared: SharedWeights | None = None, name: str | None = None):
    """Polygraphy's ``OnnxrtRunner`` over :class:`SessionFromOnnxPath` (not yet activated)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    providers, _ = ort_providers(config.device)
    loader = SessionFromOnnxPath(path, providers, config.threads, config.ort_optimization, shared, config.fold_weights,
                                 config.arena)
    return OnnxrtRunner(loader, name=name or Path(path).stem)


# ------------------------------------------------------------------------------------
# torch: the reference
# ------------------------------------------------------------------------------------

class TorchUNetRunner(BaseRunner):
    """A quantized PyTorch UNet behind the runner interface: the runtime's torch backend and
    export verification's reference both run through it.

    One runner serves every interval: the quantized model routes each call to its scale set
    by the timestep itself (the same :class:`~qpdeploy.intervals.Intervals`), so selector
    feeds are ignored. Build it with :meth:`from_deploy` (activation loads the base and pack
    and checks both hashes against the manifest) or :meth:`from_unet` (a model in memory).
    Feeds may be torch tensors or numpy arrays; outputs are torch tensors.
    """

    def __init__(self, load, specs: list[dict], output: str, device="cpu", name="torch"):
        super().__init__(name=name)
        self.load, self.specs, self.output = load, specs, output
        self.device = torch.device(device)

    @classmethod
    def from_deploy(cls, manifest, base_dir, pack_dir=None, device="cpu", name="torch") -> "TorchUNetRunner":
        """The deploy dir's base with its pack applied (loaded at activation)."""
        return cls(lambda: load_reference_unet(manifest, base_dir, pack_dir, device), manifest.unet_inputs,
                   manifest.unet_output, device, name)

    @classmethod
    def from_unet(cls, unet, specs: list[dict], output: str, name="torch") -> "TorchUNetRunner":
        """A quantized UNet already in memory (its current pack and routing)."""
        return cls(lambda: unet, specs, output, next(unet.parameters()).device, name)

    def activate_impl(self):
        self.unet = self.load()

    def get_input_metadata_impl(self):
        import numpy as np
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for spec in self.specs:
            meta.add(spec["name"], np.dtype(spec["dtype"]), [None if d == "batch" else d for d in spec["shape"]])
        return meta

    def infer_impl(self, feed_dict):
        from qpdeploy.exporters.unet import call_unet

        feed = {k: torch.as_tensor(v).to(self.device) for k, v in feed_dict.items()}
        start = time.perf_counter()
        with torch.no_grad():
            out = call_unet(self.unet, feed)
        self.inference_time = time.perf_counter() - start
        return {self.output: out}

    def deactivate_impl(self):
        del self.unet


def load_reference_unet(manifest, base_dir, pack_dir=None, device="cpu"):
    """The quantized UNet of ``base_dir`` with ``pack_dir`` applied, checked against the manifest.

    Raises:
        QPDeployError: the base or pack is not the one the deploy dir was exported from.
    """
    from qpdeploy.base import load_base
    from qpdeploy.pack import pack_hash
    from qpdeploy.pack import apply_pack, at_strength, load_pack, post_training_scales, reset_to_post_training

    base = load_base(base_dir)
    want_base, want_pack = manifest.hashes
    if base.base_hash != want_base:
        raise QPDeployError(f"base {base_dir} (hash {base.base_hash[:12]}) is not the base deploy dir "
                            f"{manifest.path} was exported from ({want_base[:12]})")
    if want_pack is None:
        if pack_dir is not None:
            raise QPDeployError(f"deploy dir {manifest.path} was exported without a scale pack; drop --pack {pack_dir}")
        reset_to_post_training(base)
    else:
        if pack_dir is None:
            raise QPDeployError(f"deploy dir {manifest.path} holds scale pack {want_pack[:12]}; "
                                "give it with --pack PACK")
        # the pack as it was exported: at the strength the manifest records
        pack = at_strength(load_pack(pack_dir), post_training_scales(base), manifest.pack_strength)
        if pack_hash(pack) != want_pack:
            raise QPDeployError(f"scale pack {pack_dir} (hash {pack_hash(pack)[:12]}) is not the pack deploy dir "
                                f"{manifest.path} was exported with ({want_pack[:12]})")
        apply_pack(base, pack)
    return base.unet.to(device).eval()


# ------------------------------------------------------------------------------------
# Choosing runners for a deploy dir
# ------------------------------------------------------------------------------------

def unet_runners(manifest, config: RuntimeConfig) -> tuple[list[BaseRunner], list[int]]:
    """The UNet runners of a deploy dir for ``config.backend`` (none activated yet).

    Returns:
        ``(runners, runner_of_interval)``: ort and trt have one runner per UNet graph (the
        manifest's ``graph_of_interval``); torch has one runner for every interval.

    Raises:
        QPDeployError: the backend is unavailable here or the deploy dir lacks what it needs.
    """
    unet = manifest.unet
    if config.backend == "torch" and manifest.layout == "multi-subject":
        raise QPDeployError("the torch backend runs one base with one scale pack; a multi-subject deploy dir runs "
                            "on --backend ort or trt")
    if config.backend == "torch":
        from qpdeploy.ptq import resolve_device

        runner = TorchUNetRunner.from_deploy(manifest, config.base, config.pack, resolve_device(config.device))
        return [runner], [0] * manifest.intervals.k
    if config.backend == "trt":
        from .trt import check_engines, trt_runner

        check_engines(manifest)
        runners = [trt_runner(manifest.file(g["engine"]), config, g["name"]) for g in unet["graphs"]]
        if unet.get("tables"):
            for runner in runners:
                runner.keep_resident(spec["name"] for spec in unet["tables"]["inputs"])
        return runners, list(manifest.dispatch.graph_of_interval)
    shared = None
    if config.share_weights and len(unet["graphs"]) > 1 and unet.get("weights_file"):
        shared = SharedWeights(manifest.file(unet["weights_file"]))
    runners = [ort_runner(manifest.file(g["onnx"]), config, shared, g["name"]) for g in unet["graphs"]]
    return runners, list(unet["graph_of_interval"])


def check_backend(manifest, config: RuntimeConfig) -> None:
    """Fail at once, in one line, if ``config.backend`` cannot run here or this deploy dir
    (tensorrt missing, no GPU, engines for another machine, no CUDA execution provider)."""
    if config.backend == "trt":
        from .trt import check_engines

        check_engines(manifest)
    elif config.backend == "ort":
        ort_providers(config.device)


def part_runner(manifest, record: dict, config: RuntimeConfig) -> BaseRunner:
    """The runner of a float part (text encoder, VAE decoder): its TensorRT engine with the trt
    backend, else ONNX Runtime (the torch backend's reference is the UNet only)."""
    if config.backend == "trt":
        from .trt import trt_runner

        if not record.get("engine"):
            raise QPDeployError(f"deploy dir {manifest.path} has no TensorRT engine for {record['name']}")
        return trt_runner(manifest.file(record["engine"]), config, record["name"])
    # fold_weights is the UNet's: a float part has no INT8 weight, and keeps its own session
    # settings (prepacking) so that its outputs do not depend on the option
    return ort_runner(manifest.file(record["onnx"]),
                      config.replace(backend="ort", base=None, pack=None, fold_weights=False), name=record["name"])


def feed_device(config: RuntimeConfig) -> torch.device:
    """Where a backend's runners take their feeds: host memory for ONNX Runtime (its CUDA
    execution provider copies them over), the GPU for TensorRT, the model's device for torch."""
    if config.backend == "trt":
        return torch.device("cuda" if config.device == "auto" else config.device)
    if config.backend == "torch":
        from qpdeploy.ptq import resolve_device

        return resolve_device(config.device)
    return torch.device("cpu")
