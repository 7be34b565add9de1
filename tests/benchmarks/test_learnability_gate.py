"""Gate 2's verdict is computed from the fidelity benchmark's per-image values."""

import pytest

from benchmarks.miniworld.learnability import THRESHOLDS, verdict


def run(row, subject, seed, recognised, own, prompt, preservation):
    def ones(share, n=64):  # share of n images scoring 1
        return [1.0] * round(share * n) + [0.0] * (n - round(share * n))

    return {"row": row, "subject": subject, "seed": seed,
            "per_image": {"subject_recognised": ones(recognised), "instance_prompt_recognised": ones(own, 16),
                          "prompt_fidelity": ones(prompt), "preservation": ones(preservation),
                          "subject_fidelity": ones(recognised), "subject_leak": ones(0.0)}}


def runs(db_recognised=0.6, db_own=0.75, db_prompt=0.85, fp_preservation=0.9, db_preservation=0.85):
    out = []
    for subject in ("sks", "zwx"):
        for seed in (0, 1):
            out.append(run("fp", subject, seed, 0.0, 0.0, 0.9, fp_preservation))
            out.append(run("fp_dreambooth", subject, seed, db_recognised, db_own, db_prompt, db_preservation))
    return out


def test_a_learnable_world_passes():
    result = verdict(runs())
    assert result["passed"] and all(result["checks"].values())
    db = result["table"]["fp_dreambooth"]
    assert db["subject_recognised"]["mean"] == pytest.approx(38 / 64)
    assert db["instance_prompt_recognised"]["mean"] == pytest.approx(12 / 16)
    assert db["subject_recognised"]["low"] < 38 / 64 < db["subject_recognised"]["high"]
    assert result["preservation_drop"]["mean"] == pytest.approx((58 - 54) / 64)
    assert set(result["per_subject"]) == {"sks", "zwx"}


@pytest.mark.slow  # four gate runs; test_a_learnable_world_passes covers the path in the fast subset
@pytest.mark.parametrize("field, value, check", [
    ("db_recognised", 0.45, "test_recognised"),
    ("db_own", 0.6, "instance_prompt_recognised"),
    ("db_prompt", 0.75, "prompt_fidelity"),
    ("db_preservation", 0.75, "preservation_drop"),
])
def test_each_threshold_fails_the_gate_alone(field, value, check):
    result = verdict(runs(**{field: value}))
    assert not result["passed"]
    assert [k for k, ok in result["checks"].items() if not ok] == [check]
    assert result["thresholds"] == THRESHOLDS


@pytest.mark.slow
def test_the_published_gate_2_is_computed_from_its_runs():
    """benchmarks/results/miniworld_learnability.json (the README's gate 2 figures): its verdict and
    intervals are what its per-image runs give, on every bundled subject, >= 64 test images each."""
    import json
    from pathlib import Path

    from qpdeploy.miniworld.subjects import SUBJECTS

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "miniworld_learnability.json"
    published = json.loads(path.read_text())
    again = verdict(published["runs"])
    assert again["checks"] == published["checks"] and again["passed"] == published["passed"]
    assert again["table"] == published["table"] and again["preservation_drop"] == published["preservation_drop"]
    assert published["split"] == "test"
    assert {r["subject"] for r in published["runs"]} == set(SUBJECTS)
    assert all(len(r["per_image"]["subject_recognised"]) >= 64 for r in published["runs"])


def test_the_dev_sweep_grid_is_every_combination():
    from benchmarks.miniworld.dev_sweep import combinations

    assert combinations(["dreambooth-lr=1e-4,3e-4", "prior-images=0,32"]) == [
        {"dreambooth-lr": "1e-4", "prior-images": "0"}, {"dreambooth-lr": "1e-4", "prior-images": "32"},
        {"dreambooth-lr": "3e-4", "prior-images": "0"}, {"dreambooth-lr": "3e-4", "prior-images": "32"}]
    with pytest.raises(SystemExit, match="is not name=v1,v2"):
        combinations(["steps"])
