"""Data-parallel scale training: ``qpdeploy train --processes 2`` (accelerate launch, two CPU
processes over gloo) against one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from qpdeploy.cli import app
from qpdeploy.pack import load_pack

# Each step's global batch: 2 micro-batches (--grad-accum 2) of --batch-size 2 samples.
ARGS = ["--prompt", "a photo of sks dog", "--strategy", "s2", "--steps", "4", "--grad-accum", "2",
        "--batch-size", "2", "--lr", "0.01", "--device", "cpu", "--seed", "3", "--checkpoint-every", "2"]


@pytest.mark.slow  # two processes start torch and load the base (about 40 s)
def test_two_processes_train_the_pack_of_one_process_with_the_same_global_batch(cheap_saved_base, instance_dir,
                                                                                 tmp_path):
    from qpdeploy.base import load_base
    from qpdeploy.layers import quant_layers

    base = cheap_saved_base("sd1")
    common = ["train", "--base", str(base), "--images", str(instance_dir), *ARGS]
    one = tmp_path / "one"
    result = CliRunner().invoke(app, [*common, "--out", str(one)])
    assert result.exit_code == 0, result.output
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "qpdeploy.cli", *common, "--out", str(two), "--processes", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("scale pack:") == 1  # process 0 reports and writes, once
    a, b = load_pack(one), load_pack(two)
    start = {f"{n}.s_out": layer.s_ptq.reshape(1, -1) for n, layer in quant_layers(load_base(base).unet)}
    checked = 0
    for name, trained in a.scales.items():
        if name not in start:  # input scales: not trained in this run
            continue
        checked += 1
        moved = ((trained.reshape(len(trained), -1) - start[name]).abs() / start[name].abs()).max()
        differ = ((trained - b.scales[name]).abs() / trained.abs()).max()
        # the only difference is the order of float additions in the gradient sum (a few ulp per
        # step through AdamW); training moved the scales by far more than that
        assert differ <= 1e-5 and moved >= 1e-3, (name, float(differ), float(moved))
    assert checked > 10
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (one, two))
    assert rb["processes"] == 2 and rb["samples_per_interval"] == ra["samples_per_interval"]
    assert rb["final_loss"] == pytest.approx(ra["final_loss"], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "two.run" / "checkpoints").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one.run" / "checkpoints").iterdir())
    # stopped at step 2 and resumed in two processes: the pack of the uninterrupted run, bit for bit
    resumed = tmp_path / "resumed"
    run = subprocess.run([sys.executable, "-m", "qpdeploy.cli", *common, "--out", str(resumed), "--processes", "2",
                          "--resume", str(tmp_path / "two.run" / "checkpoints" / "step-000002")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    c = load_pack(resumed)
    assert all(torch.equal(b.scales[name], c.scales[name]) for name in b.scales)
    assert json.loads((resumed / "report.json").read_text())["resumed_from_step"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--processes", "2"], "give --grad-accum >= 2"),
    (["--processes", "2", "--grad-accum", "2", "--train-token"], "--train-token is not supported"),
    (["--processes", "0"], "--processes must be >= 1"),
])
def test_parallel_runs_refuse_what_they_cannot_split(cheap_saved_base, instance_dir, tmp_path, extra, message):
    result = CliRunner().invoke(app, ["train", "--base", str(cheap_saved_base("sd1")), "--images", str(instance_dir),
                                      "--prompt", "a photo of sks dog", "--out", str(tmp_path / "p"), *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("keep", [[], [r"attn2\.to_k$", r"attn2\.to_v$"]])
def test_the_launched_processes_get_the_command_line_with_each_repeated_option_once_per_value(
        cheap_saved_base, instance_dir, tmp_path, monkeypatch, keep):
    import qpdeploy.distributed

    launched = []
    monkeypatch.setattr(qpdeploy.distributed, "launch", lambda command, processes: launched.append(command) or 0)
    words = [word for pattern in keep for word in ("--keep-scales", pattern)]
    result = CliRunner().invoke(app, ["train", "--base", str(cheap_saved_base("sd1")), "--images", str(instance_dir),
                                      *ARGS, *words, "--out", str(tmp_path / "p"), "--processes", "2"])
    assert result.exit_code == 0, result.output
    (command,) = launched
    assert command[0] == "train" and "--processes" not in command
    assert [command[i + 1] for i, w in enumerate(command) if w == "--keep-scales"] == keep
    assert command[command.index("--grad-accum") + 1] == "2" and command[command.index("--out") + 1] == str(tmp_path / "p")
