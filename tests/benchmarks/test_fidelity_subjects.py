"""The fidelity benchmark's own subjects: never shipped, scored with the instance embedding
against their own instance images."""

import numpy as np
import pytest

from benchmarks.fidelity import BENCHMARK_SUBJECTS, subject_named
from qpdeploy.miniworld.prompts import IDENTIFIERS
from qpdeploy.miniworld.subjects import SUBJECTS, UNSEEN_SUBJECTS, write_instance_images
from qpdeploy.miniworld.world import BACKGROUNDS, render_batch


def test_benchmark_subjects_are_unseen_looks_under_spare_identifiers():
    assert len(BENCHMARK_SUBJECTS) >= 2
    unseen = {(s.shape, s.look) for s in UNSEEN_SUBJECTS}  # no model or evaluator trained on these
    for identifier, subject in BENCHMARK_SUBJECTS.items():
        assert identifier in IDENTIFIERS and identifier not in SUBJECTS
        assert (subject.shape, subject.look) in unseen
        assert subject.background == "stone"
        assert len(subject.prompts("dev")) == 6 and len(subject.prompts("test")) == 8
    assert subject_named("vyt") is BENCHMARK_SUBJECTS["vyt"] and subject_named("sks") is SUBJECTS["sks"]
    with pytest.raises(SystemExit, match="unknown subject 'nope'"):
        subject_named("nope")


def test_instance_images_of_a_benchmark_subject_are_its_own(tmp_path):
    from PIL import Image

    subject = BENCHMARK_SUBJECTS["bnq"]
    paths = write_instance_images(subject, tmp_path)
    assert len(paths) == 5
    written = np.stack([np.asarray(Image.open(p)) for p in paths])
    assert np.array_equal(written, render_batch(subject.instance_scenes()))


@pytest.fixture(scope="module")
def evaluator():
    from qpdeploy.miniworld.evaluator import load_evaluator

    return load_evaluator()


def test_the_instance_embedding_tells_a_benchmark_subject_from_others(evaluator):
    """Real renders of each benchmark subject on new backgrounds pass its threshold; renders of
    a bundled subject of the same class do not."""
    from qpdeploy.miniworld.metrics import subject_scores

    rng = np.random.default_rng(0)
    for subject in BENCHMARK_SUBJECTS.values():
        reference = render_batch(subject.instance_scenes())
        others = [b for b in BACKGROUNDS if b != subject.background]
        own = render_batch([subject.scene(rng, others[i % len(others)]) for i in range(28)])
        scores = subject_scores(evaluator, own, subject.identifier, reference, subject.shape)
        assert scores["instance_recognised"].mean() >= 0.9, subject.identifier
        assert scores["probability"].max() == 0  # the subject head does not know it
        twin = next(s for s in SUBJECTS.values() if s.shape == subject.shape)
        stranger = render_batch([twin.scene(rng, others[i % len(others)]) for i in range(28)])
        assert subject_scores(evaluator, stranger, subject.identifier, reference,
                              subject.shape)["instance_recognised"].mean() <= 0.05
