"""``qpdeploy generate`` end to end: images and their records, the interval of every step for
each scheduler, determinism, low memory, torch versus ONNX Runtime, and every bad input."""

import copy
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qpdeploy.cli import app
from qpdeploy.exporters.manifest import read_manifest
from qpdeploy.io import file_sha256, read_json
from qpdeploy.runtimes import RuntimeConfig, close_pipeline, load_deploy_pipeline
from qpdeploy.runtimes.pipeline import load_scheduler

RECORD_KEYS = {"prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance", "backend", "manifest_sha256",
               "interval_per_step", "engine_calls", "seconds_per_step", "switch_seconds_total", "timings"}


def invoke(*args):
    return CliRunner().invoke(app, ["generate", *map(str, args), "--threads", "1"])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def expected_intervals(manifest, scheduler, steps):
    schedule = copy.deepcopy(scheduler)
    schedule.set_timesteps(steps)
    return [manifest.intervals.index(t.item()) for t in schedule.timesteps]


def test_generate_writes_the_image_and_its_record(deploy, tmp_path):
    path = deploy("sd1_s2")
    ok(path, "--prompt", "a sks dog on the beach", "--out", tmp_path / "beach.png", "--steps", 7, "--guidance", 7.5,
       "--seed", 1, "--scheduler", "dpm", "--negative-prompt", "blurry")
    image = Image.open(tmp_path / "beach.png")
    assert image.size == (16, 16) and np.asarray(image).std() > 1  # an image, not a blank
    record = read_json(tmp_path / "beach.json")
    assert RECORD_KEYS <= set(record)
    manifest = read_manifest(path)
    intervals = expected_intervals(manifest, load_scheduler(path / "scheduler", "dpm"), 7)
    assert sorted(set(intervals)) == [0, 1, 2, 3]  # 7 steps over K = 4 intervals: uneven shares
    assert record["interval_per_step"] == intervals
    assert record["engine_per_step"] == [f"unet_{k}" for k in intervals]
    assert record["engine_calls"] == {str(k): n for k, n in sorted(Counter(intervals).items())}
    assert (record["scheduler"], record["seed"], record["negative_prompt"]) == \
           ("DPMSolverMultistepScheduler", 1, "blurry")
    assert record["manifest_sha256"] == file_sha256(path / "manifest.json")
    assert record["switches"] == 3 and record["seconds_per_step"] > 0
    assert 0 <= record["switch_seconds_total"] < 0.01 * record["timings"]["denoise_seconds"]  # < 1% of denoising


@pytest.fixture(scope="module")
def sd1_pipeline(deploy):
    pipe = load_deploy_pipeline(read_manifest(deploy("sd1_s2")), RuntimeConfig(threads=1))
    yield pipe
    close_pipeline(pipe)


@pytest.mark.parametrize("name, options", [("ddim", {}), ("pndm", {}), ("dpm", {}), ("euler", {}),
                                           ("euler", {"timestep_spacing": "linspace"})])
def test_the_interval_of_every_step_follows_the_scheduler(name, options, sd1_pipeline, deploy):
    manifest = read_manifest(deploy("sd1_s2"))
    scheduler = load_scheduler(manifest.path / "scheduler", name)
    sd1_pipeline.scheduler = type(scheduler).from_config(scheduler.config, **options)
    sd1_pipeline.unet.reset_history()
    sd1_pipeline("a photo of a dog", num_inference_steps=7, generator=torch.Generator().manual_seed(0))
    calls = sd1_pipeline.unet.summary()
    schedule = copy.deepcopy(sd1_pipeline.scheduler)
    schedule.set_timesteps(7)
    assert calls["timesteps"] == [float(t) for t in schedule.timesteps]
    assert calls["interval_per_step"] == [manifest.intervals.index(t.item()) for t in schedule.timesteps]
    assert sum(calls["engine_calls"].values()) == len(schedule.timesteps) == (8 if name == "pndm" else 7)
    if options:  # Euler with linspace spacing: fractional timesteps
        assert any(t != int(t) for t in calls["timesteps"])


