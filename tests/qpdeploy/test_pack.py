"""The scale pack: a fresh start changes nothing, the round trip is exact, and a pack only
loads onto its own base."""

import dataclasses
import json

import pytest
import torch

from qpdeploy.config import parse_strength, strength_problem
from qpdeploy.errors import QPDeployError
from qpdeploy.layers import quant_layers
from qpdeploy.pack import (ScalePack, apply_pack, at_strength, init_scale_sets, load_pack, pack_hash,
                           post_training_scales, reset_to_post_training, save_pack, scales_of)

TIMESTEPS = (100, 350, 600, 900)  # one in each of 4 uniform intervals


def outputs(unet, family="sd1"):
    """UNet outputs for one fixed input at each of TIMESTEPS (a list of tensors)."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    width = 64 if family == "sdxl" else 32
    context = torch.randn(1, 6, width, generator=g)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    with torch.no_grad():
        return [unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]
                for t in TIMESTEPS]


def perturb(base, seed=0):
    """Move every trainable scale randomly (what training would do, without training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in quant_layers(base.unet):
            layer.s_out.mul_(1 + 0.2 * torch.rand(layer.s_out.shape, generator=g))
            if layer.s_in is not None:
                layer.s_in.mul_(1 + 0.2 * torch.rand(layer.s_in.shape, generator=g))


def make_pack(base, strategy, s1_intervals=(), input_scales=True):
    init_scale_sets(base, strategy, base.intervals, s1_intervals, input_scales)
    perturb(base)
    return ScalePack(strategy, base.intervals, base.base_hash, scales_of(base.unet), s1_intervals,
                     {"prompt": "a photo of sks dog", "train": {"lr": 0.001}})


@pytest.mark.parametrize("strategy, s1", [("baseline", ()), ("s1", (1, 2)), ("s2", ())])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fresh_scale_sets_leave_the_output_bit_exact(cheap_base, family, strategy, s1):
    base = cheap_base(family)
    reference = outputs(base.unet, family)
    init_scale_sets(base, strategy, base.intervals, s1, input_scales=True)
    assert all(torch.equal(a, b) for a, b in zip(reference, outputs(base.unet, family)))


@pytest.mark.parametrize("strategy, s1", [("baseline", ()), ("s1", (1, 2)), ("s2", ())])
def test_pack_round_trip_is_exact(cheap_base, tmp_path, strategy, s1):
    trained = cheap_base("sd1")
    ptq = outputs(trained.unet)
    pack = make_pack(trained, strategy, s1)
    expected = outputs(trained.unet)
    path = save_pack(tmp_path / "pack", pack, {"strategy": strategy})
    loaded = load_pack(path)
    assert (loaded.strategy, loaded.intervals, loaded.s1_intervals, loaded.base_hash) == \
        (strategy, trained.intervals, s1, trained.base_hash)
    assert loaded.meta["prompt"] == "a photo of sks dog" and loaded.meta["train"] == {"lr": 0.001}
    assert loaded.scales.keys() == pack.scales.keys()
    assert all(torch.equal(loaded.scales[k], pack.scales[k]) for k in pack.scales)
    assert loaded.to_json() == pack.to_json()  # the record round-trips through pack.json exactly
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.strategy = "s1"
    assert json.loads((path / "report.json").read_text())["pack_bytes"] == (
        (path / "scales.safetensors").stat().st_size + (path / "pack.json").stat().st_size)

    fresh = cheap_base("sd1")
    apply_pack(fresh, loaded)
    got = outputs(fresh.unet)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    tuned = [1, 2] if strategy == "s1" else [0, 1, 2, 3]
    for k in range(4):  # tuned intervals differ from post-training; S1's others are exactly post-training
        assert torch.equal(got[k], ptq[k]) != (k in tuned)
    reset_to_post_training(fresh)
    assert all(torch.equal(a, b) for a, b in zip(ptq, outputs(fresh.unet)))


def test_pack_refuses_another_base(cheap_base, tmp_path):
    pack = make_pack(cheap_base("sd1"), "s2")
    other = cheap_base("sd1", weight_bits=4)
    with pytest.raises(QPDeployError, match="belongs to base .* not to this base"):
        apply_pack(other, load_pack(save_pack(tmp_path / "p", pack)))


def test_pack_refuses_other_intervals_on_a_base_with_per_interval_activation_scales(cheap_base):
    base = cheap_base("sd1", act_scales="per-interval")
    init_scale_sets(base, "s2", base.intervals)
    from qpdeploy.intervals import Intervals

    pack = ScalePack("s2", Intervals.uniform(2), base.base_hash,
                     {k: v[:2] for k, v in scales_of(base.unet).items()})
    with pytest.raises(QPDeployError, match="per-interval activation scales"):
        apply_pack(base, pack)


def test_damaged_packs_fail_with_one_line(cheap_base, tmp_path):
    path = save_pack(tmp_path / "p", make_pack(cheap_base("sd1"), "baseline"))
    scales = path / "scales.safetensors"
    scales.write_bytes(scales.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(QPDeployError, match="corrupted or replaced"):
        load_pack(path)
    meta = json.loads((path / "pack.json").read_text())
    (path / "pack.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(QPDeployError, match="newer than this qpdeploy supports"):
        load_pack(path)
    with pytest.raises(QPDeployError, match="not a directory"):
        load_pack(tmp_path / "missing")


def test_pack_with_the_wrong_number_of_sets_is_refused(cheap_base):
    base = cheap_base("sd1")
    pack = make_pack(base, "s2")
    pack = dataclasses.replace(pack, scales={k: v[:3] for k, v in pack.scales.items()})  # 3 sets for 4 intervals
    with pytest.raises(QPDeployError, match="does not hold 4 scale set"):
        apply_pack(cheap_base("sd1"), pack)


def test_pack_strength_moves_the_weights_linearly_from_the_base_to_the_pack(cheap_base, tmp_path):
    base = cheap_base("sd1")
    ptq = outputs(base.unet)
    pack = make_pack(base, "s2")
    full = outputs(base.unet)
    fresh = cheap_base("sd1")
    s_ptq = post_training_scales(fresh)
    assert at_strength(pack, s_ptq, 1.0) is pack
    apply_pack(fresh, at_strength(pack, s_ptq, 0.0))
    assert all(torch.equal(a, b) for a, b in zip(ptq, outputs(fresh.unet)))  # strength 0: the base exactly
    half = at_strength(pack, s_ptq, 0.5)
    for key, value in pack.scales.items():
        start = s_ptq[key.rsplit(".", 1)[0]] if key.endswith("s_out") else 1.0
        torch.testing.assert_close(half.scales[key], (start + value) / 2, rtol=1e-6, atol=0)
    assert half.meta["strength"] == 0.5 and pack_hash(half) != pack_hash(pack)
    assert at_strength(half, s_ptq, 0.5).meta["strength"] == 0.25  # strengths compose
    apply_pack(fresh, load_pack(save_pack(tmp_path / "half", half)))  # a pack like any other
    midway = outputs(fresh.unet)
    for p, h, f in zip(ptq, midway, full):  # between the base's output and the pack's
        assert 0 < (h - p).norm() < (f - p).norm() and (f - h).norm() < (f - p).norm()


@pytest.mark.parametrize("strength", [-0.1, 2.5, float("nan")])
def test_pack_strength_outside_its_range_is_refused(cheap_base, strength):
    base = cheap_base("sd1")
    with pytest.raises(QPDeployError, match="pack strength must be a number between 0 and 2"):
        at_strength(make_pack(base, "baseline"), post_training_scales(base), strength)


def test_pack_strength_needs_the_layers_of_the_pack(cheap_base):
    base = cheap_base("sd1")
    pack = make_pack(base, "s2")
    s_ptq = post_training_scales(base)
    name = next(iter(s_ptq))
    with pytest.raises(QPDeployError, match=f"does not fit the base's layers \\(for example {name}\\)"):
        at_strength(pack, {k: v for k, v in s_ptq.items() if k != name}, 0.5)
    with pytest.raises(QPDeployError, match="output channels"):
        at_strength(pack, {**s_ptq, name: torch.ones(3)}, 0.5)


def test_pack_strength_per_interval_moves_each_intervals_set_on_its_own(cheap_base):
    base = cheap_base("sd1")
    pack = make_pack(base, "s2")  # one set per interval, 4 intervals
    s_ptq = post_training_scales(base)
    mixed = at_strength(pack, s_ptq, (1.0, 0.0, 0.5, 2.0))
    for key, value in pack.scales.items():
        start = s_ptq[key.rsplit(".", 1)[0]] if key.endswith("s_out") else torch.ones_like(value[0])
        assert torch.equal(mixed.scales[key][0], value[0].float())  # strength 1: bit-exact
        assert torch.equal(mixed.scales[key][1], start.float().reshape(-1).expand_as(value[1]))
        torch.testing.assert_close(mixed.scales[key][2], (start + value[2]) / 2, rtol=1e-6, atol=0)
        torch.testing.assert_close(mixed.scales[key][3], 2 * value[3] - start, rtol=1e-6, atol=1e-7)
    assert mixed.meta["strength"] == [1.0, 0.0, 0.5, 2.0]
    assert at_strength(mixed, s_ptq, 0.5).meta["strength"] == [0.5, 0.0, 0.25, 1.0]  # strengths compose
    assert at_strength(pack, s_ptq, (1.0,) * 4) is pack
    assert at_strength(pack, s_ptq, (0.5,) * 4).meta["strength"] == 0.5  # one value when all agree
    with pytest.raises(QPDeployError, match="gives 2 values; the pack has 4 intervals"):
        at_strength(pack, s_ptq, (1.0, 0.5))
    with pytest.raises(QPDeployError, match=r"must each be a number between 0 and 2, got \[1.0, 0.5, 3.0, 1.0\]"):
        at_strength(pack, s_ptq, (1.0, 0.5, 3.0, 1.0))


def test_pack_strength_per_interval_must_agree_where_intervals_share_a_set(cheap_base):
    base = cheap_base("sd1")
    s_ptq = post_training_scales(base)
    shared = make_pack(base, "baseline")  # one set for all intervals
    with pytest.raises(QPDeployError, match="differs between intervals that share one scale set"):
        at_strength(shared, s_ptq, (1.0, 0.5) + (1.0,) * (shared.intervals.k - 2))
    same, half = at_strength(shared, s_ptq, (0.5,) * shared.intervals.k), at_strength(shared, s_ptq, 0.5)
    assert all(torch.equal(same.scales[k], half.scales[k]) for k in shared.scales)


def test_pack_strength_text_form():
    assert parse_strength("0.9") == 0.9 and parse_strength("1/0.5") == (1.0, 0.5)
    assert parse_strength("half") == "half" and strength_problem(parse_strength("1/x")) is not None
    assert strength_problem((1.0, 0.5)) is None and strength_problem(()) is not None
