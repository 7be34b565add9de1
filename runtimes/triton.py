"""Serving a deploy dir with Triton Inference Server: the model repository and the server.

``qpdeploy triton deploy/ --out repo/`` writes a standard Triton model repository:

- ``unet``: the deploy dir's UNet with dynamic batching. Each sample of a batch carries its
  own timestep and subject, so one execution serves requests at different steps, for
  different subjects: the interval (and, in a multi-subject deploy dir, the scale row) is
  picked per sample, as :class:`~.batcher.StepBatcher` does in one process.
- ``text_encoder`` (``text_encoder_2`` for SDXL) and ``vae_decoder``, also batched.
- ``pipeline``: the entry point. It runs diffusers' own pipeline (the same code path as
  ``qpdeploy generate``, :func:`~.generate.sample_image`) whose text encoder, VAE and UNet
  are calls to the three models above (business logic scripting), so concurrent pipeline
  instances share one UNet and its batches.

Every model is a Python-backend model running the deploy dir's engines through qpdeploy's
runners (``ort`` on CPU or CUDA, ``trt`` where TensorRT engines were built); the repository
names the deploy dir by path (``--deploy-path``: the path the server sees, e.g. inside a
container) and does not copy it.

``qpdeploy serve`` also starts the server: the ``tritonserver`` binary of the
``nvidia-pytriton`` wheel (extra ``serve``), with a private backend directory holding the
Python backend and the stub built for the running Python, and the running environment's
packages visible to the stub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from qpdeploy.distributed import free_port
from qpdeploy.errors import QPDeployError

MODEL_FILE = """\
# Triton Python-backend model written by `qpdeploy triton`: the class lives in qpdeploy.
import os
import site
import sys

_before = list(sys.path)
for folder in filter(None, os.environ.get("QPDEPLOY_SITE_DIRS", "").split(os.pathsep)):
    site.addsitedir(folder)  # the environment qpdeploy is installed in (set by `qpdeploy serve`)
sys.path[:] = [p for p in sys.path if p not in _before] + _before  # ahead of the stub's own packages

