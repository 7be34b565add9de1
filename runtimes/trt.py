"""TensorRT backend: deserialize a deploy dir's engines and run them from torch CUDA buffers.

Engines are read and deserialized by Polygraphy's loaders (``EngineFromBytes(BytesFromPath)``)
and tensor types mapped by Polygraphy's ``DataType``; what Polygraphy's own ``TrtRunner`` lacks
is kept here, written against the TensorRT 10 Python API (named IO tensors,
``IExecutionContext.set_tensor_address`` / ``execute_async_v3``): each runner owns one
execution context, one CUDA stream and one preallocated torch buffer per IO tensor, so a step
copies nothing it need not; with ``cuda_graph`` the launch is captured once into a CUDA graph
and replayed (shapes are static, so the captured addresses stay valid). tensorrt is imported lazily: without it everything
else works and asking for the backend fails with one line.

Engines only run on the TensorRT version and GPU architecture that built them, so
:func:`check_engines` compares the manifest's ``engines`` record with this machine before
anything is deserialized.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import time
from pathlib import Path

import torch
from polygraphy.backend.base import BaseRunner

from qpdeploy.errors import QPDeployError

MISSING = ("--backend trt needs the Python package 'tensorrt' (TensorRT >= 10), which is not installed; "
           "install it on a machine with an NVIDIA GPU (pip install 'qpdeploy[trt]') or use --backend ort")


def import_tensorrt():
    """The ``tensorrt`` module, or the one-line error of an unavailable backend."""
    if importlib.util.find_spec("tensorrt") is None:
        raise QPDeployError(MISSING)
    return importlib.import_module("tensorrt")


def engine_environment(device="cuda") -> dict:
    """This machine's TensorRT version, GPU name and compute capability ("8.7"): the record
    engines are built under (``qpdeploy.exporters.engines``) and checked against
    (:func:`check_engines`), written by this one function.

    Raises:
        QPDeployError: tensorrt is not installed or there is no CUDA GPU.
    """
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise QPDeployError("--backend trt needs a CUDA GPU, and torch sees none here; use --backend ort")
    device = torch.device("cuda" if device == "auto" else device)
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt_version": trt.__version__, "device": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}"}


def check_engines(manifest, environment: dict | None = None) -> None:
    """Refuse engines this machine cannot run, before deserializing any of them.

    Args:
        manifest: the deploy dir's :class:`~qpdeploy.exporters.manifest.DeployManifest`.
        environment: :func:`engine_environment` (computed when None).

    Raises:
        QPDeployError: no engines were built, or they were built with another TensorRT
            version or for a GPU of another compute capability (both named).
    """
    record, where = manifest.engines, manifest.path
    if environment is None:
        environment = engine_environment()
    graphs = [*manifest.unet["graphs"], *manifest.text_encoders, manifest.vae_decoder]
    if not record or any(not g.get("engine") for g in graphs):
        raise QPDeployError(f"deploy dir {where} has no TensorRT engines (exported without --build-engines); "
                            "use --backend ort, or export with --build-engines on the target machine")
    built, here = record.get("tensorrt_version"), environment["tensorrt_version"]
    if built != here:
        raise QPDeployError(f"the engines in {where} were built with TensorRT {built}, this machine has TensorRT "
                            f"{here}; engines only run on the version that built them: re-export with --build-engines")
    built_cc, here_cc = record.get("compute_capability"), environment["compute_capability"]
    if built_cc is not None and built_cc != here_cc:
        raise QPDeployError(f"the engines in {where} were built for compute capability {built_cc} "
                            f"({record.get('device')}), this GPU ({environment['device']}) has {here_cc}; "
                            "rebuild them on this machine with --build-engines")


def trt_runner(engine_path, config, name=None) -> "TrtRunner":
    """A :class:`TrtRunner` for one engine file of the deploy dir (not yet activated)."""
    device = "cuda" if config.device == "auto" else config.device
    return TrtRunner(engine_path, device, config.cuda_graph, name=name)


def _torch_dtype(dtype):
    """The torch dtype of a TensorRT tensor type (Polygraphy's mapping)."""
    from polygraphy.datatype import DataType

    converted = DataType.to_dtype(DataType.from_dtype(dtype, "tensorrt"), "torch")
    if not isinstance(converted, torch.dtype):
        raise QPDeployError(f"TensorRT tensor type {dtype} has no torch equivalent")
    return converted


class TrtRunner(BaseRunner):
    """One TensorRT engine: a context, a stream and preallocated buffers (see module doc).

    Args:
        engine_path: the serialized engine (``.plan``).
        device: the CUDA device. ("cpu" only serves tests, with a stand-in tensorrt module
            whose engines compute on host memory.)
        cuda_graph: capture the launch into a CUDA graph on the first call and replay it.
    """

    def __init__(self, engine_path, device="cuda", cuda_graph: bool = False, name=None):
        super().__init__(name=name or Path(engine_path).stem, prefix="trt-runner")
        self.engine_path, self.device, self.use_graph = Path(engine_path), torch.device(device), cuda_graph
        if cuda_graph and self.device.type != "cuda":
            raise QPDeployError("CUDA graph capture needs a CUDA device")
        self.bound = self.batch = None
        self.resident, self.constant_inputs = {}, set()

    def keep_resident(self, names) -> None:
        """Inputs whose feed tensors are never changed in place by the caller: a call that
        passes the same tensor object again skips its copy (scale tables)."""
        self.constant_inputs = set(names)

    def activate_impl(self):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.exception import PolygraphyException

        trt = import_tensorrt()
        self.trt = trt
        with self._on_device():
            try:
                self.engine = EngineFromBytes(BytesFromPath(str(self.engine_path)))()
            except PolygraphyException:
                self.engine = None
            if self.engine is None:
                raise QPDeployError(f"TensorRT cannot deserialize {self.engine_path} (corrupted, or built by "
                                    "another TensorRT version or for another GPU)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.buffers, self.graph = {}, None
        shapes = {n: self._fixed_shape(n) for n in self.inputs}
        if all(shape is not None for shape in shapes.values()):
            self._bind(shapes)  # static shapes: allocate once, up front
        if shapes[self.inputs[0]] is not None:
            self.batch = shapes[self.inputs[0]][0]  # inputs are batch-first: a fixed-batch engine

    def _fixed_shape(self, name: str):
        """The input's shape if the engine allows only one: static dims, or a dynamic dim whose
        optimization profile has min == max (how the UNet engines are built); else None."""
        shape = tuple(self.engine.get_tensor_shape(name))
        if all(d >= 0 for d in shape):
            return shape
        low, _, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
        return high if low == high else None

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _bind(self, shapes: dict) -> None:
        """Set the input shapes, allocate every IO buffer and give TensorRT their addresses."""
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise QPDeployError(f"{self.engine_path}: input {name} of shape {list(shape)} is outside the "
                                    "engine's optimization profile")
        self.buffers = {}
        for name in self.inputs + self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            self.buffers[name] = torch.empty(shape, dtype=_torch_dtype(self.engine.get_tensor_dtype(name)),
                                             device=self.device)
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
        self.bound, self.graph = shapes, None  # a captured graph holds the old addresses
        self.resident = {}  # input name -> the feed tensor its buffer holds (see infer_impl)

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for name in self.inputs:
            shape = [None if d < 0 else d for d in self.engine.get_tensor_shape(name)]
            meta.add(name, _torch_dtype(self.engine.get_tensor_dtype(name)), shape)
        return meta

    def infer_impl(self, feed_dict):
        shapes = {n: tuple(feed_dict[n].shape) for n in self.inputs}
        if shapes != self.bound:
            self._bind(shapes)
        start = time.perf_counter()
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the feeds were written there
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for name in self.inputs:
                # A feed passed as the very same tensor as last time (a multi-subject graph's
                # scale tables, fed with every call) is already in its buffer.
                if self.resident.get(name) is not feed_dict[name]:
                    self.buffers[name].copy_(feed_dict[name], non_blocking=True)
                    if name in self.constant_inputs:
                        self.resident[name] = feed_dict[name]
            self._launch()
            outputs = {name: self.buffers[name].clone() for name in self.outputs}
        if self.stream is not None:
            self.stream.synchronize()
        self.inference_time = time.perf_counter() - start
        return outputs

    def _launch(self) -> None:
        if not self.use_graph:
            return self._execute()
        if self.graph is None:
            self._execute()  # the first launch initializes TensorRT's lazy state outside the capture
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream):
                self._execute()
        self.graph.replay()

    def _execute(self) -> None:
        handle = self.stream.cuda_stream if self.stream is not None else 0
        if not self.context.execute_async_v3(handle):
            raise QPDeployError(f"TensorRT failed to run {self.engine_path}")

    def deactivate_impl(self):
        if self.stream is not None:
            self.stream.synchronize()
        del self.graph, self.buffers, self.context, self.engine, self.stream, self.trt
        del self.inputs, self.outputs
        self.bound = self.batch = None
