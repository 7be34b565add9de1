"""benchmarks/ptq_peers.py on a tiny model: every row scored on the same calls, qpdeploy's row
equal to what `quantize` reports, and the paired difference statistic."""

import json

import pytest

from benchmarks import ptq_peers


def test_paired_difference_of_a_constant_ratio_is_exact():
    signal = [4.0, 9.0, 1.0, 2.0]
    ours = [1.0, 2.0, 3.0, 4.0]
    theirs = [2 * x for x in ours]  # twice the noise on every call: +3.0103 dB, whatever the resample
    d = ptq_peers.paired_difference(signal, ours, theirs)
    assert d["mean"] == d["low"] == d["high"] == pytest.approx(3.0103, abs=1e-3)


@pytest.mark.slow
def test_the_qpdeploy_row_is_what_quantize_reports(tmp_path):
    from qpdeploy.config import QuantizeConfig
    from qpdeploy.models import tiny_pipeline
    from qpdeploy.ptq import quantize_pipeline

    out = tmp_path / "peers.json"
    ptq_peers.main(["--model", "tiny-sd1", "--calib-sizes", "8,16", "--calib-steps", "4", "--heldout-calls", "16",
                    "--threads", "1", "--rows", "qpdeploy,ort_qdq_matched", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = [r for r in report["rows"] if r["row"] == "qpdeploy"]
    assert [r["calibration_calls"] for r in rows] == [8, 16]
    assert all(len(r["sqnr_db_per_quarter"]) == 4 and r["sqnr_db"] > 20 for r in rows)
    assert report["settings"]["heldout_calls"] == 16 and report["settings"]["calib_guidance"] == 7.5
    _, _, _, quantized = quantize_pipeline(tiny_pipeline("sd1"), QuantizeConfig(calib_steps=4, calib_samples=16))
    assert rows[1]["sqnr_db"] == round(quantized["sqnr_db"], 3)  # same calls, same method: the same number
    assert rows[1]["layers_quantized"] == quantized["layers_quantized"]
    assert report["spread_db"]["qpdeploy"] == round(abs(rows[0]["sqnr_db"] - rows[1]["sqnr_db"]), 3)
    from qpdeploy.ptq import base_from_pipeline

    layers = [m for m in base_from_pipeline(tiny_pipeline("sd1"), QuantizeConfig(calib_steps=2, calib_samples=2,
                                                                                 weight_search="minmax")).unet.modules()
              if hasattr(m, "w_int")]
    per_scale = sum(m.weight_shape.numel() for m in layers) / sum(m.out_features for m in layers)
    assert rows[0]["weights_per_scale"] == round(per_scale, 1)  # one scale per output channel

    # ONNX Runtime's static QDQ quantizer on exactly qpdeploy's layers, scored on the same calls
    ort = [r for r in report["rows"] if r["row"] == "ort_qdq_matched"]
    assert [r["calibration_calls"] for r in ort] == [8, 16]
    for ours, peer in zip(rows, ort):
        assert peer["layers_quantized"] == ours["layers_quantized"]  # every layer's Conv/MatMul/Gemm got a weight DQ
        assert peer["weights_per_scale"] == ours["weights_per_scale"]  # INT8 per output channel on both sides
        d = peer["qpdeploy_minus_this_db"]
        assert d["low"] <= d["mean"] <= d["high"]
        assert d["mean"] == pytest.approx(ours["sqnr_db"] - peer["sqnr_db"], abs=2e-3)
        assert 10 < peer["sqnr_db"] < 60  # quantized, and not broken


@pytest.mark.slow
def test_model_optimizer_rows_on_the_matched_layer_set(tmp_path):
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt not installed")
    out = tmp_path / "peers.json"
    ptq_peers.main(["--model", "tiny-sd1", "--calib-sizes", "8", "--calib-steps", "4", "--heldout-calls", "8",
                    "--threads", "1", "--rows", "qpdeploy,modelopt_int8_matched", "--out", str(out)])
    ours, peer = json.loads(out.read_text())["rows"]
    assert peer["row"] == "modelopt_int8_matched" and peer["layers_quantized"] == ours["layers_quantized"]
    assert peer["weights_per_scale"] == ours["weights_per_scale"]  # INT8 per channel on both sides
    d = peer["qpdeploy_minus_this_db"]
    assert d["low"] <= d["mean"] <= d["high"]
    assert d["mean"] == pytest.approx(ours["sqnr_db"] - peer["sqnr_db"], abs=2e-3)