@pytest.mark.slow
def test_prompts_file_images_per_prompt_determinism_low_memory_folded_weights_and_arena(deploy, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog\n# a comment\na red car on a street\n")
    runs = {}
    for run, extra in [("first", []), ("again", []), ("low", ["--low-memory"]), ("fold", ["--fold-weights"]),
                       ("no_arena", ["--no-arena"])]:
        ok(deploy("sd1_s2"), "--prompts-file", prompts, "--images-per-prompt", 2, "--out-dir", tmp_path / run,
           "--steps", 2, "--seed", 5, *extra)
        runs[run] = sorted((tmp_path / run).glob("*.png"))
    names = [p.name for p in runs["first"]]
    assert names == ["0000_a-photo-of-sks-dog.png", "0001_a-photo-of-sks-dog.png", "0002_a-red-car-on-a-street.png",
                     "0003_a-red-car-on-a-street.png"]
    records = [read_json(p.with_suffix(".json")) for p in runs["low"]]
    assert [r["seed"] for r in records] == [5, 6, 7, 8] and all(r["low_memory"] for r in records)
    assert all(read_json(p.with_suffix(".json"))["runtime"]["fold_weights"] for p in runs["fold"])
    assert [read_json(p.with_suffix(".json"))["runtime"]["arena"] for p in runs["first"] + runs["no_arena"]] == \
           [True] * 4 + [False] * 4
    first = [p.read_bytes() for p in runs["first"]]
    assert len(set(first)) == 4  # different seeds, different images
    # the same seed and backend give the same bytes, with every engine resident or loaded ahead,
    # with the weights dequantized once at load or in every call, and with or without the arena
    assert first == [p.read_bytes() for p in runs["again"]] == [p.read_bytes() for p in runs["low"]] == \
           [p.read_bytes() for p in runs["fold"]] == [p.read_bytes() for p in runs["no_arena"]]
    assert [r["interval_per_step"] for r in records] == \
           [read_json(p.with_suffix(".json"))["interval_per_step"] for p in runs["first"]]


def test_torch_reference_and_onnx_runtime_agree(deploy, rt_base_dir, rt_pack_dir, tmp_path, psnr):
    common = ["--prompt", "a photo of sks dog", "--steps", 6, "--seed", 2]
    ok(deploy("sd1_s2"), *common, "--out", tmp_path / "ort.png")
    ok(deploy("sd1_s2"), *common, "--out", tmp_path / "torch.png", "--backend", "torch",
       "--base", rt_base_dir("sd1"), "--pack", rt_pack_dir("sd1", "s2"))
    record = read_json(tmp_path / "torch.json")
    assert record["backend"] == "torch" and set(record["engine_per_step"]) == {"torch"}
    assert record["interval_per_step"] == read_json(tmp_path / "ort.json")["interval_per_step"]
    assert psnr(Image.open(tmp_path / "ort.png"), Image.open(tmp_path / "torch.png")) > 30


@pytest.fixture
def broken(deploy, tmp_path):
    """A private copy of the S2 deploy dir to damage."""
    out = tmp_path / "broken"
    shutil.copytree(deploy("sd1_s2"), out)
    return out


def refused(*args, match):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert match in result.output and result.output.count("error:") == 1, result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
    return result.output


def test_missing_and_corrupted_graphs_are_named(broken, tmp_path):
    out = tmp_path / "x.png"
    graph = broken / "unet_2.onnx"
    data = graph.read_bytes()
    graph.write_bytes(b"\xff" * 64 + data[64:])  # same size, different bytes
    refused(broken, "--prompt", "a dog", "--out", out, match="unet_2.onnx does not match its hash in manifest.json")
    refused(broken, "--prompt", "a dog", "--out", out, "--no-verify-hashes", match="cannot load")
    assert "unet_2.onnx" in invoke(broken, "--prompt", "a dog", "--out", out, "--no-verify-hashes").output
    graph.unlink()
    refused(broken, "--prompt", "a dog", "--out", out, match="is missing unet_2.onnx (listed in manifest.json)")
    assert not out.exists()


def test_backend_size_output_and_reference_errors(deploy, rt_base_dir, rt_pack_dir, tmp_path):
    path, out = deploy("sd1_s2"), tmp_path / "x.png"
    refused(path, "--prompt", "a dog", "--out", out, "--backend", "trt", match="needs the Python package 'tensorrt'")
    refused(path, "--prompt", "a dog", "--out", out, "--backend", "tvm", match="Invalid value for '--backend': 'tvm' is not one of 'ort', 'trt', 'torch'")
    refused(path, "--prompt", "a dog", "--out", out, "--height", 32,
            match="size 32x16 is not the size deploy dir")
    refused(path, "--prompt", "a dog", "--out", out, "--images-per-prompt", 2, match="this run makes 2; use --out-dir")
    refused(path, "--prompt", "a dog", "--out", tmp_path / "x.jpg", match="name the output *.png")
    refused(path, "--prompt", "a dog", "--out", out, "--backend", "torch", match="give the base it was exported from")
    refused(path, "--prompt", "a dog", "--out", out, "--backend", "torch", "--base", rt_base_dir("sd1"),
            "--pack", rt_pack_dir("sd1", "s1"), match="is not the pack deploy dir")
    refused(path, "--prompt", "a dog", "--out", out, "--backend", "torch", "--base", rt_base_dir("sd1"),
            match="give it with --pack PACK")
    out.write_bytes(b"")
    refused(path, "--prompt", "a dog", "--out", out, match="already exists (use --force to replace it)")


def test_a_prompt_over_the_token_limit_is_truncated_with_a_warning(deploy, tmp_path):
    long_prompt = " ".join(["a photo of a dog on the beach"] * 4)  # 32 words + bos and eos: 34 tokens
    result = ok(deploy("sd1_s2"), "--prompt", long_prompt, "--out", tmp_path / "long.png", "--steps", 2)
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "has 34 tokens but the text encoder takes 16: truncated to" in warnings[0]
    assert (tmp_path / "long.png").exists()
    assert json.loads((tmp_path / "long.json").read_text())["prompt"] == long_prompt


def test_the_models_recommended_sampling_is_the_default(deploy, tmp_path):
    """A deploy dir records its source model's qpdeploy_sampling.json; generate uses it when the
    user gives no --steps or --guidance, and the user's values win."""
    copy_dir = tmp_path / "deploy"
    shutil.copytree(deploy("sd1_s2"), copy_dir)
    manifest = read_json(copy_dir / "manifest.json")
    manifest["sampling"] = {"guidance": 3.0, "steps": 4}
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    ok(copy_dir, "--prompt", "a sks dog", "--out", tmp_path / "a.png")
    record = read_json(tmp_path / "a.json")
    assert (record["steps"], record["guidance"]) == (4, 3.0) and len(record["interval_per_step"]) == 4
    ok(copy_dir, "--prompt", "a sks dog", "--out", tmp_path / "b.png", "--steps", 5)
    record = read_json(tmp_path / "b.json")
    assert (record["steps"], record["guidance"]) == (5, 3.0)
    ok(deploy("sd1_s2"), "--prompt", "a sks dog", "--out", tmp_path / "c.png", "--steps", 2)
    assert read_json(tmp_path / "c.json")["guidance"] == 7.5  # no recommendation: 7.5
    manifest["sampling"] = {"guidance": "high"}
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    result = invoke(copy_dir, "--prompt", "a sks dog", "--out", tmp_path / "d.png")
    assert result.exit_code == 2 and "manifest.json: expected" in result.output and not (tmp_path / "d.png").exists()


def test_a_model_folder_recommends_its_sampling(tmp_path):
    from qpdeploy.errors import QPDeployError
    from qpdeploy.models import SAMPLING_FILE, model_sampling_defaults

    class Pipe:
        name_or_path = str(tmp_path)
        config = {}

    assert model_sampling_defaults(Pipe()) == {}
    (tmp_path / SAMPLING_FILE).write_text('{"guidance": 4, "steps": 25}')
    assert model_sampling_defaults(Pipe()) == {"guidance": 4.0, "steps": 25}
    (tmp_path / SAMPLING_FILE).write_text('{"steps": 2.5}')
    with pytest.raises(QPDeployError, match="qpdeploy_sampling.json: expected"):
        model_sampling_defaults(Pipe())
