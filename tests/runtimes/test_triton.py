"""Serving through Triton Inference Server: the model repository, and a real tritonserver
(from the nvidia-pytriton wheel) on loopback ports, driven over HTTP with tritonclient."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from qpdeploy.errors import QPDeployError


@pytest.mark.slow  # exports the multi-subject deploy dir (shared with the server tests)
def test_the_repository_declares_batched_models_and_the_pipeline_entry_point(deploy, tmp_path):
    from qpdeploy.runtimes.triton import RepositoryConfig, write_repository

    source = deploy("sd1_subjects")
    repo = write_repository(source, tmp_path / "repo", RepositoryConfig(instances=3, max_queue_delay_us=500))
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["pipeline", "text_encoder", "unet", "vae_decoder"]
    unet = (repo / "unet" / "config.pbtxt").read_text()
    assert "max_batch_size: 6" in unet and "max_queue_delay_microseconds: 500" in unet
    assert 'name: "subject" data_type: TYPE_STRING dims: [ 1 ]' in unet
    assert 'name: "sample" data_type: TYPE_FP32 dims: [ 4, 8, 8 ]' in unet
    pipeline = (repo / "pipeline" / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in pipeline and "count: 3 kind: KIND_CPU" in pipeline
    assert 'name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true' in pipeline
    assert json.dumps(str(source.resolve())) in pipeline
    info = json.loads((repo / "qpdeploy-triton.json").read_text())
    assert info["subjects"] == ["sks", "zwx"] and info["layout"] == "multi-subject"
    with pytest.raises(QPDeployError, match="already exists"):
        write_repository(source, tmp_path / "repo")
    with pytest.raises(QPDeployError, match="multi-subject layout.*--platform python"):
        write_repository(source, tmp_path / "native", RepositoryConfig(platform="onnxruntime"))
    with pytest.raises(QPDeployError, match="input"):
        write_repository(source, source / "repo")
    (tmp_path / "mine").mkdir()
    with pytest.raises(QPDeployError, match="not a triton-repository"):
        write_repository(source, tmp_path / "mine", force=True)  # --force replaces only a repository


@pytest.fixture(scope="module")
def server(deploy, tmp_path_factory):
    """A tritonserver on the multi-subject deploy dir's repository (4 pipeline instances)."""
    from qpdeploy.runtimes.triton import RepositoryConfig, TritonServer, write_repository

    pytest.importorskip("tritonclient.http")
    repo = write_repository(deploy("sd1_subjects"), tmp_path_factory.mktemp("triton") / "repo",
                            RepositoryConfig(instances=4, threads=1, max_queue_delay_us=20000))
    with TritonServer(repo, log=repo.parent / "server.log") as running:
        yield running


def infer(url, prompt, subject=None, seed=0, steps=3, guidance=4.0, **extra):
    """One pipeline request over HTTP: ``(image uint8 (H, W, 3), record)``."""
    import tritonclient.http as http

    client = http.InferenceServerClient(url)
    values = {"prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance, **extra}
    if subject is not None:
        values["subject"] = subject
    types = {str: ("BYTES", np.object_), bytes: ("BYTES", np.object_), int: ("INT64", np.int64),
             float: ("FP32", np.float32)}
    inputs = []
    for name, value in values.items():
        kind, dtype = ("INT32", np.int32) if name == "steps" else types[type(value)]
        tensor = http.InferInput(name, [1], kind)
        tensor.set_data_from_numpy(np.asarray([value.encode() if isinstance(value, str) else value], dtype=dtype))
        inputs.append(tensor)
    result = client.infer("pipeline", inputs)
    return result.as_numpy("image"), json.loads(result.as_numpy("record")[0])


@pytest.mark.slow  # a real tritonserver: about 40 s to start, shared by the module
def test_served_images_equal_generate_and_unet_calls_are_batched(server, deploy, tmp_path, psnr):
    from PIL import Image

    from qpdeploy.runtimes.config import GenerateConfig, RuntimeConfig
    from qpdeploy.runtimes.generate import generate

    source = deploy("sd1_subjects")
    jobs = [(f"a photo of {s} dog", s, seed) for seed in range(4) for s in ("sks", "zwx")]
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda job: infer(server.url, job[0], job[1], job[2]), jobs))
    for (prompt, subject, seed), (image, record) in zip(jobs, served):
        config = GenerateConfig(steps=3, guidance=4.0, seed=seed, subject=subject)
        local = generate(source, [prompt], config, RuntimeConfig(threads=1), out=tmp_path / f"{subject}{seed}.png")[0]
        assert psnr(image, np.asarray(Image.open(tmp_path / f"{subject}{seed}.png"))) >= 40
        assert record["subject"] == subject and record["pack_hash"] == local["pack_hash"]
        assert record["interval_per_step"] == local["interval_per_step"]
    stats = server.model_stats("unet")
    assert stats["execution_count"] < stats["requests"]  # requests were batched


