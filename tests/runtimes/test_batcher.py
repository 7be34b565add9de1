"""The step batcher on SDXL: requests with different subjects, prompts, seeds, step counts
and guidance share one UNet call per tick (pooled embeddings and size conditioning batched
per sample), and each image is the one the deploy pipeline makes for that request alone."""

import pytest
import torch

from qpdeploy.exporters.manifest import read_manifest
from qpdeploy.runtimes import RuntimeConfig, close_pipeline, load_deploy_pipeline
from qpdeploy.runtimes.batcher import Request, StepBatcher


@pytest.mark.slow
def test_sdxl_requests_of_different_subjects_share_calls_and_match_generating_alone(deploy, psnr):
    manifest = read_manifest(deploy("sdxl_subjects"))
    requests = [Request("a photo of sks dog", "sks", seed=1, steps=3, guidance=5.0),
                Request("a photo of zwx dog", "zwx", seed=2, steps=2, guidance=1.0),  # no guidance: one sample
                Request("a photo of a cat", None, seed=3, steps=3, guidance=7.0, negative_prompt="blurry")]
    pipe = load_deploy_pipeline(manifest, RuntimeConfig(threads=1))
    try:
        batcher = StepBatcher(pipe)
        images = batcher.run(requests)
        assert batcher.calls == 3 and batcher.samples == 2 * 3 + 1 * 2 + 2 * 3  # 8 request-steps in 3 calls
    finally:
        close_pipeline(pipe)
    h, w = manifest.size
    for request, image in zip(requests, images):
        alone = load_deploy_pipeline(manifest, RuntimeConfig(threads=1), subject=request.subject)
        try:
            want = alone(prompt=request.prompt, negative_prompt=request.negative_prompt, height=h, width=w,
                         num_inference_steps=request.steps, guidance_scale=request.guidance,
                         generator=torch.Generator("cpu").manual_seed(request.seed)).images[0]
        finally:
            close_pipeline(alone)
        assert psnr(want, image) >= 60.0, request
    assert psnr(images[0], images[2]) < 30.0  # different requests: different images
