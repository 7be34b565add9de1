"""Fixtures of the export tests: cheap quantized bases, packs with distinct scale sets, and
one complete deploy dir written through the command line (an INT4 SD1 base with
per-interval activation scales and an S2 pack: the hardest per-interval case).

Until ``qpdeploy train`` exists, packs are made the way training starts
(``init_scale_sets``) and then every scale set is perturbed differently, so a graph that
used the wrong set, interval or selector value would be far off the torch model.
"""

import copy

import pytest
import torch

from ..conftest import save_bundled_base

# Calibration quality does not matter for export tests; two short trajectories make bases cheap.
CHEAP = dict(calib_samples=4, calib_steps=2, calib_prompts=("a photo of a dog", "a red car on a street"))
# The base of the command-line deploy dir.
DEPLOY_BASE = dict(weight_bits=4, act_scales="per-interval")
S1_INTERVALS = (1, 2)


@pytest.fixture(scope="session")
def export_pipe(tiny_pipe):
    """``export_pipe(family)``: a shared tiny pipeline (read-only: exporting does not change it)."""
    cache = {}

    def make(family="sd1"):
        if family not in cache:
            cache[family] = tiny_pipe(family)
        return cache[family]

    return make


@pytest.fixture(scope="session")
def deploy_base_changes():
    """The quantize settings of the command-line deploy dir's base."""
    return dict(DEPLOY_BASE)


@pytest.fixture(scope="session")
def export_base(tiny_base):
    """``export_base(family, **config)``: a shared cheap base (never install a pack on it)."""

    def make(family="sd1", **changes):
        return tiny_base(family, **{**CHEAP, **changes})

    return make


def perturbed_pack(base, strategy: str, input_scales: bool = True, seed: int = 0):
    """A ScalePack for ``base`` whose scale sets all differ from each other and from s_ptq.

    Leaves ``base`` at its post-training scales.
    """
    from qpdeploy.layers import quant_layers
    from qpdeploy.pack import ScalePack, init_scale_sets, reset_to_post_training, scales_of

    s1 = S1_INTERVALS if strategy == "s1" else ()
    init_scale_sets(base, strategy, base.intervals, s1, input_scales)
    gen = torch.Generator().manual_seed(seed)
    for _, layer in quant_layers(base.unet):
        layer.s_out.data *= torch.exp(0.2 * torch.randn(layer.s_out.shape, generator=gen))
        if layer.s_in is not None:
            layer.s_in.data *= torch.exp(0.2 * torch.randn(layer.s_in.shape, generator=gen))
    pack = ScalePack(strategy, base.intervals, base.base_hash, scales_of(base.unet), s1)
    reset_to_post_training(base)
    return pack


@pytest.fixture(scope="session")
def packed_base(export_base):
    """``packed_base(family, strategy, **config)`` -> ``(base, pack)``: a private copy of the
    cheap base and a perturbed pack for it (cached; tests install only that pack on it)."""
    cache = {}

    def make(family="sd1", strategy="s2", **changes):
        key = (family, strategy, tuple(sorted(changes.items())))
        if key not in cache:
            base = copy.deepcopy(export_base(family, **changes))
            cache[key] = base, perturbed_pack(base, strategy)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def base_dir(export_base, built_once):
    """``export_base("sd1", **DEPLOY_BASE)`` written as a base directory (its source is the
    bundled tiny-sd1, which ``tiny_pipeline("sd1")`` is; built once per run)."""
    return built_once("export-base", lambda out: save_bundled_base(export_base("sd1", **DEPLOY_BASE), out))


@pytest.fixture(scope="session")
def pack_dir(packed_base, built_once):
    """The S2 pack of ``packed_base("sd1", "s2", **DEPLOY_BASE)`` as a pack directory."""
    from qpdeploy.pack import save_pack

    return built_once("export-pack", lambda out: save_pack(out, packed_base("sd1", "s2", **DEPLOY_BASE)[1]))


@pytest.fixture(scope="session")
def deploy_dir(base_dir, pack_dir, built_once):
    """``qpdeploy export --base BASE --pack PACK --out DEPLOY`` (S2 -> per-interval layout)."""
    from typer.testing import CliRunner

    from qpdeploy.cli import app

    def build(out):
        result = CliRunner().invoke(app, ["export", "--base", str(base_dir), "--pack", str(pack_dir),
                                          "--out", str(out)])
        assert result.exit_code == 0, result.output

    return built_once("export-deploy", build)
