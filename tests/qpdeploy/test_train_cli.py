"""``qpdeploy train`` from the command line: artifacts, --model chaining, one-line errors."""

import json

import pytest
from typer.testing import CliRunner

from qpdeploy.base import load_base
from qpdeploy.cli import app
from qpdeploy.layers import quant_layers
from qpdeploy.pack import apply_pack, load_pack

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["train", *map(str, args)])


def test_train_on_a_base_writes_a_pack_that_applies(cheap_saved_base, instance_dir, tmp_path):
    base_dir = cheap_saved_base("sd1")
    out = tmp_path / "pack"
    result = invoke("--base", base_dir, "--images", instance_dir, "--prompt", "a photo of a dog", "--out", out,
                    "--strategy", "s1", "--s1-intervals", "0,2", "--steps", "2", "--device", "cpu",
                    "--sample-steps", "3", "--sample-guidance", "2.5")
    assert result.exit_code == 0, result.output
    assert f"scale pack: {out}" in result.output and "warning: the instance prompt" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == "s1" and report["steps"] == 2 and report["num_sets"] == 1
    base = load_base(base_dir)
    apply_pack(base, load_pack(out))
    assert base.unet.qp_router.set_of_interval.tolist() == [0, 1, 0, 1]
    assert all(layer.num_sets == 1 for _, layer in quant_layers(base.unet))
    assert {k: load_pack(out).meta["train"][k] for k in ("sample_steps", "guidance")} == {"sample_steps": 3,
                                                                                          "guidance": 2.5}


def test_input_scales_train_by_default_and_can_be_turned_off(cheap_saved_base, instance_dir, tmp_path):
    base_dir = cheap_saved_base("sd1")
    layers = len(list(quant_layers(load_base(base_dir).unet)))
    for flag, with_inputs in ((), True), (("--no-train-input-scales",), False):
        out = tmp_path / f"pack{len(flag)}"
        result = invoke("--base", base_dir, "--images", instance_dir, "--prompt", "a photo of sks dog", "--out", out,
                        "--steps", "1", "--device", "cpu", *flag)
        assert result.exit_code == 0, result.output
        pack = load_pack(out)
        assert pack.input_scales is with_inputs
        assert pack.meta["train"]["guidance"] is None  # the model's recommendation, resolved when sampling
        assert sum(k.endswith(".s_in") for k in pack.scales) == (layers if with_inputs else 0)


def test_model_is_quantized_first_with_quantize_options(instance_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a dog\na cat on a sofa\n")
    out = tmp_path / "pack"
    result = invoke("--model", "tiny-sd1", "--images", instance_dir, "--prompt", "a photo of sks dog", "--out", out,
                    "--strategy", "s2", "--intervals", "2", "--steps", "1", "--device", "cpu",
                    # quantize's own options, passed through:
                    "--weight-bits", "4", "--calib-steps", "2", "--calib-samples", "4", "--calib-method", "minmax",
                    "--calib-prompts", prompts)
    assert result.exit_code == 0, result.output
    base_dir = tmp_path / "pack-base"
    meta = json.loads((base_dir / "quant_config.json").read_text())
    assert meta["quantize"]["weight_bits"] == 4 and meta["quantize"]["calib_steps"] == 2
    assert meta["intervals"]["boundaries"] == [0, 500, 1000]  # train's --intervals reaches quantize too
    pack = load_pack(out)
    assert pack.base_hash == meta["base_hash"] and pack.num_sets == 2


@pytest.mark.parametrize("args, message", [
    (["--images", "{empty}", "--prompt", "p", "--out", "{out}"], "no images in"),  # default model: checked first
    (["--base", "{base}", "--images", "{empty}", "--prompt", "p", "--out", "{out}"], "no images in"),
    (["--base", "{base}", "--images", "{images}", "--prompt", "p", "--out", "{out}", "--strategy", "s9"],
     "is not one of 'baseline', 's1', 's2'"),
    (["--base", "{base}", "--images", "{images}", "--prompt", "p", "--out", "{out}", "--weight-bits", "4"],
     "unknown option"),
    (["--base", "{missing}", "--images", "{images}", "--prompt", "p", "--out", "{out}"], "quantized base not found"),
    (["--base", "{base}", "--images", "{images}", "--prompt", "p", "--out", "{out}", "--s1-intervals", "a,b"],
     "comma-separated integers"),
    (["--base", "{base}", "--images", "{images}", "--prompt", "p", "--out", "{out}", "--sample-guidance", "-1"],
     "guidance must be in 0..100"),
])
def test_bad_input_exits_2_with_one_line(cheap_saved_base, instance_dir, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    where = dict(images=instance_dir, out=tmp_path / "pack", base=cheap_saved_base("sd1"), empty=tmp_path / "empty",
                 missing=tmp_path / "nope")
    result = invoke(*[a.format(**{k: str(v) for k, v in where.items()}) for a in args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (tmp_path / "pack").exists()


def test_low_memory_checkpoints_gradients_and_caps_the_heap(cheap_saved_base, instance_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("qpdeploy.memory.cap_heap_retention", lambda *a: calls.append(a) or True)
    out = tmp_path / "pack"
    result = invoke("--base", cheap_saved_base("sd1"), "--images", instance_dir, "--prompt", "a photo of sks dog",
                    "--out", out, "--steps", "1", "--device", "cpu", "--low-memory")
    assert result.exit_code == 0, result.output
    assert calls == [()]
    assert load_pack(out).meta["train"]["gradient_checkpointing"] is True
