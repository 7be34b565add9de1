"""Fixtures of the runtime tests: tiny deploy dirs, each exported once per test run.

- ``sd1_s2``: tiny SD1, an S2 pack (4 scale sets) -> per-interval layout, 4 UNet graphs;
- ``sd1_multi``: the same base and pack -> multi-expert layout (one graph, ``expert`` input);
- ``sd1_masked``: the same base, an S1 pack tuned in intervals 1 and 2 -> masked layout;
- ``sdxl_multi``: tiny SDXL, an S2 pack -> multi-expert layout;
- ``sd1_subjects``: the SD1 base, two subjects (``sks``: S2 pack, ``zwx``: S1 pack) ->
  multi-subject layout (one graph, scale tables as inputs); ``sdxl_subjects``: the same on
  tiny SDXL.

Every scale set is perturbed differently (as in the export tests), so a call that ran the
wrong graph or fed the wrong selector value gives a visibly different output. The base and
pack directories are kept for the torch backend, which loads them and checks their hashes.
"""

import copy
import dataclasses

import pytest
import torch

from ..conftest import save_bundled_base

# The training tests' cheap calibration (quality does not matter here); the same settings share
# the session's base cache with them.
CHEAP = dict(calib_steps=2, calib_samples=4, calib_prompts=("a photo of a dog", "a cat on a sofa"),
             weight_search="minmax", act_search="minmax")
S1_INTERVALS = (1, 2)
DEPLOYS = {
    "sd1_s2": ("sd1", "s2", "per-interval"),
    "sd1_multi": ("sd1", "s2", "multi-expert"),
    "sd1_masked": ("sd1", "s1", "masked"),
    "sdxl_multi": ("sdxl", "s2", "multi-expert"),
    "sd1_subjects": ("sd1", ("s2", "s1"), "multi-subject"),
    "sdxl_subjects": ("sdxl", ("s2", "s1"), "multi-subject"),
}
SUBJECT_IDS = ("sks", "zwx")


def perturbed_pack(base, strategy: str, seed: int = 0):
    """A ScalePack for ``base`` whose sets differ from each other and from the post-training
    scales (``s_out`` and ``s_in`` rows scaled by exp(0.2 N(0, 1))); leaves ``base`` untouched."""
    from qpdeploy.layers import quant_layers
    from qpdeploy.pack import ScalePack, init_scale_sets, reset_to_post_training, scales_of

    s1 = S1_INTERVALS if strategy == "s1" else ()
    init_scale_sets(base, strategy, base.intervals, s1, input_scales=True)
    gen = torch.Generator().manual_seed(seed)
    for _, layer in quant_layers(base.unet):
        layer.s_out.data *= torch.exp(0.2 * torch.randn(layer.s_out.shape, generator=gen))
        layer.s_in.data *= torch.exp(0.2 * torch.randn(layer.s_in.shape, generator=gen))
    pack = ScalePack(strategy, base.intervals, base.base_hash, scales_of(base.unet), s1)
    reset_to_post_training(base)
    return pack


@pytest.fixture(scope="session")
def rt_base_dir(tiny_base, built_once):
    """``rt_base_dir(family)``: the cheap base of the tiny bundled model, saved (once per run)."""
    def make(family="sd1"):
        return built_once(f"rt-base-{family}",
                          lambda out: save_bundled_base(tiny_base(family, **CHEAP), out, family))

    return make


@pytest.fixture(scope="session")
def rt_pack_dir(tiny_base, built_once):
    """``rt_pack_dir(family, strategy)``: a perturbed pack for the cheap base, saved (once per run)."""
    from qpdeploy.pack import save_pack

    def make(family="sd1", strategy="s2"):
        def build(out):
            save_pack(out, perturbed_pack(copy.deepcopy(tiny_base(family, **CHEAP)), strategy))

        return built_once(f"rt-pack-{family}-{strategy}", build)

    return make


@pytest.fixture(scope="session")
def deploy(rt_base_dir, rt_pack_dir, built_once):
    """``deploy(name)``: the deploy dir ``name`` of :data:`DEPLOYS` (exported once per run,
    unverified: the export tests verify graphs against torch; these tests compare backends
    themselves)."""
    from qpdeploy.base import load_base
    from qpdeploy.exporters.config import ExportConfig
    from qpdeploy.exporters.export import export_deploy, export_subjects
    from qpdeploy.models import tiny_pipeline
    from qpdeploy.pack import load_pack

    def build(out, name):
        family, strategy, layout = DEPLOYS[name]
        base = load_base(rt_base_dir(family))
        if layout == "multi-subject":
            packs = [(dataclasses.replace(load_pack(rt_pack_dir(family, s)),
                                          meta={"identifier": i, "prompt": f"a photo of {i} dog"}), f"packs/{i}")
                     for s, i in zip(strategy, SUBJECT_IDS)]
            export_subjects(base, tiny_pipeline(family), out, ExportConfig(verify=False), packs)
        else:
            pack = load_pack(rt_pack_dir(family, strategy))
            export_deploy(base, tiny_pipeline(family), out, ExportConfig(layout=layout, verify=False), pack)

    def make(name="sd1_s2"):
        return built_once(f"rt-deploy-{name}", lambda out: build(out, name))

    return make


