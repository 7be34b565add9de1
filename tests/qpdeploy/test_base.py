import json
import shutil

import pytest
import torch

from qpdeploy.base import CONFIG_FILE, BASE_WEIGHTS_FILE, load_base, load_base_pipeline, read_base_meta
from qpdeploy.errors import QPDeployError
from qpdeploy.io import read_json
from qpdeploy.layers import quant_layers

from .conftest import CHEAP_QUANTIZE


def unet_output(unet, family="sd1", seed=0):
    g = torch.Generator().manual_seed(seed)
    cross = 64 if family == "sdxl" else 32
    sample = torch.randn(2, 4, 8, 8, generator=g)
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, cross, generator=g)}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.rand(2, 6, generator=g)}
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 900]), **kwargs).sample


@pytest.mark.parametrize("family, changes", [  # the round trip, not calibration quality: sd1 calibrates cheaply
    ("sd1", CHEAP_QUANTIZE), pytest.param("sdxl", {"weight_bits": 4, "act_scales": "per-interval"}, marks=pytest.mark.slow)])
def test_saved_base_reloads_bit_identical(tmp_path, saved_base, tiny_pipe, quick_config, family, changes):
    from qpdeploy.ptq import base_from_pipeline

    path = saved_base(family, **changes)
    in_memory = base_from_pipeline(tiny_pipe(family), quick_config(**changes))
    loaded = load_base(path)
    assert loaded.base_hash == in_memory.base_hash
    assert torch.equal(unet_output(loaded.unet, family), unet_output(in_memory.unet, family))
    for (name, a), (_, b) in zip(quant_layers(loaded.unet), quant_layers(in_memory.unet)):
        assert torch.equal(a.w_int, b.w_int) and torch.equal(a.act_scale, b.act_scale), name


def test_base_directory_holds_config_weights_and_report(saved_base):
    path = saved_base("sd1")
    assert sorted(p.name for p in path.iterdir()) == ["quant_config.json", "report.json", "unet.safetensors"]
    meta = read_base_meta(path)
    report = read_json(path / "report.json")
    for key in ("sqnr_db", "sqnr_db_per_interval", "layers_quantized", "layers_skipped", "weight_bytes_fp",
                "weight_bytes_quant", "seconds"):
        assert key in report
    assert report["layers_quantized"] == len(meta["layers"]) == 105
    assert report["layers_skipped"] == len(meta["skipped"]) == 16
    assert len(report["sqnr_db_per_interval"]) == 4
    assert report["weight_bytes_quant"] < report["weight_bytes_fp"] / 3
    assert meta["source"] == {"kind": "bundled", "name": "tiny-sd1"}


@pytest.mark.slow
def test_int4_base_stores_the_integer_weights_in_half_the_bytes(saved_base):
    int8_path, int4_path = saved_base("sd1"), saved_base("sd1", weight_bits=4)
    payload = sum(layer.w_int.numel() for _, layer in quant_layers(load_base(int8_path).unet))
    saved = (int8_path / BASE_WEIGHTS_FILE).stat().st_size - (int4_path / BASE_WEIGHTS_FILE).stat().st_size
    assert abs(saved - payload / 2) < 0.01 * payload  # everything else is identical in size


def test_base_pipeline_uses_the_quantized_unet_and_checks_the_source(saved_base):
    base = load_base(saved_base("sd1"))
    pipe = load_base_pipeline(base)
    assert pipe.unet is base.unet
    with pytest.raises(QPDeployError, match="differs from the one this base was quantized from"):
        load_base_pipeline(base, model="tiny-sdxl")
    base.meta["source"] = {"kind": "memory"}  # quantized from a pipeline object: nothing to reload
    with pytest.raises(QPDeployError, match="quantized from a pipeline in memory"):
        load_base_pipeline(base)
    assert load_base_pipeline(base, model="tiny-sd1").unet is base.unet


def copy_base(path, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return target


def test_corrupted_weights_are_refused(saved_base, tmp_path):
    path = copy_base(saved_base("sd1"), tmp_path)
    data = bytearray((path / BASE_WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / BASE_WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(QPDeployError, match="does not match the hash"):
        load_base(path)


def test_truncated_weights_are_refused_even_without_the_hash_check(saved_base, tmp_path):
    path = copy_base(saved_base("sd1"), tmp_path)
    (path / BASE_WEIGHTS_FILE).write_bytes((path / BASE_WEIGHTS_FILE).read_bytes()[:1000])
    with pytest.raises(QPDeployError, match="cannot read"):
        load_base(path, verify_hash=False)


@pytest.mark.parametrize("version, message", [(2, "newer than this qpdeploy supports"), (0, "unknown"),
                                              ("1", "no valid format_version")])
def test_unknown_format_versions_are_refused(saved_base, tmp_path, version, message):
    path = copy_base(saved_base("sd1"), tmp_path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["format_version"] = version
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(QPDeployError, match=message):
        load_base(path)


def test_a_directory_that_is_not_a_base_is_refused(tmp_path):
    with pytest.raises(QPDeployError, match="is not a qpdeploy quantized base \(it has no quant_config.json\)"):
        load_base(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(QPDeployError, match="cannot read"):
        load_base(tmp_path)
