"""The runtime stage's frozen configs: JSON round trip and one-line refusals."""

import pytest

from qpdeploy.errors import QPDeployError
from qpdeploy.runtimes.config import GenerateConfig, RuntimeConfig


def test_configs_round_trip_through_json():
    runtime = RuntimeConfig(backend="torch", base="b", pack="p", low_memory=True, threads=2)
    generate = GenerateConfig(steps=7, guidance=5.0, scheduler="euler", seed=3, images_per_prompt=2,
                              negative_prompt="blurry", height=16, width=16)
    assert RuntimeConfig.from_json(runtime.to_json()) == runtime
    assert GenerateConfig.from_json(generate.to_json()) == generate


@pytest.mark.parametrize("cls, bad, match", [
    (RuntimeConfig, dict(backend="tvm"), "backend must be one of ort, trt, torch, got 'tvm'"),
    (RuntimeConfig, dict(backend="torch"), "give the base it was exported from"),
    (RuntimeConfig, dict(base="b"), "only used by the torch backend"),
    (RuntimeConfig, dict(ort_optimization="max"), "ort optimization must be one of"),
    (RuntimeConfig, dict(fold_weights=True, ort_optimization="none"), "fold weights applies to the ort backend at "
                                                                      "ort optimization basic"),
    (RuntimeConfig, dict(fold_weights=True, ort_optimization="all"), "extended and all run fused INT8 kernels"),
    (RuntimeConfig, dict(fold_weights=True, backend="trt"), "fold weights applies to the ort backend"),
    (RuntimeConfig, dict(arena=False, backend="trt"), "memory arena setting applies to the ort backend only"),
    (RuntimeConfig, dict(device="tpu"), "device must be auto, cpu or cuda"),
    (GenerateConfig, dict(steps=0), "steps must be in 1..1000, got 0"),
    (GenerateConfig, dict(steps=100_000), "steps must be in 1..1000, got 100000"),
    (GenerateConfig, dict(scheduler="lms"), "scheduler must be one of ddim, pndm, dpm, euler"),
    (GenerateConfig, dict(images_per_prompt=0), "images per prompt must be in 1..10000, got 0"),
])
def test_bad_values_are_refused_in_one_line(cls, bad, match):
    with pytest.raises(QPDeployError, match=match) as error:
        cls(**bad)
    assert "\n" not in str(error.value)
