"""``EngineUNet`` as a drop-in ``pipe.unet``: the same image as ``qpdeploy generate``, in SD and
SDXL pipelines, with the attributes and return types pipelines rely on, and clear errors."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from PIL import Image
from typer.testing import CliRunner

from qpdeploy.cli import app
from qpdeploy.errors import QPDeployError
from qpdeploy.models import tiny_pipeline
from qpdeploy.runtimes import EngineUNet


def run_generate(*args):
    result = CliRunner().invoke(app, ["generate", *map(str, args), "--threads", "1"])
    assert result.exit_code == 0, result.output
    return result


def deploy_embeddings(path, family, prompt, negative):
    """The prompt embeddings ``qpdeploy generate`` conditions on (the deploy dir's ONNX text encoders)."""
    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.runtimes import RuntimeConfig, close_pipeline, load_deploy_pipeline

    pipe = load_deploy_pipeline(read_manifest(path), RuntimeConfig(threads=1))
    try:
        if family == "sdxl":
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
            return dict(zip(names, pipe.encode_prompt(prompt, device=torch.device("cpu"), negative_prompt=negative)))
        embeds = pipe.encode_prompt(prompt, torch.device("cpu"), 1, True, negative)
        return dict(zip(("prompt_embeds", "negative_prompt_embeds"), embeds))
    finally:
        close_pipeline(pipe)


@pytest.mark.parametrize("family, name", [("sd1", "sd1_s2"), pytest.param("sdxl", "sdxl_multi", marks=pytest.mark.slow)])
def test_engine_unet_in_a_diffusers_pipeline_gives_the_generate_image(family, name, deploy, tmp_path, psnr):
    prompt, negative, settings = "a photo of sks dog", "a cat", dict(num_inference_steps=6, guidance_scale=7.5)
    run_generate(deploy(name), "--prompt", prompt, "--out", tmp_path / "cli.png", "--steps", 6, "--seed", 3,
                 "--scheduler", "ddim", "--negative-prompt", negative)
    cli = np.asarray(Image.open(tmp_path / "cli.png"))
    # the user's own pipeline: the float text encoder(s) and VAE in torch, the UNet from the deploy dir
    pipe = tiny_pipeline(family)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    embeds = deploy_embeddings(deploy(name), family, prompt, negative)
    with EngineUNet.from_deploy(deploy(name), backend="ort", threads=1) as unet:
        pipe.unet = unet
        same_condition = pipe(**embeds, **settings, generator=torch.Generator().manual_seed(3)).images[0]
        assert len(unet.history) == 6
        own_encoder = pipe(prompt, negative_prompt=negative, **settings,
                           generator=torch.Generator().manual_seed(3)).images[0]
    # one denoising loop (diffusers'): the same conditioning gives the same image, byte for byte ...
    assert np.array_equal(np.asarray(same_condition), cli)
    # ... and the torch text encoder's last-bit differences from ONNX Runtime's stay invisible
    assert psnr(own_encoder, cli) > 45


@pytest.mark.slow
def test_engine_unet_looks_like_a_diffusers_unet(deploy):
    with EngineUNet.from_deploy(deploy("sdxl_multi"), threads=1) as unet:
        assert unet.config.sample_size == 8 and unet.config.in_channels == 4  # exported latent 8x8
        assert unet.config.addition_embed_type == "text_time" and unet.config.time_cond_proj_dim is None
        assert unet.add_embedding.linear_1.in_features == unet.config.projection_class_embeddings_input_dim
        assert unet.dtype == torch.float32 and unet.device == torch.device("cpu")
        sample, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 64)
        added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
        out = unet(sample, 500, hidden, added_cond_kwargs=added)
        assert isinstance(out, UNet2DConditionOutput) and out.sample.shape == (2, 4, 8, 8)
        # int, float, 0-dim, (1,) and (B,) timesteps are one and the same call
        for t in (500.0, torch.tensor(500), torch.tensor([500]), torch.tensor([500, 500])):
            again = unet(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)
            assert isinstance(again, tuple) and torch.equal(again[0], out.sample)
        half = unet(sample.half(), 500, hidden.half(), added_cond_kwargs=added).sample
        assert half.dtype == torch.float16  # returned in the caller's dtype
        with pytest.raises(QPDeployError, match="needs added_cond_kwargs"):
            unet(sample, 500, hidden)
        with pytest.raises(QPDeployError, match="take no mid_block_additional_residual"):
            unet(sample, 500, hidden, added_cond_kwargs=added, mid_block_additional_residual=torch.zeros(1))


def test_a_size_the_graphs_were_not_exported_for_is_refused(deploy):
    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    with EngineUNet.from_deploy(deploy("sd1_s2"), threads=1) as unet:
        pipe.unet = unet
        with pytest.raises(QPDeployError, match="image size 32x32 \\(latent 16x16\\) is not the size deploy dir .* "
                                                "was exported for: 16x16") as error:
            pipe("a dog", height=32, width=32, num_inference_steps=2)
    assert "\n" not in str(error.value)
