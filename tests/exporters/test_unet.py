"""UNet export: every layout for SD1-, SD2- and SDXL-like tiny UNets. Each graph passes the
ONNX checker and the QDQ rules, and ONNX Runtime matches the torch model with the pack loaded
in every interval (SQNR in dB)."""

import onnx
import pytest
import torch

from ..conftest import family_params

from qpdeploy.calibrate import sqnr_db
from qpdeploy.errors import QPDeployError
from qpdeploy.exporters.manifest import read_manifest
from qpdeploy.exporters.unet import (SHARED_WEIGHTS_FILE, UNetFiles, default_layout, example_inputs, export_unet, plan_unet,
                                     unet_io)
from qpdeploy.exporters.verify import (check_graph, compare_with_torch, expected_qdq_units, float_layer_count,
                                       ort_session, qdq_structure)
from qpdeploy.pack import apply_pack, reset_to_post_training

FAMILIES = ("sd1", "sd2", "sdxl")
LAYOUTS = ("per-interval", "masked", "multi-expert")
LAYOUT_PARAMS = [LAYOUTS[0], *(pytest.param(x, marks=pytest.mark.slow) for x in LAYOUTS[1:])]  # one fast, all in the full suite
STRATEGY = {"per-interval": "s2", "masked": "s1", "multi-expert": "s2"}
# sd1 per-interval is the command-line deploy dir (INT4, per-interval activation scales, S2);
# sd2 per-interval exports without a pack (the plain INT8 model: one graph for all intervals).
NO_PACK = ("sd2", "per-interval")
# Correct graphs reach ~125 dB, or ~30 dB where a float rounding difference moves one INT8
# activation step (a large share of a 4x8x8 toy output); a wrong scale set gives < 10 dB.
MIN_DB = 15.0
LATENT, SEQ = (8, 8), 16


@pytest.fixture(scope="module")
def exported(packed_base, deploy_base_changes, tmp_path_factory, request):
    """``exported(family, layout)`` -> (base with its pack or none, UNetFiles, folder).

    sd1 per-interval is the command-line deploy dir's base and pack: its graphs are read from
    that deploy dir (built once per run, and shared with the export tests) instead of being
    exported again; :func:`test_the_command_line_deploy_dir_holds_the_same_unet_graphs`
    checks that exporting them directly gives the same graphs.
    """
    cache = {}

    def get(family, layout):
        changes = deploy_base_changes if (family, layout) == ("sd1", "per-interval") else {}
        base, pack = packed_base(family, STRATEGY[layout], **changes)
        install(base, None if (family, layout) == NO_PACK else pack)  # the base may have served another test
        if (family, layout) not in cache:
            if (family, layout) == ("sd1", "per-interval"):
                deploy_dir = request.getfixturevalue("deploy_dir")
                cache[family, layout] = files_in_deploy_dir(base, deploy_dir), deploy_dir
            else:
                out = tmp_path_factory.mktemp(f"unet-{family}-{layout}")
                cache[family, layout] = export_unet(base, layout, out, LATENT, SEQ), out
        return (base, *cache[family, layout])

    return get


@pytest.mark.slow  # exports the deploy dir's UNet once more
def test_the_command_line_deploy_dir_holds_the_same_unet_graphs(packed_base, deploy_base_changes, deploy_dir,
                                                                 tmp_path):
    """``qpdeploy export`` (base and pack through disk) writes exactly the graphs
    :func:`export_unet` writes from the same base and pack in memory (the graphs the other
    tests of this module read from the deploy dir): the same nodes, initializers and weights."""
    base, pack = packed_base("sd1", STRATEGY["per-interval"], **deploy_base_changes)
    install(base, pack)
    out = tmp_path / "unet"
    out.mkdir()
    files = export_unet(base, "per-interval", out, LATENT, SEQ)
    assert files_in_deploy_dir(base, deploy_dir) == files
    for name in files.onnx_files:
        ours, cli = (onnx.load(str(d / name), load_external_data=False) for d in (out, deploy_dir))
        assert ours.graph == cli.graph, name
    assert (out / files.weights_file).read_bytes() == (deploy_dir / files.weights_file).read_bytes()


def install(base, pack):
    if pack is None:
        reset_to_post_training(base)
    else:
        apply_pack(base, pack)


def files_in_deploy_dir(base, deploy_dir) -> UNetFiles:
    manifest = read_manifest(deploy_dir)
    plan = plan_unet(base, manifest.layout)
    inputs, outputs = unet_io(base.unet, plan, LATENT, SEQ)
    onnx_files = [g["onnx"] for g in manifest.unet["graphs"]]
    return UNetFiles(plan, inputs, outputs, onnx_files, SHARED_WEIGHTS_FILE, (deploy_dir / SHARED_WEIGHTS_FILE).stat().st_size)


