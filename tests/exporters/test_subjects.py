"""Many subjects in one INT8 UNet graph: export, per-subject and mixed-subject generation calls,
adding and removing subjects without touching the graph or its weights, and refusals."""

import copy
import dataclasses
import hashlib
import json

import pytest
import torch

from qpdeploy.calibrate import sqnr_db
from qpdeploy.errors import QPDeployError

from ..conftest import save_bundled_base
from .conftest import perturbed_pack

pytestmark = pytest.mark.slow  # exports several deploy dirs (about 30 s); the full suite runs them
SUBJECTS = (("sks", "s2", True, 0), ("zwx", "s1", False, 1), ("qlv", "baseline", False, 2))


@pytest.fixture(scope="module")
def subject_setup(export_base, export_pipe):
    """A private base (global activation scales) and three packs with identifiers, of three
    strategies, with and without input scales."""
    base = copy.deepcopy(export_base("sd1"))
    packs = {}
    for identifier, strategy, input_scales, seed in SUBJECTS:
        pack = perturbed_pack(base, strategy, input_scales=input_scales, seed=seed)
        packs[identifier] = dataclasses.replace(
            pack, meta={"identifier": identifier, "prompt": f"a photo of {identifier} dog"})
    return base, packs, export_pipe("sd1")


def export(setup, out, identifiers, **config):
    from qpdeploy.exporters.config import ExportConfig
    from qpdeploy.exporters.export import export_subjects

    base, packs, pipe = setup
    chosen = [(packs[i], f"packs/{i}") for i in identifiers]
    return export_subjects(base, pipe, out, ExportConfig(**config), chosen)


def torch_reference(setup, identifier, feed):
    from qpdeploy.exporters.unet import call_unet
    from qpdeploy.pack import apply_pack, reset_to_post_training

    base, packs, _ = setup
    if identifier is None:
        reset_to_post_training(base)
    else:
        apply_pack(base, packs[identifier])
    with torch.no_grad():
        return call_unet(base.unet.eval(), feed)


def feed_for(deploy, timesteps, seed=0):
    from qpdeploy.exporters.manifest import read_manifest

    specs = read_manifest(deploy).unet_inputs
    gen = torch.Generator().manual_seed(seed)
    n = len(timesteps)
    shape = lambda spec: tuple(n if d == "batch" else d for d in spec["shape"])  # noqa: E731
    feed = {s["name"]: torch.randn(shape(s), generator=gen) for s in specs if s["dtype"] == "float32"}
    feed["timestep"] = torch.tensor(timesteps, dtype=torch.float32)
    return feed


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def deploy(subject_setup, tmp_path_factory):
    path, report = export(subject_setup, tmp_path_factory.mktemp("subjects") / "deploy", ["sks", "zwx", "qlv"])
    return path, report


def test_one_graph_serves_every_subject_as_its_own_pack(subject_setup, deploy):
    from qpdeploy.runtimes import EngineUNet

    path, report = deploy
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["unet"]["layout"] == "multi-subject" and len(manifest["unet"]["graphs"]) == 1
    assert [s["identifier"] for s in manifest["subjects"]] == ["sks", "zwx", "qlv"]
    # rows: 0 post-training, sks (S2, 4 sets) 1-4, zwx (S1, 1 set) 5, qlv (baseline) 6
    rows = {s["identifier"]: s["rows_of_interval"] for s in manifest["subjects"]}
    assert rows == {"sks": [1, 2, 3, 4], "zwx": [0, 5, 5, 0], "qlv": [6, 6, 6, 6]}
    assert manifest["unet"]["tables"]["rows"] == 7 and manifest["unet"]["tables"]["input_scales"]
    # export verification ran every subject and the post-training row in every interval
    assert set(report["sqnr_db_per_subject"]) == {"", "sks", "zwx", "qlv"}
    assert min(min(v) for v in report["sqnr_db_per_subject"].values()) >= 15.0
    timesteps = [900.0, 650.0, 400.0, 100.0]  # one per interval
    feed = feed_for(path, timesteps)
    for identifier in (None, "sks", "zwx", "qlv"):
        with EngineUNet.from_deploy(path, subject=identifier) as unet:
            got = unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"]).sample
            assert unet.summary()["engine_per_step"] == ["unet"]
        expected = torch_reference(subject_setup, identifier, feed)
        assert sqnr_db(expected, got) > 25.0, identifier
    # the subjects really differ: sks's output is not zwx's
    with EngineUNet.from_deploy(path, subject="sks") as a, EngineUNet.from_deploy(path, subject="zwx") as b:
        x, y = (u(feed["sample"], feed["timestep"], feed["encoder_hidden_states"]).sample for u in (a, b))
    assert sqnr_db(x, y) < 20.0


