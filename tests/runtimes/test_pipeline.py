"""The pipeline built from a deploy dir alone: ONNX text encoders and VAE decoder answer like
the torch modules they were exported from, and the schedulers come from the saved config."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from qpdeploy.exporters.manifest import read_manifest
from qpdeploy.models import tiny_pipeline
from qpdeploy.runtimes import RuntimeConfig, close_pipeline, load_deploy_pipeline
from qpdeploy.runtimes.pipeline import load_scheduler


@pytest.mark.parametrize("family, name", [("sd1", "sd1_s2"), pytest.param("sdxl", "sdxl_multi", marks=pytest.mark.slow)])
def test_onnx_parts_answer_like_the_torch_modules(family, name, deploy):
    reference = tiny_pipeline(family)
    pipe = load_deploy_pipeline(read_manifest(deploy(name)), RuntimeConfig(threads=1))
    try:
        assert type(pipe).__name__ == type(reference).__name__
        assert pipe.vae_scale_factor == reference.vae_scale_factor
        ids = reference.tokenizer(["a photo of sks dog", "a cat"], padding="max_length", return_tensors="pt").input_ids
        for suffix in ("", "_2") if family == "sdxl" else ("",):
            ours, theirs = getattr(pipe, f"text_encoder{suffix}"), getattr(reference, f"text_encoder{suffix}")
            with torch.no_grad():
                want = theirs(ids, output_hidden_states=True)
            got = ours(ids, output_hidden_states=True)
            assert got[0].shape == want[0].shape and (got[0] - want[0]).abs().max() < 1e-4  # [0] as in transformers
            assert (got.hidden_states[-2] - want.hidden_states[-2]).abs().max() < 1e-4  # SDXL's penultimate layer
            if suffix:
                assert ours.config.projection_dim == theirs.config.projection_dim
        latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = reference.vae.decode(latent).sample
        got = pipe.vae.decode(latent).sample
        assert got.shape == want.shape and (got - want).abs().max() < 1e-4
        assert pipe.vae.config.scaling_factor == reference.vae.config.scaling_factor
    finally:
        close_pipeline(pipe)


def test_schedulers_are_built_from_the_saved_config(deploy):
    folder = deploy("sd1_s2") / "scheduler"
    assert type(load_scheduler(folder)) is DDIMScheduler  # the deploy dir's own
    chosen = {name: load_scheduler(folder, name) for name in ("ddim", "pndm", "dpm", "euler")}
    assert [type(s) for s in chosen.values()] == [DDIMScheduler, PNDMScheduler, DPMSolverMultistepScheduler,
                                                  EulerDiscreteScheduler]
    assert chosen["pndm"].config.skip_prk_steps  # PLMS only, as Stable Diffusion's own PNDM config
    own = load_scheduler(folder).config
    for scheduler in chosen.values():  # the trained noise schedule carries over
        assert (scheduler.config.beta_start, scheduler.config.beta_end, scheduler.config.beta_schedule) == \
               (own.beta_start, own.beta_end, own.beta_schedule)
