"""Learned rounding with block reconstruction (``QuantizeConfig.rounding == "block"``)."""

import pytest
import torch

from qpdeploy.calibrate import capture_trajectories, spread_over_schedule, sqnr_db, unet_outputs
from qpdeploy.errors import QPDeployError
from qpdeploy.layers import quant_layers
from qpdeploy.ptq import quantize_unet
from qpdeploy.reconstruct import BLOCK_TYPES, reconstruct_blocks, reconstruction_blocks


@pytest.fixture(scope="module")
def w4_setup(tiny_pipe, quick_config):
    pipe = tiny_pipe("sd1")
    prompts = ["a dog", "a cat", "a red car", "a bowl of fruit"]
    calls = capture_trajectories(pipe, prompts, steps=6, guidance=7.5, resolution=None, seed=0)
    held = capture_trajectories(pipe, ["a tree", "a house"], steps=6, guidance=7.5, resolution=None, seed=100)
    config = quick_config(weight_bits=4, act_bits=None, rounding_steps=120)
    return pipe.unet.eval(), config, spread_over_schedule(calls, 12), held


def _quantize(w4_setup, rounding, **changes):
    fp, config, calib, _ = w4_setup
    info = {}
    qunet, _ = quantize_unet(fp, config.replace(rounding=rounding, **changes), config.make_intervals(1000), calib,
                             info=info)
    return qunet, info


@pytest.mark.slow
def test_blocks_are_the_unets_resnets_transformers_and_samplers_in_call_order(w4_setup):
    qunet, _ = _quantize(w4_setup, "nearest")
    names = reconstruction_blocks(qunet, w4_setup[2][0])
    assert names[0].startswith("down_blocks.0.") and names[-1].startswith("up_blocks.")
    assert {type(qunet.get_submodule(n)).__name__ for n in names} <= set(BLOCK_TYPES) | {"QuantConv2d", "QuantLinear"}
    covered = [name for name, _ in quant_layers(qunet) if any(name == n or name.startswith(n + ".") for n in names)]
    assert len(covered) == len(list(quant_layers(qunet)))  # every quantized layer belongs to exactly one block
    mid = [i for i, n in enumerate(names) if n.startswith("mid_block.")]
    assert mid and max(i for i, n in enumerate(names) if n.startswith("down_blocks.")) < min(mid)


@pytest.mark.slow
def test_learned_rounding_lowers_block_and_unet_error_and_changes_only_integer_weights(w4_setup):
    fp, _, _, held = w4_setup
    nearest, _ = _quantize(w4_setup, "nearest")
    learned, info = _quantize(w4_setup, "block")
    summary = info["rounding"]
    assert summary["blocks"] >= 6 and summary["steps"] == 120
    assert summary["relative_error"]["learned"] < 0.8 * summary["relative_error"]["nearest"]
    assert 0.005 < summary["moved"] < 0.5 and summary["undecided"] < 0.2
    assert set(info["stage_seconds"]) == {"convert", "weights", "rounding"}
    reference = torch.cat([o.flatten() for o in unet_outputs(fp, held, "cpu")])
    db = {name: sqnr_db(reference, torch.cat([o.flatten() for o in unet_outputs(q, held, "cpu")]))
          for name, q in (("nearest", nearest), ("learned", learned))}
    assert db["learned"] > db["nearest"] + 1.0, db  # held-out calls: prompts and seeds it never saw
    a, b = dict(quant_layers(nearest)), dict(quant_layers(learned))
    for name in a:
        assert torch.equal(a[name].s_ptq, b[name].s_ptq)
        assert (a[name].int_weight() - b[name].int_weight()).abs().max() <= 1  # moved by one step at most
    assert not any(torch.equal(a[n].int_weight(), b[n].int_weight()) for n in list(a)[:3])
    assert all("forward" not in layer.__dict__ for layer in b.values())  # soft forwards removed


@pytest.mark.slow
def test_learned_rounding_is_deterministic(w4_setup):
    first, _ = _quantize(w4_setup, "block", rounding_steps=30)
    second, _ = _quantize(w4_setup, "block", rounding_steps=30)
    for (name, x), (_, y) in zip(quant_layers(first), quant_layers(second)):
        assert torch.equal(x.w_int, y.w_int), name


@pytest.mark.slow
def test_reconstruction_refuses_a_unet_with_scale_sets(w4_setup):
    fp, config, calib, _ = w4_setup
    qunet, _ = _quantize(w4_setup, "nearest")
    layer = next(layer for _, layer in quant_layers(qunet))
    layer.set_scale_sets(layer.s_ptq[None].clone())
    from qpdeploy.qunet import float_weights_of, plan_layers

    with pytest.raises(ValueError, match="post-training base"):
        reconstruct_blocks(qunet, fp, float_weights_of(fp, plan_layers(fp, config)), calib, steps=2)


def test_rounding_settings_are_validated(quick_config):
    with pytest.raises(QPDeployError, match="rounding must be one of nearest, block"):
        quick_config(rounding="adaround")
    with pytest.raises(QPDeployError, match="rounding steps must be in"):
        quick_config(rounding_steps=0)
    config = quick_config(rounding="block", rounding_steps=7)
    assert type(config).from_json(config.to_json()) == config


@pytest.mark.slow
def test_quantize_command_records_learned_rounding_in_the_base(tmp_path):
    from typer.testing import CliRunner

    from qpdeploy.base import load_base
    from qpdeploy.cli import app
    from qpdeploy.io import read_json

    out = tmp_path / "base4"
    result = CliRunner().invoke(app, ["quantize", "tiny-sd1", "--out", str(out), "--weight-bits", "4", "--rounding",
                                      "block", "--rounding-steps", "5", "--calib-steps", "3", "--calib-samples", "4"])
    assert result.exit_code == 0, result.output
    assert "learned rounding" in result.output and "% of weights moved" in result.output
    config = read_json(out / "quant_config.json")
    report = read_json(out / "report.json")
    assert config["quantize"]["rounding"] == "block" and config["quantize"]["rounding_steps"] == 5
    assert report["rounding"]["steps"] == 5 and report["rounding"]["blocks"] >= 6
    assert set(report["stage_seconds"]) == {"trajectories", "convert", "weights", "rounding", "activations", "evaluate"}
    assert load_base(out).config.rounding == "block"  # an ordinary base that loads
    bad = CliRunner().invoke(app, ["quantize", "tiny-sd1", "--out", str(tmp_path / "x"), "--rounding", "adaround"])
    assert bad.exit_code != 0 and "adaround" in bad.output and not (tmp_path / "x").exists()
