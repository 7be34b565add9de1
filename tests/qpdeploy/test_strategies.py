import pytest

from qpdeploy.config import TrainConfig
from qpdeploy.errors import QPDeployError
from qpdeploy.intervals import Intervals
from qpdeploy.pack import set_map, num_sets_for
from qpdeploy.strategies import STRATEGIES, Strategy, get_strategy, register


def test_the_papers_strategies_map_intervals_to_sets():
    assert set_map("baseline", 4) == [0, 0, 0, 0]
    assert set_map("s1", 4, (0, 1)) == [0, 0, 1, 1]  # row 1 = num_sets: the post-training scales
    assert set_map("s2", 4) == [0, 1, 2, 3]
    assert [num_sets_for(s, 4) for s in ("baseline", "s1", "s2")] == [1, 1, 4]
    assert get_strategy("s1").trained_intervals(4, (2, 0)) == [0, 2]
    assert [get_strategy(s).layout for s in ("baseline", "s1", "s2")] == ["per-interval", "masked", "per-interval"]
    with pytest.raises(QPDeployError, match="unknown strategy 's9'"):
        get_strategy("s9")
    with pytest.raises(QPDeployError, match="non-empty subset of 0..3"):
        set_map("s1", 4, (4,))


def test_a_new_strategy_is_one_registered_class():
    """Two sets, one per half of the schedule: config, pack helpers and the sampler take it as is."""
    from qpdeploy.train import TimestepSampler

    @register
    class Halves(Strategy):
        name = "halves-test"
        balanced_intervals = False

        def num_sets(self, k):
            return 2

        def set_map(self, k, chosen=()):
            return [0 if i < k // 2 else 1 for i in range(k)]

    try:
        config = TrainConfig("a photo of sks dog", strategy="halves-test")
        assert config.batch_for(4) == 4 and num_sets_for("halves-test", 4) == 2
        assert set_map("halves-test", 4) == [0, 0, 1, 1]
        import torch

        draws = TimestepSampler(Intervals.uniform(4), "halves-test").draw(0, 512, torch.Generator().manual_seed(0))
        assert 0 <= int(draws.min()) and int(draws.max()) < 1000 and draws.float().std() > 200
    finally:
        del STRATEGIES["halves-test"]