def test_a_batch_mixing_subjects_and_steps_equals_each_sample_alone(deploy):
    """Each row of a mixed batch is bit-identical to the same sample in a batch of the same
    size (so nothing leaks between rows, and each row gets its subject's and interval's
    scales), and close to the sample run alone: ONNX Runtime's float Conv differs with the
    batch size (about 4e-7 at the first convolution of this graph), which activation
    rounding can amplify (one case measured at 38 dB); images are compared at 60 dB in
    tests/runtimes/test_batcher.py."""
    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.runtimes import EngineUNet

    path, _ = deploy
    manifest = read_manifest(path)
    timesteps = [900.0, 650.0, 400.0, 100.0, 650.0]
    subjects = ["sks", "zwx", "qlv", "sks", None]
    feed = feed_for(path, timesteps, seed=3)
    k = [manifest.intervals.index(t) for t in timesteps]
    selector = [0 if s is None else manifest.subject_dispatch(s).selector_values[i] for s, i in zip(subjects, k)]
    n = len(subjects)
    with EngineUNet.from_deploy(path) as unet:
        mixed = unet.engines(dict(feed), feed["timestep"], selector=selector)
        assert len(unet.history) == 1  # one UNet call for the whole mixed batch
        for i in range(n):
            same = unet.engines({name: torch.cat([v[i:i + 1]] * n) for name, v in feed.items()},
                                torch.cat([feed["timestep"][i:i + 1]] * n), selector=[selector[i]] * n)
            assert torch.equal(mixed[i], same[0]), (i, subjects[i])
    for i, subject in enumerate(subjects):
        with EngineUNet.from_deploy(path, subject=subject) as unet:
            alone = unet(feed["sample"][i:i + 1], feed["timestep"][i:i + 1],
                         feed["encoder_hidden_states"][i:i + 1]).sample
        assert sqnr_db(alone, mixed[i:i + 1]) >= 30.0, (i, subject)


