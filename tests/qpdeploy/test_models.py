import pytest
import torch

from qpdeploy.errors import QPDeployError
from qpdeploy.models import load_pipeline, model_family, tiny_pipeline


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_pipelines_have_their_family_structure(family):
    pipe = load_pipeline(f"tiny-{family}")
    assert model_family(pipe.unet) == family
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")


def test_tiny_pipelines_are_reproducible():
    a, b = tiny_pipeline("sd1"), tiny_pipeline("sd1")
    for (name, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(x, y), name


def test_a_saved_diffusers_directory_loads(tmp_path):
    tiny_pipeline("sd2").save_pretrained(tmp_path / "model")
    pipe = load_pipeline(tmp_path / "model")
    assert model_family(pipe.unet) == "sd2"
    assert torch.equal(pipe.unet.conv_in.weight, tiny_pipeline("sd2").unet.conv_in.weight)


def test_missing_path_is_a_one_line_error(tmp_path):
    with pytest.raises(QPDeployError, match="model not found"):
        load_pipeline(tmp_path / "nope")


def test_a_directory_without_model_index_is_not_a_diffusion_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(QPDeployError, match="has no model_index.json"):
        load_pipeline(tmp_path)


def test_an_unsupported_architecture_is_refused(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(QPDeployError, match="unsupported architecture.*UNet2DModel"):
        load_pipeline(tmp_path / "ddpm")


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    with pytest.raises(QPDeployError, match="pickles"):
        load_pipeline(tmp_path / "model.ckpt")


def test_a_corrupted_safetensors_file_is_a_one_line_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(QPDeployError, match="cannot read checkpoint"):
        load_pipeline(tmp_path / "model.safetensors")


def test_a_safetensors_file_without_a_unet_is_not_a_diffusion_model(tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(QPDeployError, match="not a Stable Diffusion checkpoint"):
        load_pipeline(tmp_path / "other.safetensors")


def test_sampling_resolves_given_then_recommended_then_the_fallback():
    from qpdeploy.models import FALLBACK_SAMPLING, resolve_sampling

    assert resolve_sampling({}) == (FALLBACK_SAMPLING["steps"], FALLBACK_SAMPLING["guidance"]) == (25, 7.5)
    assert resolve_sampling({"guidance": 4.0}) == (25, 4.0)
    assert resolve_sampling({"guidance": 4.0, "steps": 30}, steps=10) == (10, 4.0)
    assert resolve_sampling({"guidance": 4.0}, guidance=0.0) == (25, 0.0)  # 0 is a choice, not "not given"