# per-interval in the fast subset; the masked and multi-expert graphs in the full suite
@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
@pytest.mark.parametrize("family", family_params(*FAMILIES))
def test_graphs_follow_the_qdq_rules(exported, family, layout):
    base, files, out = exported(family, layout)
    graphs = {"per-interval": 1 if family == "sd2" else base.intervals.k}.get(layout, 1)
    assert len(files.onnx_files) == graphs
    assert files.plan.selector_values == {"per-interval": None, "masked": (0, 1, 1, 0),
                                          "multi-expert": (0, 1, 2, 3)}[layout]
    expected = expected_qdq_units(base.unet)
    assert any(units == 2 for units in expected.values())  # shortcut-split layers are covered
    for name in files.onnx_files:
        check_graph(out / name)
        found = qdq_structure(onnx.load(str(out / name), load_external_data=False))
        assert found.violations == []
        assert found.layers == expected  # every quantized layer, with both halves of split ones
        assert found.act_qdq == found.units == sum(expected.values())
        assert found.float_layers == float_layer_count(base.unet) > 0  # skipped layers stay float


@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
@pytest.mark.parametrize("family", family_params(*FAMILIES))
def test_onnx_runtime_matches_torch_in_every_interval(exported, family, layout):
    base, files, out = exported(family, layout)
    graphs = [out / f for f in files.onnx_files]
    sqnr = compare_with_torch(base.unet, graphs, files.plan, files.inputs, files.outputs, base.intervals, batch=2)
    assert len(sqnr) == base.intervals.k
    assert min(sqnr) >= MIN_DB, sqnr
    if (family, layout) == NO_PACK:
        return  # no pack: every interval has the same scales
    # The wrong graph / selector value for an interval is far off: the check has teeth.
    wrong = 3 if layout != "masked" else 1
    assert sqnr_in_interval(base, files, graphs, interval=0, use=wrong) < 10


def sqnr_in_interval(base, files, graphs, interval, use):
    """SQNR of interval ``interval`` computed with the graph / selector value of interval ``use``."""
    lo, hi = base.intervals.bounds(interval)
    plan = files.plan
    value = plan.selector_values[use] if plan.selector else 0
    feed = example_inputs(files.inputs, 2, seed=7, timestep=(lo + hi) / 2, selector_value=value)
    session = ort_session(graphs[plan.graph_of_interval[use]])
    out = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    added = {"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]} if "time_ids" in feed else None
    with torch.no_grad():
        ref = base.unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"], added_cond_kwargs=added).sample
    return sqnr_db(ref, torch.from_numpy(out))


@pytest.mark.parametrize("family", family_params("sd1", "sdxl"))
def test_per_interval_graphs_share_one_weights_file(exported, family):
    _, files, out = exported(family, "per-interval")
    refs = []
    for name in files.onnx_files:
        model = onnx.load(str(out / name), load_external_data=False)
        external = {t.name: {e.key: e.value for e in t.external_data}
                    for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert {e["location"] for e in external.values()} == {SHARED_WEIGHTS_FILE}
        int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
        assert int8 and all(t.data_location == onnx.TensorProto.EXTERNAL for t in int8)  # weights never inline
        refs.append(external)
    assert all(r == refs[0] for r in refs)  # same tensors at the same offsets
    weights = (out / SHARED_WEIGHTS_FILE).stat().st_size
    graphs = sum((out / f).stat().st_size for f in files.onnx_files)
    assert files.weights_bytes == weights
    assert graphs + weights < len(files.onnx_files) * weights  # K graphs cost far less than K copies


def test_per_interval_activation_scales_rule_out_table_layouts(packed_base, deploy_base_changes):
    base, _ = packed_base("sd1", "s2", **deploy_base_changes)
    for layout in ("masked", "multi-expert"):
        with pytest.raises(QPDeployError, match="global activation scales"):
            plan_unet(base, layout)
    assert default_layout(base, "s1") == "per-interval"  # S1's default cannot carry them


def test_layouts_map_intervals_to_graphs_and_selector_values(packed_base):
    base, pack = packed_base("sd1", "s1")
    assert [default_layout(base, s) for s in ("s1", "s2", "baseline", None)] == ["masked"] + ["per-interval"] * 3
    reset_to_post_training(base)
    plan = plan_unet(base, "per-interval")  # no pack, global activation scales: one graph
    assert len(plan.graphs) == 1 and plan.graph_of_interval == (0, 0, 0, 0)
    apply_pack(base, pack)
    plan = plan_unet(base, "per-interval")  # S1: tuned graph in intervals 1, 2, post-training elsewhere
    assert len(plan.graphs) == 2 and plan.graph_of_interval == (0, 1, 1, 0)
    assert [g.intervals for g in plan.graphs] == [(0, 3), (1, 2)]
    plan = plan_unet(base, "masked")
    assert plan.selector == "tuned" and plan.selector_values == (0, 1, 1, 0) and plan.table_rows == (1, 0)
    plan = plan_unet(base, "multi-expert")
    assert plan.selector == "expert" and plan.selector_values == (1, 0, 0, 1) and plan.table_rows == (0, 1)
    s2_base, s2_pack = packed_base("sd1", "s2")
    apply_pack(s2_base, s2_pack)
    with pytest.raises(QPDeployError, match="masked layout"):
        plan_unet(s2_base, "masked")
    with pytest.raises(QPDeployError, match="unknown layout"):
        plan_unet(s2_base, "per-step")
