"""Runtime stage: backends (ONNX Runtime, TensorRT, torch) and the step-aware engine scheduler.

    pipe.unet = qpdeploy.runtimes.EngineUNet.from_deploy("deploy/", backend="ort")

Names are imported on first use, so ``import qpdeploy.runtimes`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EngineUNet": ".unet",
    "IntervalEngines": ".scheduler",
    "RuntimeConfig": ".config",
    "GenerateConfig": ".config",
    "generate": ".generate",
    "load_deploy_pipeline": ".pipeline",
    "close_pipeline": ".pipeline",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
