"""The backdrop diagnostic: swapping a subject's instance background, and its table."""

import pytest

from benchmarks.miniworld.backdrops import photographed_on, summarize
from qpdeploy.miniworld.subjects import SUBJECTS, get_subject
from qpdeploy.miniworld.world import BACKGROUNDS


def test_photographed_on_swaps_the_instance_background_and_restores_it_on_error():
    original = SUBJECTS["sks"]
    with pytest.raises(RuntimeError):
        with photographed_on("sks", "night") as subject:
            assert get_subject("sks") is subject and subject.background == "night"
            assert (subject.shape, subject.look) == (original.shape, original.look)
            assert all(s.background == "night" for s in subject.instance_scenes())
            assert subject.instance_prompt().text == "a sks circle on a night background"
            raise RuntimeError("a failing run")
    assert get_subject("sks") is original


def test_summarize_pools_the_seven_other_backgrounds_per_backdrop():
    ones = {b: [1.0] * 4 if b in ("stone", "sand") else [0.0] * 4 for b in BACKGROUNDS}
    runs = [{"subject": "qlv", "backdrop": "stone", "seed": s, "recognised": ones} for s in (0, 1)]
    cell = summarize(runs)["qlv"]["stone"]
    assert cell["stone"]["mean"] == 1.0 and cell["night"]["mean"] == 0.0
    # the backdrop itself is left out: of the 7 others only sand recognises
    assert cell["other_backgrounds"]["mean"] == pytest.approx(1 / 7)
    assert cell["other_backgrounds"]["n"] == 2 * 7 * 4
