import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qpdeploy.errors import QPDeployError
from qpdeploy.intervals import Intervals


@st.composite
def partitions(draw):
    t_max = draw(st.integers(2, 2000))
    inner = draw(st.sets(st.integers(1, t_max - 1), max_size=min(12, t_max - 1)))
    return Intervals((0, *sorted(inner), t_max))


@given(partitions(), st.data())
def test_every_timestep_has_the_interval_whose_bounds_hold_it(iv, data):
    t = data.draw(st.integers(0, iv.num_train_timesteps - 1))
    k = iv.index(t)
    lo, hi = iv.bounds(k)
    assert lo <= t < hi


@given(partitions())
def test_int_float_and_tensor_inputs_agree(iv):
    ts = list(range(iv.num_train_timesteps))
    as_ints = [iv.index(t) for t in ts]
    assert [iv.index(float(t)) for t in ts] == as_ints
    assert iv.index(torch.tensor(ts)).tolist() == as_ints
    assert iv.index(torch.tensor(ts, dtype=torch.float32)).tolist() == as_ints


@given(partitions())
def test_json_round_trip_is_exact(iv):
    assert Intervals.from_json(iv.to_json()) == iv


@given(st.integers(1, 50), st.integers(50, 1500))
def test_uniform_intervals_cover_the_range_with_equal_lengths(k, t_max):
    iv = Intervals.uniform(k, t_max)
    lengths = [hi - lo for lo, hi in zip(iv.boundaries, iv.boundaries[1:])]
    assert iv.k == k and sum(lengths) == t_max
    assert max(lengths) - min(lengths) <= 1


def test_boundary_timestep_belongs_to_the_interval_it_opens():
    iv = Intervals.parse("0,300,600,1000")
    assert [iv.index(t) for t in (0, 299, 300, 599, 600, 999)] == [0, 0, 1, 1, 2, 2]
    assert iv.index(299.5) == 0 and iv.index(300.0) == 1


def test_out_of_range_timesteps_clamp_to_the_end_intervals():
    iv = Intervals.uniform(4)
    assert iv.index(1000) == 3 and iv.index(-0.5) == 0
    assert iv.index(torch.tensor([-1.0, 1000.0, 2000.0])).tolist() == [0, 3, 3]


def test_tensor_index_keeps_shape_and_dtype():
    iv = Intervals.uniform(4)
    out = iv.index(torch.tensor([[10, 900], [400, 600]]))
    assert out.dtype == torch.long and out.tolist() == [[0, 3], [1, 2]]


@pytest.mark.parametrize("text", ["5,500,1000", "0,500,500,1000", "0", "0,a,1000"])
def test_bad_boundaries_are_refused(text):
    with pytest.raises(QPDeployError):
        Intervals.parse(text)
