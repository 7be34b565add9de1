"""The miniworld metrics of ``qpdeploy evaluate`` on real renders."""

import numpy as np
import pytest

from qpdeploy.errors import QPDeployError
from qpdeploy.evaluate import MiniworldScorer


def test_miniworld_metrics_read_real_renders(evaluator):
    from qpdeploy.miniworld.prompts import Prompt
    from qpdeploy.miniworld.subjects import get_subject, scene_for
    from qpdeploy.miniworld.world import render_batch

    scorer = MiniworldScorer(evaluator)
    prompts = [p.text for p in get_subject("sks").prompts("test")]
    images = render_batch([scene_for(Prompt(**vars(p)), np.random.default_rng(i))
                           for i, p in enumerate(get_subject("sks").prompts("test"))])
    scores = scorer.score(images, prompts, "sks", None)
    assert scores["prompt_match"].mean() == 1.0 and scores["subject_recognised"].mean() >= 0.9
    plain = [Prompt("circle", "red", "sand").text] * len(prompts)
    other = scorer.score(render_batch([scene_for(Prompt("circle", "red", "sand"), np.random.default_rng(i))
                                       for i in range(len(prompts))]), plain, "sks", None)
    assert other["subject_recognised"].mean() == 0.0  # plain circles are not the subject
    with pytest.raises(QPDeployError, match="'dog' is not in its vocabulary; for other models give --clip"):
        scorer.check(["a photo of a dog"], None, None)
    with pytest.raises(QPDeployError, match="'xyz' is not a bundled miniworld subject"):
        scorer.check(prompts, "xyz", None)


def test_a_subject_the_package_does_not_ship_is_bounded_by_the_class_its_prompts_name(evaluator, monkeypatch):
    from qpdeploy.miniworld import metrics
    from qpdeploy.miniworld.prompts import Prompt
    from qpdeploy.miniworld.subjects import UNSEEN_SUBJECTS
    from qpdeploy.miniworld.world import render_batch

    shapes = []
    threshold = metrics.instance_threshold
    monkeypatch.setattr(metrics, "instance_threshold",
                        lambda *args, **kwargs: shapes.append(kwargs.get("shape")) or threshold(*args, **kwargs))
    square = next(s for s in UNSEEN_SUBJECTS if s.shape == "square")
    instances = render_batch(square.instance_scenes())
    scorer = MiniworldScorer(evaluator)
    prompts = [Prompt("square", background=b, identifier="vyt").text for b in ("sand", "night")]
    images = render_batch([square.scene(np.random.default_rng(i), b) for i, b in enumerate(("sand", "night"))])
    scores = scorer.score(images, prompts, "vyt", instances)
    assert scores["subject_recognised"].tolist() == [1.0, 1.0]  # renders of the subject itself
    mixed = [Prompt("square", background="sand", identifier="vyt").text, Prompt("circle", background="sand").text]
    scorer.score(images, mixed, "vyt", instances)
    scorer.score(images, [Prompt("circle", background="sand", identifier="sks").text] * 2, "sks", None)
    # the prompts' one class; none when they name two; a bundled subject always its own
    assert shapes == ["square", None, "circle"]
