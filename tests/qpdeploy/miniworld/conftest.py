"""Shared fixtures: the shipped evaluator and pipeline.

They are part of the package: when either is missing (a packaging loss), every test that
needs it fails with the path it expected, instead of silently skipping.
"""

import pytest

from qpdeploy.miniworld.evaluator import EVALUATOR_DIR
from qpdeploy.models import MINIWORLD_DIR


@pytest.fixture(scope="session")
def evaluator():
    if not (EVALUATOR_DIR / "model.safetensors").is_file():
        pytest.fail(f"the miniworld evaluator is missing from the package ({EVALUATOR_DIR})")
    from qpdeploy.miniworld.evaluator import load_evaluator

    return load_evaluator()


@pytest.fixture(scope="session")
def pipeline():
    if not (MINIWORLD_DIR / "model_index.json").is_file():
        pytest.fail(f"the miniworld pipeline is missing from the package ({MINIWORLD_DIR})")
    import torch

    torch.set_num_threads(1)
    from qpdeploy.models import load_pipeline

    return load_pipeline("miniworld")
