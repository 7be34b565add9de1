"""Shared fixtures: the shipped evaluator and pipeline, skipped only while not yet shipped."""

import pytest

from qpdeploy.miniworld.evaluator import EVALUATOR_DIR
from qpdeploy.models import MINIWORLD_DIR


@pytest.fixture(scope="session")
def evaluator():
    if not (EVALUATOR_DIR / "model.safetensors").is_file():
        pytest.skip(f"the miniworld evaluator is not shipped yet ({EVALUATOR_DIR}); run python -m benchmarks.miniworld.train_evaluator")
    from qpdeploy.miniworld.evaluator import load_evaluator

    return load_evaluator()


@pytest.fixture(scope="session")
def pipeline():
    if not (MINIWORLD_DIR / "model_index.json").is_file():
        pytest.skip(f"the miniworld pipeline is not shipped yet ({MINIWORLD_DIR}); run python -m benchmarks.miniworld.train_base")
    import torch

    torch.set_num_threads(1)
    from qpdeploy.models import load_pipeline

    return load_pipeline("miniworld")
