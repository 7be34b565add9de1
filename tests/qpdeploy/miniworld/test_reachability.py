"""Gate 1 of the yardstick: subjects through the model's VAE, unseen subjects by embedding."""

import json
from pathlib import Path

import numpy as np
import pytest

from qpdeploy.miniworld.reachability import decoy_rate, instance_identification, reachability, vae_round_trip
from qpdeploy.miniworld.subjects import SUBJECTS, UNSEEN_SUBJECTS, mixed_scenes
from qpdeploy.miniworld.world import SHAPES, render_batch

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "miniworld_reachability.json"

UNSEEN = UNSEEN_SUBJECTS


class IdentityVAE:
    """Stands in for a VAE that carries every pixel: encode and decode return their input."""

    class _Out:
        def __init__(self, x):
            self.latent_dist = self
            self.mean = self.sample = x

    def encode(self, x):
        return self._Out(x)

    def decode(self, z):
        return self._Out(z)


def test_eight_unseen_subjects_share_the_shapes_but_no_look_and_are_never_decoys():
    assert len(UNSEEN) >= 8 and {s.shape for s in UNSEEN} <= set(SHAPES)  # the world's shapes, other looks
    bundled = {(s.shape, s.look) for s in SUBJECTS.values()}
    unseen = {(s.shape, s.look) for s in UNSEEN}
    assert len(unseen) == len(UNSEEN) and not unseen & bundled
    decoys = mixed_scenes(np.random.default_rng(0), 4000, plain=0.0, subjects=0.0)
    assert not {(d.thing.shape, d.thing.look) for d in decoys} & unseen


def test_an_identity_round_trip_returns_the_renders_bit_exact():
    images = render_batch([s.scene(np.random.default_rng(0)) for s in SUBJECTS.values()])
    assert np.array_equal(vae_round_trip(IdentityVAE(), images), images)


def test_crisp_renders_are_recognised_so_the_loss_after_the_round_trip_is_the_vaes(evaluator):
    crisp = reachability(IdentityVAE(), evaluator, SUBJECTS, per_background=2)
    assert min(crisp.values()) >= 0.95, crisp


def test_the_reported_reachability_is_what_the_shipped_model_and_evaluator_give(pipeline, evaluator):
    report = json.loads(RESULTS.read_text())
    again = reachability(pipeline.vae, evaluator, SUBJECTS, report["per_background"], report["seed"])
    # float32 on another CPU (other vector code paths) moves these means by ~1e-5 (measured:
    # pkd 0.975146 here against 0.975137 in the report); a change of model or evaluator moves them far more
    assert again == pytest.approx(report["reachability"], abs=1e-4)


def test_instance_identification_is_measured_on_subjects_the_evaluator_never_saw(pipeline, evaluator):
    crisp = instance_identification(IdentityVAE(), evaluator, UNSEEN, per_background=2)
    trip = instance_identification(pipeline.vae, evaluator, UNSEEN, per_background=2)
    assert crisp["queries"] == trip["queries"] == 8 * 5 * 2
    assert set(trip["per_subject"]) == {s.identifier for s in UNSEEN}
    assert crisp["accuracy"] >= trip["accuracy"]  # the VAE only removes information
    assert decoy_rate(pipeline.vae, evaluator, n=64) <= 0.05


def test_the_shipped_model_passes_gate_1():
    """The full figures (8 renders per subject and background), from the results file the
    subset test above ties to the shipped model and evaluator."""
    report = json.loads(RESULTS.read_text())
    assert min(report["reachability"].values()) >= 0.95
    assert report["instance_identification"]["accuracy"] >= 0.95
    assert report["decoy_rate"] <= 0.02
