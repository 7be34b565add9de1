"""The evaluator's training batches: smudged plain objects (imperfect generations) are
labelled as no subject and no colour, and the VAE's data never changes with them."""

import numpy as np

from benchmarks.miniworld.train_evaluator import SMUDGED, batch
from qpdeploy.miniworld.evaluator import NO_SUBJECT, EvaluatorConfig
from qpdeploy.miniworld.world import Plain, Smudge, Thing, render


def test_smudged_objects_are_no_subject_and_have_no_colour_label():
    config = EvaluatorConfig(instance_dim=8)
    _, labels, scenes = batch(np.random.default_rng(0), 400, config)
    smudged = [i for i, s in enumerate(scenes) if isinstance(s.thing.look, Smudge)]
    plain = [i for i, s in enumerate(scenes) if isinstance(s.thing.look, Plain)]
    assert 0.5 * SMUDGED < len(smudged) / (len(smudged) + len(plain)) < 1.5 * SMUDGED
    assert all(labels["colour"][i] == -100 for i in smudged)
    assert all(labels["subject"][i] == config.labels["subject"].index(NO_SUBJECT) for i in smudged)
    look = scenes[smudged[0]].thing.look
    assert look.colour != look.other and 0.2 <= look.amount <= 0.6


def test_a_smudge_blends_towards_the_other_colour():
    from qpdeploy.miniworld.world import COLOURS, Scene

    red, white = np.asarray(COLOURS["red"], float), np.asarray(COLOURS["white"], float)
    look = Smudge("red", "white", 0.0, 0.6)  # towards white, left to right
    u, v = np.array([[-1.0, 0.0, 1.0]]), np.zeros((1, 3))
    painted = look.paint(u, v)[0]
    np.testing.assert_allclose(painted[0], red)
    np.testing.assert_allclose(painted[1], 0.7 * red + 0.3 * white)
    np.testing.assert_allclose(painted[2], 0.4 * red + 0.6 * white)
    image = render(Scene("night", Thing("square", look, 16.0, 16.0, 10.0))).astype(float)
    row = image[16, 10:23, 1]  # green channel rises from red (40) towards white (250)
    assert np.all(np.diff(row) >= 0) and row[-1] - row[0] > 60
