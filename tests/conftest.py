"""Shared fixtures: tiny random pipelines and quantized bases, built once per session.

Tests never download anything: every model is built from a config with a fixed seed
(``qpdeploy.models.tiny_pipeline``). Tiny models run fastest on one thread, and a
single thread keeps results reproducible across machines.
"""

import hashlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

def family_params(*families):
    """Parameters for tests run on several model families: sd1 in the fast subset, the others
    (sd2 and sdxl: more layers, two text encoders) only in the full suite (``slow``)."""
    return [f if f == "sd1" else pytest.param(f, marks=pytest.mark.slow) for f in families]


def quick_config(**changes):
    """A QuantizeConfig small enough for tests (few trajectory steps and calibration calls)."""
    from qpdeploy.config import QuantizeConfig

    base = dict(calib_steps=6, calib_samples=16, calib_prompts=None, seed=0)
    base.update(changes)
    return QuantizeConfig(**base)


@pytest.fixture(name="quick_config", scope="session")
def quick_config_fixture():
    """The :func:`quick_config` factory, for tests that build their own configs."""
    return quick_config


@pytest.fixture(scope="session")
def tiny_pipe():
    """``tiny_pipe(family)``: a fresh tiny pipeline of that family (cheap to build)."""
    from qpdeploy.models import tiny_pipeline

    return tiny_pipeline


@pytest.fixture(scope="session")
def tiny_base():
    """``tiny_base(family, **config)``: an in-memory quantized base, cached per arguments.

    Callers must not mutate the returned base's scales; use ``fresh=True`` for a copy.
    """
    from qpdeploy.models import tiny_pipeline
    from qpdeploy.ptq import base_from_pipeline

    cache = {}

    def make(family="sd1", fresh=False, **changes):
        key = (family, tuple(sorted(changes.items())))
        if fresh or key not in cache:
            base = base_from_pipeline(tiny_pipeline(family), quick_config(**changes))
            if fresh:
                return base
            cache[key] = base
        return cache[key]

    return make


@pytest.fixture(scope="session")
def built_once(tmp_path_factory, worker_id):
    """``built_once(name, build)``: the artifact ``build(path)`` writes at ``path``, built once
    per test run, not once per pytest-xdist worker: the first worker that asks builds it while
    holding a file lock, the others wait for it and reuse it. Such artifacts are read-only,
    as every shared fixture here; ``name`` must say everything that makes one different."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # the run's folder, above every worker's own
    root = root / "built-once"
    root.mkdir(exist_ok=True)

    def get(name: str, build) -> Path:
        out = root / name
        with FileLock(str(root / f"{name}.lock")):
            if not out.exists():
                build(out)  # the writers are atomic: a failed build leaves nothing here
        return out

    return get


def save_bundled_base(base, out, family: str = "sd1") -> Path:
    """Write an in-memory tiny base as a base directory whose source is the bundled
    ``tiny-<family>`` (which ``tiny_pipeline(family)`` is), so commands can load its pipeline."""
    from qpdeploy.base import QuantizedBase, save_base

    named = QuantizedBase(base.unet, base.config, base.intervals,
                          {**base.meta, "source": {"kind": "bundled", "name": f"tiny-{family}"}})
    return save_base(out, named, base.meta["report"])


def slug(family: str, changes: dict) -> str:
    """A folder name for a family and config changes (a short hash of the changes)."""
    return family + ("-" + hashlib.sha256(repr(sorted(changes.items())).encode()).hexdigest()[:12] if changes else "")


@pytest.fixture(scope="session")
def saved_base(built_once):
    """``saved_base(family, **config)``: path of a base directory written by quantize_model (once per run)."""
    from qpdeploy.ptq import quantize_model

    def make(family="sd1", **changes):
        return built_once(f"base-{slug(family, changes)}",
                          lambda out: quantize_model(f"tiny-{family}", out, quick_config(**changes), device="cpu"))

    return make
