"""``qpdeploy export``: the deploy dir (manifest round trip, report, the float parts, shared
weights) and bad inputs (another base's pack, existing output, failures, no TensorRT)."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from qpdeploy.calibrate import sqnr_db
from qpdeploy.cli import app
from qpdeploy.errors import QPDeployError
from qpdeploy.exporters import export as export_module
from qpdeploy.exporters.config import ExportConfig
from qpdeploy.exporters.engines import tensorrt_available
from qpdeploy.exporters.export import export_deploy
from qpdeploy.exporters.manifest import DEPLOY_FORMAT_VERSION, MANIFEST_FILE, read_manifest
from qpdeploy.exporters.parts import export_parts
from qpdeploy.exporters.verify import check_graph, ort_session
from qpdeploy.intervals import Intervals
from qpdeploy.io import read_json, write_json

REPORT_KEYS = {"layout", "graphs", "qdq_layers", "min_sqnr_db_vs_torch", "deploy_bytes", "deploy_bytes_if_unshared",
               "seconds"}


def invoke(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def test_report_has_the_issue_keys_and_shared_weights_beat_independent_graphs(deploy_dir, export_base,
                                                                              deploy_base_changes):
    report = read_json(deploy_dir / "report.json")
    assert REPORT_KEYS <= set(report)
    assert report["layout"] == "per-interval" and report["graphs"] == 4
    assert report["qdq_layers"] == len(export_base("sd1", **deploy_base_changes).meta["layers"])
    assert report["min_sqnr_db_vs_torch"] >= 15 and len(report["sqnr_db_per_interval"]) == 4
    weights = (deploy_dir / "unet.weights").stat().st_size
    total = sum(p.stat().st_size for p in deploy_dir.rglob("*") if p.is_file() and p.name != "report.json")
    assert report["deploy_bytes"] == total
    # K independent graphs would each carry the weights: three more copies than shared
    assert report["deploy_bytes_if_unshared"] == report["deploy_bytes"] + 3 * weights


def test_manifest_round_trip_and_interval_dispatch(deploy_dir, base_dir, pack_dir):
    manifest = read_manifest(deploy_dir, verify_hashes=True)
    data = manifest.data
    assert data["format_version"] == DEPLOY_FORMAT_VERSION
    assert data["base_hash"] == read_json(base_dir / "quant_config.json")["base_hash"]
    assert data["pack_hash"] and data["strategy"] == "s2"
    assert manifest.intervals == Intervals.uniform(4)
    assert data["export"] == ExportConfig().to_json()
    assert ExportConfig.from_json(data["export"]) == ExportConfig()
    unet = manifest.unet
    assert unet["graph_of_interval"] == [0, 1, 2, 3] and unet["selector"] is None
    assert (unet["weight_bits"], unet["act_bits"], unet["act_scales"]) == (4, 8, "per-interval")
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet["inputs"][0] == {"name": "sample", "dtype": "float32", "shape": ["batch", 4, 8, 8]}
    assert unet["outputs"] == [{"name": "noise_pred", "dtype": "float32", "shape": ["batch", 4, 8, 8]}]
    for t, k in [(0, 0), (249, 0), (250, 1), (999, 3), (999.5, 3)]:
        interval = manifest.intervals.index(t)
        graph = unet["graphs"][manifest.dispatch.graph(interval)]
        assert interval == k and graph["intervals"] == [k] and manifest.dispatch.selector_feed([k]) == {}
    for graph in unet["graphs"]:  # the graph files say which intervals they serve
        props = {p.key: p.value for p in onnx.load(str(deploy_dir / graph["onnx"]), load_external_data=False).metadata_props}
        assert props["qpdeploy.intervals"] == ",".join(map(str, graph["intervals"]))
    assert set(data["files"]) >= {"unet_0.onnx", "unet.weights", "text_encoder.onnx", "vae_decoder.onnx",
                                  "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"}
    assert data["engines"] is None and all(g["engine"] is None for g in unet["graphs"])
    # written once, read back identical
    assert json.loads((deploy_dir / MANIFEST_FILE).read_text()) == data


def test_manifest_errors_name_the_file(deploy_dir, tmp_path):
    copy = tmp_path / "deploy"
    shutil.copytree(deploy_dir, copy)
    (copy / "unet_2.onnx").write_bytes(b"x" + (copy / "unet_2.onnx").read_bytes()[1:])
    with pytest.raises(QPDeployError, match="unet_2.onnx does not match its hash"):
        read_manifest(copy, verify_hashes=True)
    read_manifest(copy)  # sizes still agree: only the hash check notices
    (copy / "unet.weights").unlink()
    with pytest.raises(QPDeployError, match="missing unet.weights"):
        read_manifest(copy)
    data = read_json(copy / MANIFEST_FILE)
    write_json(copy / MANIFEST_FILE, {**data, "format_version": DEPLOY_FORMAT_VERSION + 1})
    with pytest.raises(QPDeployError, match="newer than this qpdeploy supports"):
        read_manifest(copy)


def test_float_parts_match_torch(deploy_dir, export_pipe):
    pipe = export_pipe("sd1")
    manifest = read_manifest(deploy_dir)
    (encoder,) = manifest.data["text_encoders"]
    assert [o["name"] for o in encoder["outputs"]] == ["last_hidden_state", "pooler_output", "penultimate_hidden_state"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(deploy_dir / encoder["tokenizer"]))
    ids = tokenizer(["a photo of sks dog"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="np").input_ids
    assert ids.tolist() == pipe.tokenizer(["a photo of sks dog"], padding="max_length",
                                          max_length=tokenizer.model_max_length, return_tensors="np").input_ids.tolist()
    hidden = ort_session(deploy_dir / encoder["onnx"]).run(None, {"input_ids": ids.astype(np.int32)})[0]
    with torch.no_grad():
        ref = pipe.text_encoder(torch.from_numpy(ids))[0]
    assert sqnr_db(ref, torch.from_numpy(hidden)) > 80
    vae = manifest.data["vae_decoder"]
    assert vae["scaling_factor"] == pipe.vae.config.scaling_factor
    latent = torch.randn(1, 4, 8, 8)
    image = ort_session(deploy_dir / vae["onnx"]).run(None, {"latent": latent.numpy()})[0]
    with torch.no_grad():
        ref = pipe.vae.decode(latent).sample
    assert image.shape == (1, 3, 16, 16) and sqnr_db(ref, torch.from_numpy(image)) > 80
    from diffusers import DDIMScheduler

    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(DDIMScheduler.from_pretrained(str(deploy_dir / "scheduler")).config) == public(pipe.scheduler.config)


def test_sdxl_parts_export_both_text_encoders(export_pipe, tmp_path):
    pipe = export_pipe("sdxl")
    parts = {p.name: p for p in export_parts(pipe, tmp_path, (8, 8), 18)}
    assert set(parts) == {"text_encoder", "text_encoder_2", "vae_decoder"}
    assert [o.name for o in parts["text_encoder_2"].outputs][1] == "text_embeds"
    assert (tmp_path / "tokenizer_2" / "tokenizer.json").is_file()
    ids = torch.randint(0, 40, (2, pipe.tokenizer.model_max_length))
    for name, encoder in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
        check_graph(tmp_path / f"{name}.onnx")
        outs = ort_session(tmp_path / f"{name}.onnx").run(None, {"input_ids": ids.numpy().astype(np.int32)})
        with torch.no_grad():
            ref = encoder(ids, output_hidden_states=True)
        pooled = ref.text_embeds if name == "text_encoder_2" else ref.pooler_output
        for got, want in zip(outs, (ref.last_hidden_state, pooled, ref.hidden_states[-2])):
            assert sqnr_db(want, torch.from_numpy(got)) > 80


def test_pack_of_another_base_is_refused(base_dir, packed_base, tmp_path):
    from qpdeploy.pack import save_pack

    _, pack = packed_base("sd2", "s2")
    other = save_pack(tmp_path / "sd2-pack", pack)
    result = invoke("--base", base_dir, "--pack", other, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "scale pack belongs to base" in result.output
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_force(base_dir, tmp_path):
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("--base", base_dir, "--out", out)
    assert result.exit_code == 2 and "already exists (use --force" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_a_failure_leaves_nothing(packed_base, export_pipe, tmp_path, monkeypatch):
    base, pack = packed_base("sd1", "s2")

    def write_then_fail(base, layout, out_dir, *args, **kwargs):
        (out_dir / "unet_0.onnx").write_bytes(b"partial")
        raise QPDeployError("simulated failure after a graph was written")

    monkeypatch.setattr(export_module, "export_unet", write_then_fail)
    with pytest.raises(QPDeployError, match="simulated failure"):
        export_deploy(base, export_pipe("sd1"), tmp_path / "deploy", ExportConfig(), pack)
    assert list(tmp_path.iterdir()) == []  # no deploy dir and no temporary directory left


def test_layout_that_does_not_fit_the_pack_fails_before_exporting(packed_base, export_pipe, tmp_path):
    base, pack = packed_base("sd1", "s2")
    with pytest.raises(QPDeployError, match="masked layout"):
        export_deploy(base, export_pipe("sd1"), tmp_path / "deploy", ExportConfig(layout="masked"), pack)
    assert list(tmp_path.iterdir()) == []


def test_bad_sizes_and_settings_are_refused(packed_base, export_pipe, tmp_path):
    base, pack = packed_base("sd1", "s2")
    with pytest.raises(QPDeployError, match="height must be a multiple of 4 between 4 and 64 .* got 18"):
        export_deploy(base, export_pipe("sd1"), tmp_path / "deploy", ExportConfig(height=18), pack)
    with pytest.raises(QPDeployError, match="width must be a multiple of 4 between 4 and 64 .* got 100000"):
        export_deploy(base, export_pipe("sd1"), tmp_path / "deploy", ExportConfig(width=100_000), pack)
    for bad in (dict(layout="per-step"), dict(batch=0), dict(opset=12)):
        with pytest.raises(QPDeployError):
            ExportConfig(**bad)
    result = invoke("--base", tmp_path / "missing", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "quantized base not found" in result.output


@pytest.mark.skipif(tensorrt_available(), reason="tensorrt is installed")
def test_build_engines_without_tensorrt_fails_at_once(base_dir, tmp_path):
    result = invoke("--base", base_dir, "--out", tmp_path / "out", "--build-engines")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'tensorrt'" in lines[0] and "qpdeploy[trt]" in lines[0]
    assert not (tmp_path / "out").exists()


def test_summary_prints_with_and_without_verification(deploy_dir, capsys):
    from qpdeploy.exporters.export import print_export_summary

    report = read_json(deploy_dir / "report.json")
    print_export_summary(report)
    assert "per-interval / 4" in capsys.readouterr().out
    print_export_summary({**report, "min_sqnr_db_vs_torch": None, "sqnr_db_per_interval": None})
    out = capsys.readouterr().out
    assert "SQNR" not in out and "independent graphs" in out


@pytest.mark.slow
@pytest.mark.parametrize("per_interval", [False, True])
def test_a_pack_exported_at_a_strength_is_that_pack_on_onnx_runtime_and_in_the_torch_reference(
        base_dir, pack_dir, tmp_path, per_interval):
    from qpdeploy.base import load_base
    from qpdeploy.layers import quant_layers
    from qpdeploy.pack import at_strength, load_pack, pack_hash, post_training_scales
    from qpdeploy.runtimes.runners import load_reference_unet

    k = load_pack(pack_dir).intervals.k
    strength = tuple(1.0 if i % 2 else 0.5 for i in range(k)) if per_interval else 0.5  # 0.5/1/0.5/...
    text = "/".join(f"{v:g}" for v in strength) if per_interval else "0.5"
    out = tmp_path / "half"
    result = invoke("--base", base_dir, "--pack", pack_dir, "--out", out, "--pack-strength", text)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out, verify_hashes=True)
    half = at_strength(load_pack(pack_dir), post_training_scales(load_base(base_dir)), strength)
    assert manifest.pack_strength == strength
    assert manifest.data["export"]["pack_strength"] == (list(strength) if per_interval else 0.5)
    assert manifest.hashes[1] == pack_hash(half) != pack_hash(load_pack(pack_dir))
    report = read_json(out / "report.json")
    assert report["min_sqnr_db_vs_torch"] >= 15  # every interval's graph matches torch at that strength
    unet = load_reference_unet(manifest, base_dir, pack_dir)  # the trained pack, as exported
    for name, layer in quant_layers(unet):
        assert torch.equal(layer.s_out, half.scales[f"{name}.s_out"])
    if per_interval:  # the trained sets of the intervals at strength 1 are exported as trained
        trained = load_pack(pack_dir).scales
        assert all(torch.equal(half.scales[key][1], trained[key][1]) for key in trained)
        return
    bad = invoke("--base", base_dir, "--pack", pack_dir, "--out", tmp_path / "bad", "--pack-strength", 3)
    assert bad.exit_code == 2 and bad.output.strip() == "error: pack strength must be a number between 0 and 2, got 3.0"
    assert not (tmp_path / "bad").exists()


def test_a_pack_strength_per_interval_of_the_wrong_length_is_one_line(base_dir, pack_dir, tmp_path):
    from qpdeploy.pack import load_pack

    k = load_pack(pack_dir).intervals.k
    values = "/".join(["1"] * (k + 1))
    result = invoke("--base", base_dir, "--pack", pack_dir, "--out", tmp_path / "out", "--pack-strength", values)
    assert result.exit_code == 2 and result.output.strip().startswith(
        f"error: pack strength gives {k + 1} values; the pack has {k} intervals")
    bad = invoke("--base", base_dir, "--pack", pack_dir, "--out", tmp_path / "out", "--pack-strength", "1/x")
    assert bad.exit_code == 2
    assert bad.output.strip() == "error: pack strength must be a number between 0 and 2, got '1/x'"
    assert not (tmp_path / "out").exists()


def test_a_pack_strength_without_a_pack_is_refused(base_dir, tmp_path):
    result = invoke("--base", base_dir, "--out", tmp_path / "out", "--pack-strength", 0.5)
    assert result.exit_code == 2 and "--pack-strength needs --pack" in result.output
    assert not (tmp_path / "out").exists()


def test_a_manifest_with_a_bad_pack_strength_names_the_file(deploy_dir, tmp_path):
    copy = tmp_path / "deploy"
    shutil.copytree(deploy_dir, copy)
    data = read_json(copy / MANIFEST_FILE)
    data["export"]["pack_strength"] = "half"
    write_json(copy / MANIFEST_FILE, data)
    with pytest.raises(QPDeployError, match=r"manifest.json: export.pack_strength: pack strength must be a number"):
        read_manifest(copy).pack_strength