from qpdeploy.runtimes.triton_models import {cls} as TritonPythonModel  # noqa: E402,F401
"""
REPOSITORY_FILE = "qpdeploy-triton.json"  # what the repository serves (the server ignores files)
PLATFORMS = ("python", "onnxruntime", "tensorrt")
NATIVE = {"onnxruntime": ("onnxruntime_onnx", "onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "engine", "model.plan")}
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64"}


@dataclass(frozen=True)
class RepositoryConfig:
    """How ``qpdeploy triton`` writes the repository.

    Attributes:
        instances: pipeline model instances: requests generated at once (their UNet calls
            are batched together).
        max_queue_delay_us: how long the UNet's dynamic batcher waits for more requests.
        backend: the runners of every model: "ort" or "trt" (engines built on the target).
        device: "auto", "cpu" or "cuda[:N]".
        threads: ONNX Runtime intra-op threads per model (0: its default).
        fold_weights: ONNX Runtime: dequantize the UNet's INT8 weights once at load
            (``RuntimeConfig.fold_weights``); python platform with the ort backend only.
        arena: ONNX Runtime: the models' sessions take their buffers from one memory arena per
            model process (``RuntimeConfig.arena``); False gives that memory back after each
            call, at the price of slower calls. Python platform with the ort backend only.
        deploy_path: the deploy dir as the server sees it (default: its absolute path here).
        platform: how the text encoder(s), VAE decoder and UNet graphs are served: "python"
            (Python-backend models running qpdeploy's runners: everywhere, every layout),
            "onnxruntime" (Triton's ONNX Runtime backend) or "tensorrt" (Triton's TensorRT
            backend, the deploy dir's engines). Native platforms serve one model per UNet graph
            (the pipeline picks the graph and selector value of each sample's interval) and
            link the deploy dir's files into the repository; the multi-subject layout, whose
            scale tables are graph inputs, is served by the python platform only.
    """

    instances: int = 4
    max_queue_delay_us: int = 2000
    backend: str = "ort"
    device: str = "auto"
    threads: int = 0
    fold_weights: bool = False
    arena: bool = True
    deploy_path: str | None = None
    platform: str = "python"

    def __post_init__(self):
        from qpdeploy.config import check_all

        check_all([
            (1 <= self.instances <= 64, f"instances must be in 1..64, got {self.instances}"),
            (0 <= self.max_queue_delay_us <= 1_000_000,
             f"max queue delay must be in 0..1000000 microseconds, got {self.max_queue_delay_us}"),
            (self.backend in ("ort", "trt"), f"backend must be ort or trt for serving, got {self.backend!r}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (not self.fold_weights or (self.backend == "ort" and self.platform == "python"),
             "fold weights applies to the python platform with the ort backend (Triton's own backends and "
             "TensorRT keep their own weight handling)"),
            (self.arena or (self.backend == "ort" and self.platform == "python"),
             "the memory arena setting applies to the python platform with the ort backend"),
            (self.platform in PLATFORMS, f"platform must be one of {', '.join(PLATFORMS)}, got {self.platform!r}"),
        ])


def write_repository(deploy, out, config: RepositoryConfig = RepositoryConfig(), force: bool = False,
                     verify_hashes: bool = True) -> Path:
    """Write the Triton model repository of ``deploy`` to ``out`` (atomically; an existing
    ``out`` needs ``force`` and must be such a repository). Returns ``out``.
    ``verify_hashes=False`` skips hashing the deploy dir here (``qpdeploy serve``: each served
    model checks the files it opens when it loads, so they are hashed once).

    Raises:
        QPDeployError: an unreadable or altered deploy dir, or a bad output path.
    """
    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.io import atomic_dir, write_json

    manifest = read_manifest(deploy, verify_hashes=verify_hashes)
    if manifest.pipeline["class"] not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise QPDeployError(f"deploy dir {manifest.path} holds a {manifest.pipeline['class']}, which is not served")
    native = config.platform != "python"
    if native and manifest.layout == "multi-subject":
        raise QPDeployError(f"deploy dir {manifest.path} has the multi-subject layout, whose scale tables are graph "
                            "inputs: serve it with --platform python")
    if config.platform == "tensorrt" and not manifest.data.get("engines"):
        raise QPDeployError(f"deploy dir {manifest.path} has no TensorRT engines: export with --build-engines on the "
                            "serving machine, or use --platform onnxruntime / python")
    where = config.deploy_path or str(manifest.path.resolve())
    params = {"deploy_dir": where, "backend": config.backend, "device": config.device, "threads": str(config.threads),
              "fold_weights": str(config.fold_weights).lower(), "arena": str(config.arena).lower(),
              "platform": config.platform}
    batch = 2 * config.instances  # classifier-free guidance: two samples per request
    models, links = {}, {}
    parts = [*manifest.text_encoders, manifest.vae_decoder]
    for record in parts:
        if native:
            models[record["name"]] = _native_config(record["name"], config.platform, record["inputs"],
                                                    record["outputs"], batch)
            links[record["name"]] = [(NATIVE[config.platform][2], record[NATIVE[config.platform][1]])]
        else:
            models[record["name"]] = _part_config(record["name"], record, batch, {**params, "part": record["name"]})
    if native:  # one model per UNet graph, named as the graph
        for graph in manifest.unet["graphs"]:
            models[graph["name"]] = _native_config(graph["name"], config.platform, manifest.unet_inputs,
                                                   manifest.unet["outputs"], batch, config.max_queue_delay_us)
            links[graph["name"]] = [(NATIVE[config.platform][2], graph[NATIVE[config.platform][1]])]
            if config.platform == "onnxruntime" and manifest.unet.get("weights_file"):
                links[graph["name"]].append((manifest.unet["weights_file"],) * 2)  # external data, beside the graph
    else:
        models["unet"] = _unet_config(manifest, batch, config.max_queue_delay_us, params)
    models["pipeline"] = _pipeline_config(config.instances, params)
    classes = {"unet": "UNetModel", "pipeline": "PipelineModel"}
    with atomic_dir(out, force, kind=(REPOSITORY_FILE, "triton-repository"), inputs=[deploy]) as tmp:
        for name, text in models.items():
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text)
            if name in links:
                for link, target in links[name]:
                    os.symlink(os.path.join(where, target), tmp / name / "1" / link)
            else:
                (tmp / name / "1" / "model.py").write_text(MODEL_FILE.format(cls=classes.get(name, "PartModel")))
        write_json(tmp / REPOSITORY_FILE, {"kind": "triton-repository", "deploy_dir": where,
                                           "layout": manifest.layout, "models": sorted(models),
                                           "subjects": [s["identifier"] for s in manifest.subjects],
                                           "config": config.__dict__})
    return Path(out)


def _parameters(params: dict) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}'
                     for k, v in params.items())


def _tensor(name: str, dtype: str, dims, optional: bool = False) -> str:
    extra = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ]{extra} }}'


def _native_config(name: str, platform: str, inputs: list[dict], outputs: list[dict], batch: int,
                   delay_us: int = 0) -> str:
    """A model of Triton's own ONNX Runtime or TensorRT backend; a per-sample scalar input
    (timestep, selector: shape ``[batch]``) is sent as ``[1]`` and reshaped to ``[]``."""
    def tensor(spec):
        line = _tensor(spec["name"], DTYPES[spec["dtype"]], _spec_dims(spec))
        return line[:-2] + " reshape: { shape: [ ] } }" if len(spec["shape"]) == 1 else line

    return "\n".join([
        f'name: "{name}"', f'platform: "{NATIVE[platform][0]}"', f"max_batch_size: {batch}",
        "input [\n" + ",\n".join(tensor(s) for s in inputs) + "\n]",
        "output [\n" + ",\n".join(tensor(s) for s in outputs) + "\n]",
        "instance_group [ { count: 1 } ]", f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}", ""])


def _spec_dims(spec: dict) -> list:
    dims = spec["shape"][1:]  # batch first in every manifest spec
    return [-1 if isinstance(d, str) else d for d in dims] or [1]


def _model(name: str, batch: int, inputs: list[str], outputs: list[str], params: dict, extra: str = "",
           instances: int = 1) -> str:
    return "\n".join([
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {batch}",
        "input [\n" + ",\n".join(inputs) + "\n]", "output [\n" + ",\n".join(outputs) + "\n]",
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]", extra, _parameters(params), ""])


def _part_config(name: str, record: dict, batch: int, params: dict) -> str:
    inputs = [_tensor(s["name"], DTYPES[s["dtype"]], _spec_dims(s)) for s in record["inputs"]]
    outputs = [_tensor(s["name"], DTYPES[s["dtype"]], _spec_dims(s)) for s in record["outputs"]]
    return _model(name, batch, inputs, outputs, params, "dynamic_batching { }")


def _unet_config(manifest, batch: int, delay_us: int, params: dict) -> str:
    inputs = [_tensor(s["name"], DTYPES[s["dtype"]], _spec_dims(s)) for s in manifest.call_inputs]
    inputs.append(_tensor("subject", "TYPE_STRING", [1]))
    outputs = [_tensor(s["name"], DTYPES[s["dtype"]], _spec_dims(s)) for s in manifest.unet["outputs"]]
    outputs += [_tensor("interval", "TYPE_INT32", [1]), _tensor("engine", "TYPE_STRING", [1])]
    return _model("unet", batch, inputs, outputs, params,
                  f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}")


PIPELINE_INPUTS = (("prompt", "TYPE_STRING", False), ("negative_prompt", "TYPE_STRING", True),
                   ("subject", "TYPE_STRING", True), ("seed", "TYPE_INT64", True), ("steps", "TYPE_INT32", True),
                   ("guidance", "TYPE_FP32", True), ("scheduler", "TYPE_STRING", True))


def _pipeline_config(instances: int, params: dict) -> str:
    inputs = [_tensor(name, dtype, [1], optional) for name, dtype, optional in PIPELINE_INPUTS]
    outputs = [_tensor("image", "TYPE_UINT8", [-1, -1, 3]), _tensor("record", "TYPE_STRING", [1])]
    return _model("pipeline", 0, inputs, outputs, params, instances=instances)


# -- the server ------------------------------------------------------------------------


def tritonserver_files() -> tuple[Path, Path, Path]:
    """``(tritonserver binary, python backend folder, stub for this Python)`` from the
    ``nvidia-pytriton`` wheel.

    Raises:
        QPDeployError: the wheel is not installed, or has no stub for this Python.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise QPDeployError("tritonserver is not installed: pip install -e \".[serve]\" (the nvidia-pytriton wheel "
                            "carries it), or run the repository in NVIDIA's Triton container")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = (root / "bin" / "tritonserver", root / "backends" / "python",
             root / "python_backend_stubs" / version / "triton_python_backend_stub")
    for path in files:
        if not path.exists():
            raise QPDeployError(f"the nvidia-pytriton wheel lacks {path} (Python {version} has no backend stub there)")
    return files


class TritonServer:
    """``tritonserver`` on a model repository, as a context manager.

    ``start()`` prepares a private backend folder (the wheel's Python backend plus the stub of
    this Python; the installed package is not touched), starts the binary with the running
    environment's packages visible to the stub, and waits until the server is ready.
    ``stop()`` ends it. ``url`` is the HTTP endpoint.
    """

    def __init__(self, repository, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, address: str = "127.0.0.1", log=None):
        self.repository = Path(repository).resolve()
        if not (self.repository / REPOSITORY_FILE).is_file():
            raise QPDeployError(f"{repository} is not a model repository written by qpdeploy triton")
        self.address = address
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log = Path(log) if log is not None else None
        self.process: subprocess.Popen | None = None
        self._workspace: Path | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address
        return f"{host}:{self.http_port}"

    def start(self, timeout: float = 300.0) -> "TritonServer":
        binary, backend, stub = tritonserver_files()
        self._workspace = Path(tempfile.mkdtemp(prefix="qpdeploy-triton-"))
        backends = self._workspace / "backends"
        shutil.copytree(backend, backends / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, backends / "python" / stub.name)
        for other in backend.parent.iterdir():  # native backends, where the installation has them
            if other.is_dir() and other.name != "python":
                os.symlink(other, backends / other.name)
        libs = binary.parents[3] / "nvidia_pytriton.libs"  # the wheel's bundled shared libraries
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [_libpython_dir(), str(libs), env.get("LD_LIBRARY_PATH")]))
        env["QPDEPLOY_SITE_DIRS"] = os.pathsep.join(_site_dirs())
        log_path = self.log or self._workspace / "tritonserver.log"  # the workspace goes at stop()
        self._log_file = open(log_path, "ab")
        command = [str(binary), "--model-repository", str(self.repository), "--backend-directory", str(backends),
                   "--http-address", self.address, "--http-port", str(self.http_port),
                   "--grpc-address", self.address, "--grpc-port", str(self.grpc_port),
                   "--metrics-port", str(self.metrics_port), "--exit-on-error", "true", "--strict-readiness", "true"]
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        self.log_path = log_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = _tail(log_path)
                self.stop()
                raise QPDeployError(f"tritonserver exited with status {self.process.returncode} while loading "
                                    f"{self.repository}: {tail}")
            if self.ready():
                return self
            time.sleep(0.25)
        tail = _tail(log_path)
        self.stop()
        raise QPDeployError(f"tritonserver was not ready after {timeout:.0f} s: {tail}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def model_stats(self, model: str) -> dict:
        """The model's Triton statistics: ``requests`` (successful inference requests),
        ``execution_count`` (model executions: fewer than requests when batched),
        ``inference_count`` (samples), ``failures``."""
        with urllib.request.urlopen(f"http://{self.url}/v2/models/{model}/stats", timeout=10) as response:
            stats = json.loads(response.read())["model_stats"][0]
        inference = stats["inference_stats"]
        return {"requests": inference["success"]["count"], "failures": inference["fail"]["count"],
                "execution_count": stats["execution_count"], "inference_count": stats["inference_count"]}

    def stop(self, grace: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workspace is not None:
            shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None

    def kill(self) -> None:
        """End the server at once (SIGKILL), as a crash would; ``start()`` may follow."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stop()

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _libpython_dir() -> str | None:
    """The folder of this interpreter's shared libpython: the stub must load the same Python
    build whose standard library and extension modules it imports (a system libpython of
    another patch release fails on them)."""
    import sysconfig

    folder, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    return folder if folder and name and os.path.isfile(os.path.join(folder, name)) else None


def _site_dirs() -> list[str]:
    """Where this environment's packages live (the stub's own Python adds them, with their
    ``.pth`` files, so an editable install of qpdeploy is found too)."""
    import site

    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return [f for f in folders if os.path.isdir(f)]


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    errors = [line for line in text if line.startswith("E") or "rror" in line]
    return " | ".join((errors or text)[-lines:])
