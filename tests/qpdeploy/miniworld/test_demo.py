"""``qpdeploy demo`` end to end (short settings), the evaluation entry point and the
model's own calibration prompts."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from qpdeploy.cli import app
from qpdeploy.miniworld.prompts import vocabulary
from qpdeploy.miniworld.subjects import get_subject

SHORT = ["--steps", "4", "--seeds", "1", "--intervals", "2", "--threads", "1"]


def test_miniworld_ships_calibration_prompts_in_its_own_words(pipeline):
    from qpdeploy.models import load_pipeline
    from qpdeploy.ptq import model_calibration_prompts

    prompts = model_calibration_prompts(pipeline)
    assert prompts is not None and len(prompts) == 16 and len(set(prompts)) == 16
    words = set(vocabulary())
    assert all(set(p.split()) <= words for p in prompts)
    assert model_calibration_prompts(load_pipeline("tiny-sd1")) is None  # built-in list there


def test_unpersonalized_model_does_not_draw_the_subject(pipeline, evaluator):
    from qpdeploy.miniworld.evaluate import evaluate_prompts

    subject = get_subject("zwx")
    prompts = subject.prompts("dev")[:2]
    result = evaluate_prompts(pipeline, prompts, evaluator, subject.identifier, subject.class_prompts("dev")[:2],
                              images_per_prompt=2, steps=8, backdrop=subject.background)
    assert result["images"] == 4
    each = {k: np.array(v) for k, v in result["per_image"].items()}
    assert np.array_equal(each["prompt_match"], each["background_match"] * each["shape_match"])  # its two parts
    assert each["background_match"].mean() == result["attributes"]["background"]
    assert each["backdrop_drawn"].max() == 0  # asked for other backgrounds, it draws none of them on grass
    assert result["subject_fidelity"]["probability"] < 0.1  # the subject is new to the model
    assert result["attributes"]["background"] >= 0.75 and result["preservation"]["background"] >= 0.75
    assert result["frechet"] > 0


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_grid_and_report(pipeline, evaluator, tmp_path):
    from PIL import Image

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), *SHORT])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["seconds"]) == {"quantize", "train", "export", "generate", "evaluate", "total"}
    prompts = report["prompts"]
    assert len(prompts) == 5 and all("sks circle" in p for p in prompts)
    assert prompts[0] == get_subject("sks").instance_prompt().text
    for name in ("post-training", "personalized"):
        model = report["models"][name]
        assert 0 <= model["subject_fidelity"]["probability"] <= 1
        assert 0 <= model["subject_fidelity_training_prompt"]["probability"] <= 1
        assert 0 <= model["subject_fidelity"]["instance_recognised"] <= 1  # the evaluator has an instance embedding
        assert model["prompt_fidelity"]["background"] >= 0.5
    assert report["train"]["steps"] == 4 and report["train"]["strategy"] == "s2"
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 96 + 12, 20 + 5 * (96 + 18))  # 5 prompts x (1 + 1) images, header and captions
    pixels = np.asarray(grid.convert("RGB"))
    assert pixels[18:114, :96].std() > 5  # a drawn image, not the blank canvas
    manifest = json.loads((out / "deploy" / "manifest.json").read_text())
    assert manifest["unet"]["layout"] == "per-interval" and len(manifest["unet"]["graphs"]) == 2
    record = json.loads(next((out / "images" / "personalized").glob("*.json")).read_text())
    assert record["backend"] == "ort" and len(record["interval_per_step"]) == 25
    assert set(record["interval_per_step"]) == {0, 1}  # both engines ran

    again = CliRunner().invoke(app, ["demo", "--out", str(out), *SHORT])
    assert again.exit_code != 0 and "exists" in again.output  # never overwritten without --force


def test_demo_refuses_an_unknown_subject(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--subject", "nope"])
    assert result.exit_code == 2 and "'nope' is not one of 'sks', 'zwx', 'qlv'" in result.output
    assert not (tmp_path / "d").exists()