@pytest.mark.slow  # a real tritonserver: about 40 s to start, shared by the module
def test_bad_requests_get_errors_and_the_server_keeps_serving(server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="no subject 'dog'.*subjects: sks, zwx"):
        infer(server.url, "a photo of a dog", subject="dog")
    with pytest.raises(InferenceServerException, match="steps must be in 1..1000"):
        infer(server.url, "a photo of sks dog", subject="sks", steps=0)
    with pytest.raises(InferenceServerException, match="prompt is not UTF-8"):
        infer(server.url, b"a photo of \xff dog")
    with pytest.raises(InferenceServerException, match="scheduler must be one of"):
        infer(server.url, "a photo of sks dog", subject="sks", scheduler="warp")
    image, record = infer(server.url, "a photo of sks dog", subject="sks", steps=2)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and record["subject"] == "sks"
    _, record = infer(server.url, "a photo of sks dog", subject="sks", steps=2, scheduler="euler")
    assert record["scheduler"] == "EulerDiscreteScheduler" and record["served_by"] == "triton"
    _, record = infer(server.url, "a photo of zwx dog", subject="sks", steps=2)  # served, with the warning
    assert record["warnings"] == ["prompt names subject 'zwx' but --subject is 'sks': one UNet call uses one "
                                  "subject's scales"]
    assert server.process.poll() is None  # still running


@pytest.mark.slow  # a real tritonserver: about 40 s to start, shared by the module
def test_sixty_four_requests_at_random_concurrency_lose_and_mix_nothing(server, psnr):
    import random
    import time

    combos = [("sks", 0), ("zwx", 0), ("sks", 1), (None, 2)]
    reference = {c: infer(server.url, f"a photo of {c[0] or 'a'} dog", c[0], c[1], steps=2)[0] for c in combos}
    rng = random.Random(0)
    order = [combos[rng.randrange(len(combos))] for _ in range(64)]

    def one(combo):
        time.sleep(rng.random() * 0.2)
        return infer(server.url, f"a photo of {combo[0] or 'a'} dog", combo[0], combo[1], steps=2)

    done = []
    start = 0
    while start < len(order):  # waves of 1 to 12 concurrent clients
        size = rng.randint(1, 12)
        with ThreadPoolExecutor(size) as pool:
            done += list(pool.map(one, order[start:start + size]))
        start += size
    assert len(done) == 64
    for combo, (image, record) in zip(order, done):
        assert (record["subject"], record["seed"]) == combo
        assert psnr(image, reference[combo]) >= 40  # its own image, not a neighbour's


