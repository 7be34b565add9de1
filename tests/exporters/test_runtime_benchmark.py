"""``benchmarks/runtime.py`` end to end on the tiny per-interval deploy dir: every configuration
makes its images, and the report holds what the README's runtime tables read."""

import argparse

import pytest


@pytest.mark.slow  # child processes for the memory figures, and an FP32 export for the INT8 comparison
def test_the_runtime_benchmark_measures_every_configuration_on_a_deploy_dir(deploy_dir, base_dir, pack_dir):
    from benchmarks.runtime import run
    from qpdeploy.exporters.manifest import read_manifest

    k = read_manifest(deploy_dir).intervals.k
    args = argparse.Namespace(deploy=deploy_dir, multi_expert=None, base=base_dir, pack=pack_dir, steps=4, threads=1,
                              rounds=1, repeats=1)
    report = run(args)
    rows = {r["configuration"]: r for r in report["latency"]}
    assert set(rows) == {"ort", "ort --fold-weights", "ort --no-arena", "ort --low-memory",
                         "ort --low-memory --no-arena", "torch reference"}
    for name, row in rows.items():
        assert row["unet_ms_per_step"] > 0 and row["denoise_ms_per_step"] > 0, name
        assert len(row["interval_per_step"]) == 4 and set(row["interval_per_step"]) <= set(range(k)), name
    assert rows["ort"]["peak_resident_engines"] == len(set(rows["ort"]["interval_per_step"]))
    assert rows["torch reference"]["peak_resident_engines"] == 1
    assert report["tensorrt"] != "measured" or "trt" in rows
    assert set(report["memory"]) == {"per-interval resident (shared weights map)",
                                      "per-interval resident (each session its own weights)",
                                      "per-interval resident --fold-weights", "per-interval resident --no-arena",
                                      "per-interval --low-memory", "per-interval --low-memory --no-arena"}
    assert all(m["after_load_rss"] >= m["baseline_rss"] for m in report["memory"].values())
    assert all(m["peak_rss"] >= max(m["after_load_rss"], m["after_calls_rss"]) for m in report["memory"].values())
    f = report["fp32_vs_int8"]
    assert f["int8_graph_bytes"] < f["fp32_graph_bytes"] and f["fp32_basic_ms"] > 0 and f["int8_qdq_all_ms"] > 0
    assert f["int8_qdq_basic_fold_ms"] > 0 and f["int8_speedup_vs_fp32_basic_fold"] > 0
