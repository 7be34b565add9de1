"""TensorRT backend, everything around the real library: the runner's buffers, shapes and
calls against a stand-in ``tensorrt`` module (conftest), the engine compatibility check, and
the engines of a deploy dir dispatched per interval. TensorRT itself cannot be installed here."""

import json
import shutil

import pytest
import torch

from qpdeploy.errors import QPDeployError
from qpdeploy.exporters.manifest import MANIFEST_FILE, read_manifest, write_manifest
from qpdeploy.io import read_json
from qpdeploy.runtimes import trt as trt_backend
from qpdeploy.runtimes.trt import TrtRunner, check_engines
from qpdeploy.runtimes.unet import EngineUNet

ENV = {"tensorrt_version": "10.0.0.fake", "device": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"}


def engine_file(path, inputs, scale=1.0, offset=0.0, output="noise_pred", profile=None):
    spec = {"inputs": inputs, "output": output, "scale": scale, "offset": offset, "profile": profile or {}}
    path.write_text(json.dumps(spec))
    return path


def test_static_engine_binds_preallocated_buffers_once(fake_tensorrt, tmp_path):
    path = engine_file(tmp_path / "unet.plan", {"sample": [2, 4, 3, 3], "timestep": [2]}, scale=2.0, offset=1.0)
    runner = TrtRunner(path, device="cpu")
    with runner:
        buffers = dict(runner.buffers)  # allocated at activation: static shapes
        assert runner.batch == 2 and set(buffers) == {"sample", "timestep", "noise_pred"}
        assert {n: b.data_ptr() for n, b in buffers.items()} == runner.context.addresses
        sample = torch.randn(2, 4, 3, 3)
        for t in (10.0, 900.0):
            out = runner.infer({"sample": sample, "timestep": torch.full((2,), t)}, check_inputs=False)["noise_pred"]
            assert torch.equal(out, 2.0 * sample + 1.0 + t)
        assert all(runner.buffers[n] is b for n, b in buffers.items())  # no reallocation per call
    assert not runner.is_active and len(fake_tensorrt.executions) == 2


def test_dynamic_engine_binds_on_first_call_and_rebinds_on_a_new_batch(fake_tensorrt, tmp_path):
    profile = {"sample": [[1, 4, 3, 3], [4, 4, 3, 3]], "timestep": [[1], [4]]}
    path = engine_file(tmp_path / "unet.plan", {"sample": [-1, 4, 3, 3], "timestep": [-1]}, profile=profile)
    with TrtRunner(path, device="cpu") as runner:
        assert runner.bound is None and runner.batch is None
        for batch in (2, 3):
            sample = torch.randn(batch, 4, 3, 3)
            out = runner.infer({"sample": sample, "timestep": torch.zeros(batch)}, check_inputs=False)["noise_pred"]
            assert out.shape == (batch, 4, 3, 3) and torch.equal(out, sample)
            assert runner.bound["sample"] == (batch, 4, 3, 3)
        with pytest.raises(QPDeployError, match="input sample of shape \\[2, 4, 5, 5\\] is outside"):
            runner.infer({"sample": torch.zeros(2, 4, 5, 5), "timestep": torch.zeros(2)}, check_inputs=False)


def test_corrupted_engine_and_missing_tensorrt_fail_in_one_line(fake_tensorrt, tmp_path, monkeypatch):
    path = tmp_path / "unet_1.plan"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(QPDeployError, match="TensorRT cannot deserialize .*unet_1.plan"):
        TrtRunner(path, device="cpu").activate()
    monkeypatch.setattr(trt_backend.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QPDeployError, match="needs the Python package 'tensorrt'") as error:
        trt_backend.import_tensorrt()
    assert "\n" not in str(error.value)


def with_fake_engines(source, tmp_path, record=ENV, scale=0.0):
    """A copy of a deploy dir with stand-in engines (graph g outputs ``scale * sample + 100 g + t``)
    recorded in its manifest as TensorRT would be."""
    out = tmp_path / "deploy"
    shutil.copytree(source, out)
    manifest = read_json(out / MANIFEST_FILE)
    sample = next(s for s in manifest["unet"]["inputs"] if s["name"] == "sample")["shape"]
    for g, graph in enumerate(manifest["unet"]["graphs"]):
        graph["engine"] = f"{graph['name']}.plan"
        # as export builds them: dynamic batch in the network, one profile fixing it to 2
        profile = {"sample": [[2, *sample[1:]]] * 2, "timestep": [[2]] * 2}
        engine_file(out / graph["engine"], {"sample": [-1, *sample[1:]], "timestep": [-1]}, scale, 100.0 * g,
                    profile=profile)
    for part in [*manifest["text_encoders"], manifest["vae_decoder"]]:  # built too, not run by these tests
        part["engine"] = f"{part['name']}.plan"
        (out / part["engine"]).write_text("{}")
    manifest["engines"] = None if record is None else {**record, "precision": "int8+fp16", "batch": 2}
    del manifest["files"], manifest["format_version"], manifest["kind"]
    write_manifest(out, manifest)
    return out


def test_engines_for_another_machine_are_refused_before_loading(deploy, tmp_path):
    manifest = read_manifest(with_fake_engines(deploy("sd1_s2"), tmp_path))
    check_engines(manifest, ENV)  # the machine that built them
    cases = [({**ENV, "tensorrt_version": "10.8.0.43"},
              "built with TensorRT 10.0.0.fake, this machine has TensorRT 10.8.0.43"),
             ({**ENV, "compute_capability": "9.0", "device": "NVIDIA H100"},
              "built for compute capability 8.7 \\(NVIDIA Jetson AGX Orin\\), this GPU \\(NVIDIA H100\\) has 9.0")]
    for environment, message in cases:
        with pytest.raises(QPDeployError, match=message) as error:
            check_engines(manifest, environment)
        assert "\n" not in str(error.value)
    with pytest.raises(QPDeployError, match="has no TensorRT engines \\(exported without --build-engines\\)"):
        check_engines(read_manifest(deploy("sd1_s2")), ENV)


def test_trt_backend_runs_the_engine_of_each_interval(fake_tensorrt, deploy, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_backend, "engine_environment", lambda device="cuda": ENV)
    path = with_fake_engines(deploy("sd1_s2"), tmp_path)
    with EngineUNet.from_deploy(path, backend="trt", device="cpu") as unet:
        assert unet.device == torch.device("cpu")
        assert [r.batch for r in unet.engines.runners] == [2] * 4  # fixed by the profile, bound at load
        sample, hidden = torch.randn(3, 4, 8, 8), torch.randn(3, 16, 32)
        for t, k in [(999, 3), (600, 2), (300, 1), (5, 0)]:
            # batch 3 on batch-2 engines: two calls, the second padded
            out = unet(sample, torch.tensor(t), hidden).sample
            assert torch.equal(out, torch.full_like(out, 100.0 * k + t))
        assert unet.summary()["engine_per_step"] == ["unet_3", "unet_2", "unet_1", "unet_0"]
    assert [offset for _, _, offset in fake_tensorrt.executions] == [300.0] * 2 + [200.0] * 2 + [100.0] * 2 + [0.0] * 2
