"""benchmarks/quantize_speed.py's UNet batching probe on a tiny model."""

import argparse

from benchmarks import quantize_speed


def test_the_unet_probe_times_every_batch_size_per_sample(tmp_path):
    from qpdeploy.models import tiny_pipeline

    tiny_pipeline("sd1").save_pretrained(tmp_path / "model")
    args = argparse.Namespace(threads=1, resolution=64, batch_sizes="1,4")
    probe = quantize_speed.unet_probe(tmp_path / "model", args, repeats=1)["seconds_per_sample"]
    assert set(probe) == {"1", "4"} and all(0 < v < 10 for v in probe.values())
