"""Single-file (original LDM layout) checkpoints: ``qpdeploy quantize model.safetensors --config DIR``.

The checkpoints are tiny random pipelines written back into the original key layout
(``ldm_checkpoint.to_ldm_state_dict``), so loading them runs diffusers' real conversion,
offline, and must give back exactly the weights they were made from.
"""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qpdeploy.cli import app
from qpdeploy.errors import QPDeployError
from qpdeploy.io import read_json
from qpdeploy.models import load_pipeline, tiny_pipeline, tiny_unet_config

from .ldm_checkpoint import to_ldm_state_dict, unet_state, vae_key, vae_value

runner = CliRunner()
QUICK = ["--weight-bits", "4", "--calib-steps", "4", "--calib-samples", "8", "--device", "cpu",
         "--calib-method", "minmax"]  # min-max ranges: the lp search would triple the CLI test's time
SD1_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # where diffusers looks for SD 1.x configs


def tiny_xl_pipeline():
    """tiny-sdxl whose second text encoder differs from the first the way SDXL's do.

    diffusers tells the two encoders apart by width and spots SDXL by OpenCLIP's tenth
    block, so the second one is wider (48) and 10 layers deep; the UNet's cross-attention
    width follows (32 + 48).
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    pipe = tiny_pipeline("sdxl")
    text_config = copy.deepcopy(pipe.text_encoder_2.config)
    text_config.hidden_size, text_config.num_hidden_layers = 48, 10
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
        unet = UNet2DConditionModel(**{**tiny_unet_config("sdxl"), "cross_attention_dim": 32 + 48})
    return StableDiffusionXLPipeline(**{**pipe.components, "text_encoder_2": text_encoder_2, "unet": unet})


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """``single_file(family)``: (pipeline, checkpoint file, config directory), cached."""
    cache = {}

    def make(family="sd1"):
        if family not in cache:
            pipe = tiny_pipeline("sd1") if family == "sd1" else tiny_xl_pipeline()
            root = tmp_path_factory.mktemp(f"single-file-{family}")
            save_file(to_ldm_state_dict(pipe), str(root / "model.safetensors"))
            pipe.save_pretrained(root / "config")
            cache[family] = pipe, root / "model.safetensors", root / "config"
        return cache[family]

    return make


def assert_same_weights(expected, actual):
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(expected, part, None) is None:
            continue
        want, got = getattr(expected, part).state_dict(), getattr(actual, part).state_dict()
        assert sorted(got) == sorted(want), part
        differ = [k for k in want if not torch.equal(want[k], got[k])]
        assert differ == [], f"{part}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def test_checkpoint_has_the_original_layout(single_file):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    pipe, path, _ = single_file("sd1")
    state = load_file(str(path))
    parts = sum(len(getattr(pipe, p).state_dict()) for p in ("unet", "vae", "text_encoder"))
    assert len(state) == parts == 464  # every tensor kept, none added
    assert infer_diffusers_model_type(state) == "v1"
    # 2 layers per block: down block 1's layers are input_blocks 4-5, block 0's downsampler
    # input_blocks 3; up block 0 (with attention) puts its upsampler at output_blocks.2.2
    assert state["model.diffusion_model.input_blocks.3.0.op.weight"].shape == (32, 32, 3, 3)
    assert state["model.diffusion_model.input_blocks.5.1.proj_in.weight"].shape == (64, 64, 1, 1)
    assert state["model.diffusion_model.output_blocks.2.2.conv.weight"].shape == (64, 64, 3, 3)
    assert state["model.diffusion_model.middle_block.2.out_layers.3.weight"].shape == (64, 64, 3, 3)
    assert state["first_stage_model.decoder.up.1.upsample.conv.weight"].shape == (32, 32, 3, 3)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state


def test_layout_inverts_diffusers_converters_for_other_block_shapes():
    """SD 1.5's block pattern (attention in the first down blocks) with 1 layer per block."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=4,
        )
        vae = AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=4)
    unet_ldm = {f"model.diffusion_model.{k}": v for k, v in unet_state(unet).items()}
    vae_ldm = {f"first_stage_model.{vae_key(k, 3)}": vae_value(k, v) for k, v in vae.state_dict().items()}
    # upsamplers follow the last layer's resnet (UpBlock2D) or its transformer (CrossAttnUpBlock2D)
    assert {"model.diffusion_model.output_blocks.1.1.conv.weight",
            "model.diffusion_model.output_blocks.3.2.conv.weight"} <= unet_ldm.keys()
    for model, ldm, convert in [(unet, unet_ldm, convert_ldm_unet_checkpoint),
                                (vae, vae_ldm, convert_ldm_vae_checkpoint)]:
        want, got = model.state_dict(), convert(ldm, dict(model.config))
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("family, pipeline_class, tensors", [
    ("sd1", "StableDiffusionPipeline", 464),
    ("sdxl", "StableDiffusionXLPipeline", 713),
])
def test_single_file_loads_the_exact_weights(single_file, family, pipeline_class, tensors):
    pipe, path, config_dir = single_file(family)
    assert len(load_file(str(path))) == tensors
    loaded = load_pipeline(path, config_dir)
    assert type(loaded).__name__ == pipeline_class
    assert_same_weights(pipe, loaded)
    assert loaded.tokenizer("a photo of a dog").input_ids == pipe.tokenizer("a photo of a dog").input_ids


def test_components_replace_the_checkpoints_own(single_file):
    pipe, path, config_dir = single_file("sd1")
    unet = tiny_pipeline("sd1", seed=1).unet
    loaded = load_pipeline(path, config_dir, unet=unet)
    assert loaded.unet is unet
    assert torch.equal(loaded.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)


def test_without_config_the_local_cache_is_used(single_file, tmp_path, monkeypatch):
    import huggingface_hub.constants

    pipe, path, config_dir = single_file("sd1")
    repo = tmp_path / "hub" / f"models--{SD1_REPO.replace('/', '--')}"
    pipe.save_pretrained(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert_same_weights(pipe, load_pipeline(path))


def test_a_config_that_is_not_a_diffusers_model_is_refused(single_file, tmp_path):
    _, path, _ = single_file("sd1")
    with pytest.raises(QPDeployError, match="is not a diffusers model"):
        load_pipeline(path, tmp_path)


def test_quantize_cli_with_config_writes_a_base(single_file, tmp_path):
    from qpdeploy.base import source_hash

    pipe, path, config_dir = single_file("sd1")
    out = tmp_path / "base"
    result = runner.invoke(app, ["quantize", str(path), "--config", str(config_dir), "--out", str(out), *QUICK])
    assert result.exit_code == 0, result.output
    meta = read_json(out / "quant_config.json")
    assert meta["source"] == {"kind": "single-file", "path": str(path.resolve())}
    assert meta["source_hash"] == source_hash(pipe)  # the VAE, text encoder and vocabulary came through
    assert meta["quantize"]["weight_bits"] == 4
    assert len(meta["layers"]) == 105
    assert read_json(out / "report.json")["sqnr_db"] > 10


def test_quantize_cli_without_config_or_cache_fails_in_one_line(single_file, tmp_path, monkeypatch):
    import huggingface_hub.constants

    _, path, _ = single_file("sd1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    out = tmp_path / "base"
    result = runner.invoke(app, ["quantize", str(path), "--out", str(out), *QUICK])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "--config" in lines[0] and SD1_REPO in lines[0]
    assert not out.exists()
    assert not (tmp_path / "hf" / "hub").exists()  # nothing was downloaded into the cache
