import numpy as np
import pytest

from qpdeploy.miniworld.stats import bootstrap_mean, cell, separated


def test_constant_values_give_a_point_interval():
    stat = bootstrap_mean([[1.0] * 10, [1.0] * 5])
    assert stat == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 15, "runs": 2}


def test_interval_width_matches_the_binomial_standard_error():
    rng = np.random.default_rng(0)
    groups = [rng.random(64) < 0.5 for _ in range(4)]  # 256 fair coin flips, runs alike
    stat = bootstrap_mean(groups)
    width = stat["high"] - stat["low"]
    expected = 2 * 1.96 * np.sqrt(0.25 / 256)  # 0.1225
    assert stat["low"] < 0.5 < stat["high"]
    assert 0.7 * expected < width < 1.5 * expected


def test_runs_that_disagree_widen_the_interval():
    # same 256 values, once as two runs of very different means, once shuffled evenly
    a, b = np.r_[np.ones(100), np.zeros(28)], np.r_[np.ones(28), np.zeros(100)]
    split = bootstrap_mean([a, b])
    rng = np.random.default_rng(1)
    mixed = rng.permutation(np.r_[a, b])
    even = bootstrap_mean([mixed[:128], mixed[128:]])
    assert split["mean"] == pytest.approx(even["mean"]) == pytest.approx(0.5)
    assert split["high"] - split["low"] > 2 * (even["high"] - even["low"])


def test_nan_values_are_left_out_and_empty_input_is_refused():
    assert bootstrap_mean([[1.0, np.nan, 0.0]])["n"] == 2
    with pytest.raises(ValueError, match="no finite values"):
        bootstrap_mean([[np.nan], []])


def test_separated_and_cell():
    low = {"mean": 0.2, "low": 0.1, "high": 0.3}
    high = {"mean": 0.6, "low": 0.5, "high": 0.7}
    near = {"mean": 0.35, "low": 0.25, "high": 0.45}
    assert separated(low, high) and separated(high, low)
    assert not separated(low, near)
    assert cell(high) == "0.60 [0.50, 0.70]"