@pytest.fixture(scope="session")
def reference_unet(rt_base_dir, rt_pack_dir):
    """``reference_unet(family, strategy)``: the quantized torch UNet with the pack applied."""
    from qpdeploy.base import load_base
    from qpdeploy.pack import apply_pack, load_pack

    cache = {}

    def make(family="sd1", strategy="s2"):
        if (family, strategy) not in cache:
            base = load_base(rt_base_dir(family))
            apply_pack(base, load_pack(rt_pack_dir(family, strategy)))
            cache[family, strategy] = base.unet.eval()
        return cache[family, strategy]

    return make


@pytest.fixture(scope="session")
def psnr():
    """``psnr(a, b)``: PSNR in dB of two uint8 images (inf when identical)."""
    import numpy as np

    def psnr_db(a, b) -> float:
        mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
        return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))

    return psnr_db


# ------------------------------------------------------------------------------------
# A stand-in tensorrt module (TensorRT cannot be installed here)
# ------------------------------------------------------------------------------------

def _fake_tensorrt_module():
    """A module with the slice of the TensorRT 10 API the runtime uses, computing on host
    memory through the raw addresses the runner binds (so buffer wiring is really tested).

    An engine file is JSON: ``{"inputs": {name: [shape with -1 for dynamic dims]},
    "profile": {name: [min shape, max shape]}, "output": name, "scale": a, "offset": b}``;
    executing writes ``a * sample + b +
    timestep`` (broadcast per sample) to the output. Anything else fails to deserialize
    (``None``), as a corrupted engine does in TensorRT.
    """
    import ctypes
    import enum
    import importlib.machinery
    import json
    import types

    import numpy as np

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = "10.0.0.fake"
    trt.DataType = enum.Enum("DataType", "FLOAT HALF INT8 INT32 BOOL")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
    trt.executions = []  # (engine output name, scale, offset) per execute_async_v3

    class ILogger:  # Polygraphy's loaders subclass it for their logger
        def __init__(self):
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, level=None):
            self.level = level

    class Engine:
        def __init__(self, spec):
            self.spec = spec
            self.names = list(spec["inputs"]) + [spec["output"]]
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.spec["inputs"] else trt.TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return tuple(self.spec["inputs"].get(name, self.spec["inputs"]["sample"]))

        def get_tensor_profile_shape(self, name, profile):
            low, high = self.spec["profile"][name]
            return low, high, high

        def get_tensor_dtype(self, name):
            return trt.DataType.INT32 if name in ("expert", "tuned") else trt.DataType.FLOAT

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            declared = self.engine.spec["inputs"][name]
            ok = len(shape) == len(declared) and all(d == -1 or d == s for d, s in zip(declared, shape))
            if ok:
                self.shapes[name] = tuple(shape)
            return ok

        def get_tensor_shape(self, name):
            return self.shapes.get(name, self.shapes.get("sample"))

        def set_tensor_address(self, name, address):
            self.addresses[name] = address

        def _array(self, name, ctype=ctypes.c_float):
            shape = self.get_tensor_shape(name)
            buffer = (ctype * int(np.prod(shape))).from_address(self.addresses[name])
            return np.ctypeslib.as_array(buffer).reshape(shape)

        def execute_async_v3(self, stream_handle):
            spec = self.engine.spec
            sample, timestep = self._array("sample"), self._array("timestep")
            out = self._array(spec["output"])
            out[...] = spec["scale"] * sample + spec["offset"] + timestep.reshape(-1, *[1] * (sample.ndim - 1))
            trt.executions.append((spec["output"], spec["scale"], spec["offset"]))
            return True

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(json.loads(bytes(data)))
            except (ValueError, KeyError, TypeError):
                return None

    trt.ILogger, trt.Logger, trt.Runtime = ILogger, Logger, Runtime
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    # TensorRT's module-level aliases of its tensor types, which Polygraphy's DataType maps
    trt.float32, trt.float16, trt.int8, trt.int32, trt.bool = (trt.DataType[n] for n in ("FLOAT", "HALF", "INT8", "INT32", "BOOL"))
    return trt


_FAKE = {}


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """Install the stand-in ``tensorrt`` module for one test; yields it."""
    import sys

    module = _FAKE.setdefault("tensorrt", _fake_tensorrt_module())  # one instance: Polygraphy caches its import
    module.executions.clear()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    yield module
