"""TensorRT engines through Polygraphy. These tests need TensorRT and a GPU; they skip with
"tensorrt not installed" elsewhere and run unchanged where it is."""

import pytest
import torch

from qpdeploy.calibrate import sqnr_db
from qpdeploy.exporters.config import ExportConfig
from qpdeploy.exporters.engines import TIMING_CACHE, tensorrt_available
from qpdeploy.exporters.export import export_deploy
from qpdeploy.exporters.manifest import read_manifest
from qpdeploy.exporters.unet import example_inputs, unet_io

pytestmark = [pytest.mark.trt, pytest.mark.skipif(not tensorrt_available(), reason="tensorrt not installed")]


@pytest.mark.parametrize("layout", ["per-interval", "multi-expert"])
def test_engines_are_built_recorded_and_match_torch(packed_base, export_pipe, tmp_path, layout):
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    base, pack = packed_base("sd1", "s2")
    path, report = export_deploy(base, export_pipe("sd1"), tmp_path / "deploy",
                                 ExportConfig(layout=layout, build_engines=True), pack)
    manifest = read_manifest(path, verify_hashes=True)
    engines = manifest.data["engines"]
    assert report["engines_built"] and engines["tensorrt_version"] and engines["timing_cache"] == TIMING_CACHE
    assert (path / TIMING_CACHE).is_file()
    graphs = manifest.unet["graphs"]
    assert all((path / g["engine"]).is_file() for g in graphs)
    assert all((path / p["engine"]).is_file() for p in manifest.data["text_encoders"] + [manifest.data["vae_decoder"]])
    specs = unet_io(base.unet, _plan(base, layout), (8, 8), 16)[0]
    for k in range(base.intervals.k):
        lo, hi = base.intervals.bounds(k)
        graph = graphs[manifest.dispatch.graph(k)]
        extra = manifest.dispatch.selector_feed([k])
        feed = example_inputs(specs, 2, seed=k, timestep=(lo + hi) / 2,
                              selector_value=int(next(iter(extra.values()), [0])[0]))
        with TrtRunner(EngineFromPath(str(path / graph["engine"]))) as runner:
            out = runner.infer({name: value.numpy() for name, value in feed.items()})["noise_pred"]
        with torch.no_grad():
            ref = base.unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"]).sample
        # INT8 kernels with FP16 elsewhere: looser than ONNX Runtime's float emulation
        assert sqnr_db(ref, torch.as_tensor(out).cpu()) > 15


def _plan(base, layout):
    from qpdeploy.exporters.unet import plan_unet

    return plan_unet(base, layout)


def test_a_multi_subject_engine_takes_added_subjects_without_a_rebuild(export_base, export_pipe, tmp_path):
    import copy
    import dataclasses

    from qpdeploy.exporters.export import export_subjects
    from qpdeploy.exporters.subjects import add_subject
    from qpdeploy.io import file_sha256
    from qpdeploy.pack import apply_pack, save_pack
    from qpdeploy.runtimes import EngineUNet

    from .conftest import perturbed_pack

    base = copy.deepcopy(export_base("sd1"))
    packs = [dataclasses.replace(perturbed_pack(base, "s2", seed=i), meta={"identifier": name})
             for i, name in enumerate(("sks", "zwx"))]
    path, _ = export_subjects(base, export_pipe("sd1"), tmp_path / "deploy",
                              ExportConfig(build_engines=True, max_subjects=4), [(packs[0], "sks")])
    engine = path / read_manifest(path).unet["graphs"][0]["engine"]
    before = file_sha256(engine)
    add_subject(path, save_pack(tmp_path / "zwx", packs[1]))
    assert file_sha256(engine) == before
    specs = read_manifest(path).unet_inputs
    feed = {s["name"]: torch.randn([2 if d == "batch" else d for d in s["shape"]]) for s in specs
            if s["dtype"] == "float32"}
    feed["timestep"] = torch.tensor([700.0, 700.0])
    with EngineUNet.from_deploy(path, backend="trt", subject="zwx") as unet:
        got = unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"]).sample.cpu()
    apply_pack(base, packs[1])
    with torch.no_grad():
        ref = base.unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"]).sample
    assert sqnr_db(ref, got) > 15
