import subprocess
import sys

import pytest
from typer.testing import CliRunner

from qpdeploy.cli import app
from qpdeploy.io import read_json

runner = CliRunner()
QUICK = ["--calib-steps", "4", "--calib-samples", "8", "--device", "cpu"]


def test_help_does_not_import_torch():
    code = "import sys; from qpdeploy.cli import app; app(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_quantize_writes_a_base_and_prints_a_summary(tmp_path):
    result = runner.invoke(app, ["quantize", "tiny-sd1", "--out", str(tmp_path / "base"), *QUICK])
    assert result.exit_code == 0, result.output
    assert "layers quantized / skipped" in result.output and "105 / 16" in result.output
    report = read_json(tmp_path / "base" / "report.json")
    assert report["sqnr_db"] > 20


def test_quantize_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "base"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["quantize", "tiny-sd1", "--out", str(out), *QUICK])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: output {out} already exists (use --force to replace it)"
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_force_replaces_an_existing_base_and_nothing_else(tmp_path):
    out = tmp_path / "base"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = runner.invoke(app, ["quantize", "tiny-sd1", "--out", str(out), "--force", *QUICK])
    assert result.exit_code == 2
    assert "is not a qpdeploy.quantized-base artifact; --force replaces only" in result.output
    assert (out / "old.txt").read_text() == "old"
    (out / "old.txt").unlink()
    out.rmdir()
    assert runner.invoke(app, ["quantize", "tiny-sd1", "--out", str(out), *QUICK]).exit_code == 0
    result = runner.invoke(app, ["quantize", "tiny-sd1", "--out", str(out), "--force", "--weight-bits", "4", *QUICK])
    assert result.exit_code == 0, result.output
    assert read_json(out / "quant_config.json")["quantize"]["weight_bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no lock, temporary or set-aside copy left


@pytest.mark.parametrize("args, message", [
    (["/no/such/model"], "model not found: /no/such/model"),
    (["tiny-sd1", "--weight-bits", "3"], "weight bits must be 4 or 8, got 3"),
    (["tiny-sd1", "--act-bits", "4"], "--act-bits must be 8 or none"),
    (["tiny-sd1", "--act-scales", "per-step"], "Invalid value for '--act-scales': 'per-step' is not one of 'global', 'per-interval'"),
    (["tiny-sd1", "--boundaries", "0,500,900"], "boundaries end at 900 but the model has 1000 timesteps"),
    (["tiny-sd1", "--skip", "(unclosed"], "is not a valid regular expression"),
])
def test_bad_input_is_one_line_with_exit_code_2_and_no_output(tmp_path, args, message):
    out = tmp_path / "base"
    result = runner.invoke(app, ["quantize", *args, "--out", str(out), *QUICK])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())  # no temporary leftovers either


def test_an_empty_calibration_prompt_file_is_refused(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only a comment\n\n")
    result = runner.invoke(app, ["quantize", "tiny-sd1", "--out", str(tmp_path / "b"), "--calib-prompts", str(prompts)])
    assert result.exit_code == 2
    assert "holds no prompt" in result.output


def test_weight_only_quantization_from_the_cli(tmp_path):
    result = runner.invoke(app, ["quantize", "tiny-sd2", "--out", str(tmp_path / "b"), "--act-bits", "none", *QUICK])
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "b" / "quant_config.json")["quantize"]["act_bits"] is None
    assert read_json(tmp_path / "b" / "report.json")["sqnr_db"] > 30  # W8 only: higher than W8A8