def test_add_and_remove_subjects_touch_only_the_tables_and_the_manifest(subject_setup, tmp_path):
    from qpdeploy.exporters.subjects import add_subject, remove_subject
    from qpdeploy.pack import save_pack
    from qpdeploy.runtimes import EngineUNet

    base, packs, _ = subject_setup
    path, _ = export(subject_setup, tmp_path / "deploy", ["sks", "zwx"], verify=False)
    untouched = {name: sha(path / name) for name in ("unet.onnx", "unet.weights")}
    tables_before = json.loads((path / "manifest.json").read_text())["unet"]["tables"]["file"]
    qlv = save_pack(tmp_path / "qlv", packs["qlv"])
    record = add_subject(path, qlv)
    assert record["identifier"] == "qlv" and record["rows_of_interval"] == [6, 6, 6, 6]
    assert {name: sha(path / name) for name in untouched} == untouched
    # what was added generates as a deploy dir exported with all three
    full, _ = export(subject_setup, tmp_path / "full", ["sks", "zwx", "qlv"], verify=False)
    feed = feed_for(path, [900.0, 100.0])
    outputs = []
    for where in (path, full):
        with EngineUNet.from_deploy(where, subject="qlv", verify_hashes=True) as unet:
            outputs.append(unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"]).sample)
    assert torch.equal(outputs[0], outputs[1])
    assert sqnr_db(torch_reference(subject_setup, "qlv", feed), outputs[0]) > 25.0
    # the same identifier again is refused without --force
    with pytest.raises(QPDeployError, match="subject 'qlv' is already in this deploy dir"):
        add_subject(path, qlv)
    # removing it gives back the two-subject tables, bit for bit, under the graph untouched
    remove_subject(path, "qlv")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["unet"]["tables"]["file"] == tables_before and (path / tables_before).is_file()
    assert [s["identifier"] for s in manifest["subjects"]] == ["sks", "zwx"]
    assert json.loads((path / "report.json").read_text())["subjects"] == ["sks", "zwx"]
    assert {name: sha(path / name) for name in untouched} == untouched
    assert sorted(p.name for p in path.glob("subjects-*")) == [tables_before]  # the old file went


def test_refusals_name_the_problem(subject_setup, tmp_path, export_base):
    from qpdeploy.exporters.subjects import add_subject
    from qpdeploy.pack import save_pack
    from qpdeploy.runtimes import EngineUNet

    base, packs, _ = subject_setup
    path, _ = export(subject_setup, tmp_path / "deploy", ["sks"], verify=False)
    with pytest.raises(QPDeployError, match=r"no subject 'dog' in deploy dir .* \(subjects: sks\)"):
        EngineUNet.from_deploy(path, subject="dog")
    other_base = copy.deepcopy(export_base("sd1", weight_bits=4))
    foreign = dataclasses.replace(perturbed_pack(other_base, "s2"), meta={"identifier": "pkd"})
    with pytest.raises(QPDeployError, match="belongs to base .* not to this deploy dir's base"):
        add_subject(path, save_pack(tmp_path / "foreign", foreign))
    nameless = dataclasses.replace(packs["zwx"], meta={})
    with pytest.raises(QPDeployError, match="records no identifier word"):
        add_subject(path, save_pack(tmp_path / "nameless", nameless))
    with pytest.raises(QPDeployError, match="scale pack packs/sks.* records|is already"):
        export(subject_setup, tmp_path / "twice", ["sks", "sks"], verify=False)
    with pytest.raises(QPDeployError, match="torch backend runs one base"):
        EngineUNet.from_deploy(path, backend="torch", base=tmp_path)


@pytest.fixture(scope="module")
def subject_dirs(subject_setup, tmp_path_factory):
    """The setup's base and packs as directories (the base's source: the bundled tiny-sd1)."""
    from qpdeploy.pack import save_pack

    base, packs, _ = subject_setup
    root = tmp_path_factory.mktemp("subject-dirs")
    save_bundled_base(base, root / "base")
    return root / "base", {i: save_pack(root / i, p) for i, p in packs.items()}


def test_the_command_line_flow(subject_dirs, tmp_path):
    from typer.testing import CliRunner

    from qpdeploy.cli import app

    base, packs = subject_dirs
    deploy = tmp_path / "deploy"
    run = CliRunner().invoke
    result = run(app, ["export", "--base", str(base), "--pack", str(packs["sks"]), "--pack", str(packs["zwx"]),
                       "--out", str(deploy), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert json.loads((deploy / "manifest.json").read_text())["unet"]["layout"] == "multi-subject"
    result = run(app, ["generate", str(deploy), "--subject", "zwx", "--prompt", "a photo of zwx dog", "--steps", "3",
                       "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["subject"] == "zwx" and record["layout"] == "multi-subject"
    assert record["pack_hash"] == json.loads((deploy / "manifest.json").read_text())["subjects"][1]["pack_hash"]
    result = run(app, ["generate", str(deploy), "--subject", "dog", "--prompt", "a dog", "--out", str(tmp_path / "b.png")])
    assert result.exit_code == 2 and "no subject 'dog'" in result.output and not (tmp_path / "b.png").exists()
    result = run(app, ["generate", str(deploy), "--subject", "sks", "--prompt", "a photo of zwx dog", "--steps", "2",
                       "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0 and "prompt names subject 'zwx' but --subject is 'sks'" in result.output
    result = run(app, ["add-subject", str(deploy), "--pack", str(packs["qlv"])])
    assert result.exit_code == 0 and "added subject qlv" in result.output, result.output
    result = run(app, ["remove-subject", str(deploy), "--subject", "sks"])
    assert result.exit_code == 0, result.output
    subjects = json.loads((deploy / "manifest.json").read_text())["subjects"]
    assert [(s["identifier"], s["first_row"]) for s in subjects] == [("zwx", 1), ("qlv", 2)]
    result = run(app, ["generate", str(deploy), "--subject", "qlv", "--prompt", "a qlv dog", "--steps", "2",
                       "--out", str(tmp_path / "d.png")])
    assert result.exit_code == 0, result.output


def psnr(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def test_the_step_batcher_mixes_subjects_and_steps_in_one_call_per_tick(deploy):
    from qpdeploy.exporters.manifest import read_manifest
    from qpdeploy.runtimes.batcher import Request, StepBatcher
    from qpdeploy.runtimes.config import RuntimeConfig
    from qpdeploy.runtimes.pipeline import close_pipeline, load_deploy_pipeline

    path, _ = deploy
    manifest = read_manifest(path)
    requests = [Request("a photo of sks dog", "sks", seed=1, steps=4, guidance=4.0),
                Request("a photo of zwx dog", "zwx", seed=2, steps=3, guidance=4.0),
                Request("a photo of qlv dog", "qlv", seed=3, steps=4, guidance=1.0),  # no guidance: one sample
                Request("a photo of a dog", None, seed=4, steps=2, guidance=6.0)]
    pipe = load_deploy_pipeline(manifest, RuntimeConfig())
    try:
        batcher = StepBatcher(pipe)
        first = [batcher.submit(r) for r in requests[:2]]
        done = dict(batcher.tick())  # two requests at step 0
        later = [batcher.submit(r) for r in requests[2:]]  # these join while the first two are at step 1
        while batcher.waiting or batcher.active:
            done.update(batcher.tick())
        assert batcher.calls == 5  # 13 request-steps in 5 UNet calls
        assert batcher.samples == 2 * 4 + 2 * 3 + 1 * 4 + 2 * 2
    finally:
        close_pipeline(pipe)
    h, w = manifest.size
    for ticket, request in zip(first + later, requests):
        alone = load_deploy_pipeline(manifest, RuntimeConfig(), subject=request.subject)
        try:
            image = alone(prompt=request.prompt, num_inference_steps=request.steps, guidance_scale=request.guidance,
                          height=h, width=w, generator=torch.Generator("cpu").manual_seed(request.seed)).images[0]
        finally:
            close_pipeline(alone)
        assert psnr(image, done[ticket]) >= 60.0, request


def test_every_subject_of_a_deploy_dir_has_its_strength_including_one_added_later(subject_setup, tmp_path):
    from qpdeploy.exporters.subjects import add_subject
    from qpdeploy.pack import apply_pack, at_strength, pack_hash, post_training_scales, save_pack
    from qpdeploy.exporters.unet import call_unet
    from qpdeploy.runtimes import EngineUNet

    base, packs, _ = subject_setup
    path, _ = export(subject_setup, tmp_path / "deploy", ["sks"], verify=False, pack_strength=0.5)
    add_subject(path, save_pack(tmp_path / "qlv", packs["qlv"]))
    manifest = json.loads((path / "manifest.json").read_text())
    half = {i: at_strength(packs[i], post_training_scales(base), 0.5) for i in ("sks", "qlv")}
    assert {s["identifier"]: s["pack_hash"] for s in manifest["subjects"]} == {i: pack_hash(p) for i, p in half.items()}
    feed = feed_for(path, [900.0, 100.0])
    for identifier, pack in half.items():
        with EngineUNet.from_deploy(path, subject=identifier) as unet:
            got = unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"]).sample
        apply_pack(base, pack)
        with torch.no_grad():
            expected = call_unet(base.unet.eval(), feed)
        assert sqnr_db(expected, got) > 25.0, identifier
        assert sqnr_db(torch_reference(subject_setup, identifier, feed), got) < 25.0  # not the full pack


def test_a_strength_per_interval_is_the_subjects_and_a_pack_with_a_shared_set_cannot_join(subject_setup, tmp_path):
    from qpdeploy.exporters.subjects import add_subject
    from qpdeploy.pack import at_strength, pack_hash, post_training_scales, save_pack

    base, packs, _ = subject_setup
    strength = (1.0,) * (base.intervals.k - 1) + (0.5,)  # half of the pack in the highest-noise interval only
    path, _ = export(subject_setup, tmp_path / "deploy", ["sks"], verify=False, pack_strength=strength)
    manifest = json.loads((path / "manifest.json").read_text())
    expected = pack_hash(at_strength(packs["sks"], post_training_scales(base), strength))
    assert manifest["subjects"][0]["pack_hash"] == expected and manifest["export"]["pack_strength"] == list(strength)
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(QPDeployError, match="differs between intervals that share one scale set"):
        add_subject(path, save_pack(tmp_path / "qlv", packs["qlv"]))  # baseline: one set for every interval
    assert (path / "manifest.json").read_bytes() == before
