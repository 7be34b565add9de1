"""Fixtures of the training-stage tests: cheap quantized bases and image folders.

Training tests need a quantized base but not a good one, so their bases are calibrated
with a minimum of work (2 trajectory steps, 4 calls, min-max ranges) and copied per test,
which keeps every test free to change the base's scales.
"""

import copy

import numpy as np
import pytest

CHEAP_QUANTIZE = dict(calib_steps=2, calib_samples=4, calib_prompts=("a photo of a dog", "a cat on a sofa"),
                      weight_search="minmax", act_search="minmax")


@pytest.fixture(scope="session")
def cheap_base(tiny_base):
    """``cheap_base(family, **config)``: a fresh copy of a cheaply calibrated in-memory base."""

    def make(family="sd1", **changes):
        return copy.deepcopy(tiny_base(family, **{**CHEAP_QUANTIZE, **changes}))

    return make


@pytest.fixture(scope="session")
def cheap_saved_base(saved_base):
    """``cheap_saved_base(family)``: a base directory of the bundled tiny model, cached."""

    def make(family="sd1"):
        return saved_base(family, **CHEAP_QUANTIZE)

    return make


def write_images(folder, count=3, size=(24, 20), seed=0, suffix=".png"):
    """``count`` random RGB images of ``size`` (W, H) in ``folder``; returns the folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}{suffix}")
    return folder


@pytest.fixture
def instance_dir(tmp_path):
    """A folder of three small random instance images."""
    return write_images(tmp_path / "instance")
