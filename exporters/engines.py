"""TensorRT engines for a deploy dir, built with Polygraphy's loaders (``--build-engines``).

``EngineFromNetwork(NetworkFromOnnxPath(onnx), CreateConfig(...))`` per graph, saved with
``SaveEngine``; one optimization profile per graph and one timing cache shared by all builds,
so the K-1 UNet builds after the first reuse its tactic timings. UNet graphs build with INT8
and FP16 enabled (their Q/DQ nodes set where INT8 runs; FP16 is allowed elsewhere) or as
strongly typed networks; the float text encoders and VAE decoder build with FP16.

tensorrt is imported lazily: without it everything else in qpdeploy works, and
:func:`require_tensorrt` fails at once with a one-line error.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from qpdeploy.errors import QPDeployError

TIMING_CACHE = "trt_timing.cache"
MISSING = ("--build-engines needs the Python package 'tensorrt' (TensorRT >= 10), which is not installed; "
           "install it on a machine with an NVIDIA GPU: pip install 'qpdeploy[trt]'")


def tensorrt_available() -> bool:
    """Whether the ``tensorrt`` package can be imported (without importing it)."""
    return importlib.util.find_spec("tensorrt") is not None


def require_tensorrt() -> None:
    """Raise the one-line error of ``--build-engines`` when TensorRT is not installed."""
    if not tensorrt_available():
        raise QPDeployError(MISSING)


@dataclass(frozen=True)
class EngineJob:
    """One engine to build: the ONNX file, the engine file, whether INT8 is enabled, and
    the profile (input name -> (min, opt, max) shapes)."""

    onnx: str
    engine: str
    int8: bool
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def build_engines(deploy_dir, jobs: list[EngineJob], strongly_typed: bool = False, progress=None) -> dict:
    """Build every job's engine into ``deploy_dir`` and return the manifest's engines record."""
    require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    deploy_dir = Path(deploy_dir)
    cache = str(deploy_dir / TIMING_CACHE)
    for job in jobs:
        profile = Profile()
        for name, (low, opt, high) in job.profile.items():
            profile.add(name, min=low, opt=opt, max=high)
        network = NetworkFromOnnxPath(str(deploy_dir / job.onnx), strongly_typed=strongly_typed or None)
        precision = {} if strongly_typed else {"fp16": True, "int8": job.int8}
        config = CreateConfig(profiles=[profile], load_timing_cache=cache, **precision)
        SaveEngine(EngineFromNetwork(network, config, save_timing_cache=cache), str(deploy_dir / job.engine))()
        if progress is not None:
            progress()
    from qpdeploy.runtimes.trt import engine_environment

    return {
        **engine_environment(),  # the record the runtime checks these engines against
        "precision": "strongly-typed" if strongly_typed else "int8+fp16 (UNet), fp16 (text encoders, VAE)",
        "timing_cache": TIMING_CACHE,
    }