# the multi-expert layout (one graph with an "expert" selector input, no subjects) exports a deploy
# dir of its own: in the full suite
@pytest.mark.parametrize("name", ["sd1_s2", pytest.param("sd1_multi", marks=pytest.mark.slow)])
def test_the_triton_command_writes_a_repository_and_refuses_bad_input(deploy, tmp_path, name):
    from typer.testing import CliRunner

    from qpdeploy.cli import app

    run = CliRunner().invoke
    source = deploy(name)
    result = run(app, ["triton", str(source), "--out", str(tmp_path / "repo"), "--instances", "2",
                       "--deploy-path", "/deploy", "--fold-weights", "--no-arena"])
    assert result.exit_code == 0 and "model repository" in result.output, result.output
    unet = (tmp_path / "repo" / "unet" / "config.pbtxt").read_text()
    assert 'string_value: "/deploy"' in unet and "max_batch_size: 4" in unet
    assert 'parameters { key: "fold_weights" value: { string_value: "true" } }' in unet
    assert 'parameters { key: "arena" value: { string_value: "false" } }' in unet
    assert "expert" not in unet  # the selector is the model's business, not the client's
    assert json.loads((tmp_path / "repo" / "qpdeploy-triton.json").read_text())["subjects"] == []
    result = run(app, ["triton", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "nowhere" in result.output and not (tmp_path / "r2").exists()
    result = run(app, ["triton", str(source), "--out", str(tmp_path / "r3"), "--instances", "0"])
    assert result.exit_code == 2 and "instances must be in 1..64" in result.output
    result = run(app, ["serve", str(source), "--repo", str(tmp_path / "repo")])
    assert result.exit_code == 2 and "already exists" in result.output  # never replaced without --force
    result = run(app, ["triton", str(source), "--out", str(tmp_path / "r4"), "--fold-weights", "--platform",
                       "onnxruntime"])
    assert result.exit_code == 2 and "fold weights applies to the python platform" in result.output
    assert not (tmp_path / "r4").exists()
    result = run(app, ["triton", str(source), "--out", str(tmp_path / "r5"), "--no-arena", "--platform",
                       "onnxruntime"])
    assert result.exit_code == 2 and "memory arena setting applies to the python platform" in result.output
    assert not (tmp_path / "r5").exists()


class _FakeBackend:
    """Enough of ``triton_python_backend_utils`` to run the pipeline model in this process,
    with each native model of the repository emulated by an ONNX Runtime session on the file
    the repository links (Triton's reshape of ``[1]`` to ``[]`` included)."""

    def __init__(self, repo):
        import types

        from qpdeploy.runtimes.runners import SessionFromOnnxPath

        self.repo, self.sessions, self.calls = repo, {}, []
        backend = self

        class Tensor:
            def __init__(self, name, array):
                self.name, self.array = name, np.asarray(array)

            def as_numpy(self):
                return self.array

        class InferenceResponse:
            def __init__(self, output_tensors, error=None):
                self.tensors, self._error = {t.name: t for t in output_tensors}, error

            def has_error(self):
                return self._error is not None

            def error(self):
                return self._error

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs):
                self.model, self.outputs, self.inputs = model_name, requested_output_names, inputs

            def exec(self):
                if self.model not in backend.sessions:
                    backend.sessions[self.model] = SessionFromOnnxPath(repo / self.model / "1" / "model.onnx")()
                session = backend.sessions[self.model]
                ranks = {i.name: len(i.shape) for i in session.get_inputs()}
                feed = {t.name: t.array.reshape(-1) if ranks[t.name] == 1 else t.array for t in self.inputs}
                backend.calls.append((self.model, {n: v.copy() for n, v in feed.items() if n in ("expert", "tuned")}))
                out = session.run(self.outputs, feed)
                return InferenceResponse([Tensor(n, v) for n, v in zip(self.outputs, out)])

        self.module = types.SimpleNamespace(
            Tensor=Tensor, InferenceResponse=InferenceResponse, InferenceRequest=InferenceRequest,
            TritonError=lambda message: types.SimpleNamespace(message=lambda: message),
            get_input_tensor_by_name=lambda request, name: request.get(name),
            get_output_tensor_by_name=lambda response, name: response.tensors[name])


@pytest.mark.parametrize("name, graphs", [("sd1_s2", ["unet_0", "unet_1", "unet_2", "unet_3"]),
                                          pytest.param("sd1_multi", ["unet"], marks=pytest.mark.slow)])
def test_native_platform_pipeline_picks_each_steps_graph_and_selector(deploy, tmp_path, monkeypatch, psnr, name, graphs):
    """The pipeline model of an ``onnxruntime``-platform repository, run here against emulated
    native models, draws generate's image and sends each step to its interval's graph."""
    import sys

    from PIL import Image

    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.runtimes.config import GenerateConfig, RuntimeConfig
    from qpdeploy.runtimes.generate import generate
    from qpdeploy.runtimes.triton import RepositoryConfig, write_repository
    from qpdeploy.runtimes.triton_models import PipelineModel

    source = deploy(name)
    modes = {p: p.stat().st_mode for p in source.rglob("*")}
    (source / "unet.weights").chmod(0o600)  # an unusual mode the repository's links must not change
    modes[source / "unet.weights"] = (source / "unet.weights").stat().st_mode
    repo = write_repository(source, tmp_path / "repo", RepositoryConfig(platform="onnxruntime"))
    assert {p: p.stat().st_mode for p in source.rglob("*")} == modes  # the deploy dir is an input: untouched
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted(["pipeline", "text_encoder", "vae_decoder",
                                                                             *graphs])
    for graph in graphs:
        config = (repo / graph / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in config and 'name: "timestep" data_type: TYPE_FP32 dims: [ 1 ] ' \
            'reshape: { shape: [ ] } }' in config
        assert (repo / graph / "1" / "model.onnx").resolve().parent == source.resolve()
    fake = _FakeBackend(repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake.module)
    model = PipelineModel()
    parameters = {"deploy_dir": str(source), "platform": "onnxruntime", "threads": "1"}  # as config.pbtxt says
    assert all(f'key: "{k}" value: {{ string_value: "{v}" }}' in (repo / "pipeline" / "config.pbtxt").read_text()
               for k, v in parameters.items() if k != "threads")
    model.initialize({"model_config": json.dumps({"parameters": {k: {"string_value": v}
                                                                 for k, v in parameters.items()}})})
    request = {"prompt": fake.module.Tensor("prompt", np.asarray([b"a photo of a dog"], dtype=object)),
               "seed": fake.module.Tensor("seed", np.asarray([5])), "steps": fake.module.Tensor("steps", np.asarray([8])),
               "guidance": fake.module.Tensor("guidance", np.asarray([4.0], dtype=np.float32))}
    response = model.execute([request])[0]
    assert not response.has_error()
    record = json.loads(response.tensors["record"].as_numpy()[0])
    generate(source, ["a photo of a dog"], GenerateConfig(steps=8, guidance=4.0, seed=5), RuntimeConfig(threads=1),
             out=tmp_path / "local.png")
    local = json.loads((tmp_path / "local.json").read_text())
    assert psnr(response.tensors["image"].as_numpy(), np.asarray(Image.open(tmp_path / "local.png"))) >= 40
    assert record["interval_per_step"] == local["interval_per_step"]
    unet_calls = [(m, sel) for m, sel in fake.calls if m not in ("text_encoder", "vae_decoder")]
    manifest = read_manifest(source)
    for (model_name, selector), k in zip(unet_calls, local["interval_per_step"]):
        assert model_name == graphs[manifest.dispatch.graph(k)]  # the step's interval's graph
        if manifest.dispatch.selector is not None:
            assert selector[manifest.dispatch.selector].tolist() == [manifest.dispatch.selector_values[k]] * 2


@pytest.mark.slow
def test_a_native_onnxruntime_repository_serves_on_tritonserver(deploy, tmp_path, psnr):
    """Runs where tritonserver has its ONNX Runtime backend (NVIDIA's container); the
    nvidia-pytriton wheel ships the Python backend only."""
    from qpdeploy.runtimes.triton import RepositoryConfig, TritonServer, tritonserver_files, write_repository

    pytest.importorskip("tritonclient.http")
    if not (tritonserver_files()[1].parent / "onnxruntime").is_dir():
        pytest.skip("tritonserver onnxruntime backend not installed")
    repo = write_repository(deploy("sd1_multi"), tmp_path / "repo", RepositoryConfig(platform="onnxruntime"))
    with TritonServer(repo) as server:
        first, record = infer(server.url, "a photo of a dog", seed=1)
        again, _ = infer(server.url, "a photo of a dog", seed=1)
    assert psnr(first, again) >= 40 and record["interval_per_step"]


def test_native_platforms_refuse_what_they_cannot_serve(deploy, tmp_path):
    from qpdeploy.runtimes.triton import RepositoryConfig, write_repository

    with pytest.raises(QPDeployError, match="no TensorRT engines"):
        write_repository(deploy("sd1_s2"), tmp_path / "r", RepositoryConfig(platform="tensorrt"))
    with pytest.raises(QPDeployError, match="platform must be one of python, onnxruntime, tensorrt"):
        RepositoryConfig(platform="tflite")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_unet_model_serves_a_mixed_batch_and_fails_only_the_bad_request(deploy, tmp_path, monkeypatch):
    """Three requests in one execution (as the dynamic batcher merges them): subjects sks and
    zwx at different steps, and one naming an unknown subject between them."""
    import sys

    import torch

    from qpdeploy.runtimes import EngineUNet
    from qpdeploy.runtimes.triton_models import UNetModel

    source = deploy("sd1_subjects")
    fake = _FakeBackend(tmp_path)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake.module)
    model = UNetModel()
    model.initialize({"model_config": json.dumps({"parameters": {"deploy_dir": {"string_value": str(source)},
                                                                 "threads": {"string_value": "1"},
                                                                 "fold_weights": {"string_value": "true"},
                                                                 "arena": {"string_value": "false"}}})})
    assert model.runtime.fold_weights and not model.runtime.arena  # compared below with the defaults
    gen = torch.Generator().manual_seed(0)
    jobs = [("sks", 100.0), ("dog", 500.0), ("zwx", 900.0)]
    requests = []
    for subject, t in jobs:
        request = {"sample": torch.randn(2, 4, 8, 8, generator=gen).numpy(), "timestep": np.full((2, 1), t, np.float32),
                   "encoder_hidden_states": torch.randn(2, 16, 32, generator=gen).numpy(),
                   "subject": np.asarray([[subject.encode()]] * 2, dtype=object)}
        requests.append({n: fake.module.Tensor(n, v) for n, v in request.items()})
    responses = model.execute(requests)
    assert responses[1].has_error() and "no subject 'dog'" in responses[1].error().message()
    for (subject, t), request, response in zip(jobs, requests, responses):
        if subject == "dog":
            continue
        alone = EngineUNet.from_deploy(source, subject=subject, threads=1)
        feed = {n: torch.from_numpy(request[n].as_numpy()) for n in ("sample", "encoder_hidden_states")}
        expected = alone(feed["sample"], torch.tensor([t, t]), feed["encoder_hidden_states"]).sample
        alone.close()
        got = torch.from_numpy(response.tensors["noise_pred"].as_numpy())
        assert torch.allclose(got, expected, atol=1e-5)
        assert response.tensors["interval"].as_numpy().reshape(-1).tolist() == [int(t) // 250] * 2
    model.finalize()


def test_served_models_refuse_an_altered_deploy_dir(deploy, tmp_path, monkeypatch):
    import shutil
    import sys

    from qpdeploy.runtimes.triton_models import PipelineModel

    source = tmp_path / "deploy"
    shutil.copytree(deploy("sd1_s2"), source)
    config = source / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "padding_side": "left"}', 1))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _FakeBackend(tmp_path).module)
    with pytest.raises(QPDeployError, match="tokenizer_config.json has [0-9]+ bytes, manifest.json says"):
        PipelineModel().initialize({"model_config": json.dumps(
            {"parameters": {"deploy_dir": {"string_value": str(source)}}})})
