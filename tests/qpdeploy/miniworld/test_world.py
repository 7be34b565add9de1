"""Renderer, scene specs, held-out split, captions and subjects of the miniworld."""

import numpy as np
import pytest
from PIL import Image

from qpdeploy.miniworld import prompts as P
from qpdeploy.miniworld import subjects as S
from qpdeploy.miniworld import world as W


def test_render_is_deterministic_and_exact_away_from_the_object():
    scene = W.Scene("sand", W.Thing("square", W.Plain("blue"), x=10.0, y=12.0, size=6.0))
    a, b = W.render(scene), W.render(scene)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert tuple(a[31, 31]) == W.BACKGROUNDS["sand"]  # far corner: pure background
    assert tuple(a[12, 10]) == W.COLOURS["blue"]  # centre: pure object colour
    # the square spans 0.85 * size either side: 10.2 px of blue, edges anti-aliased
    blue_share = np.all(a == W.COLOURS["blue"], axis=-1).sum() / (10.2**2)
    assert 0.75 < blue_share <= 1.0


def test_same_seed_same_scenes_same_pixels():
    render = lambda seed: W.render_batch([W.random_scene(np.random.default_rng(seed)) for _ in range(8)])
    assert np.array_equal(render(3), render(3))
    assert not np.array_equal(render(3), render(4))


def test_shapes_have_comparable_areas():
    areas = {}
    for name in W.SHAPES:
        image = W.render(W.Scene("night", W.Thing(name, W.Plain("white"), 16.0, 16.0, 10.0)))
        areas[name] = (image.astype(float).mean(-1) > 128).sum()
    assert min(areas.values()) > 0.35 * max(areas.values()), areas


def test_subject_looks_use_both_colours():
    subject = S.get_subject("sks")  # yellow left half, purple right half
    image = W.render(W.Scene("sky", W.Thing("circle", subject.look, 16.0, 16.0, 10.0)))
    assert tuple(image[16, 10]) == W.COLOURS["yellow"] and tuple(image[16, 22]) == W.COLOURS["purple"]


def test_heldout_split():
    combos, held, train = W.all_combos(), W.heldout_combos(), W.train_combos()
    assert len(combos) == 290 and len(held) == 29
    assert set(held).isdisjoint(train) and set(held) | set(train) == set(combos)
    for i, j in ((0, 1), (1, 2), (0, 2)):  # every pair of a held-out triple stays in pretraining
        assert {(c[i], c[j]) for c in held} <= {(c[i], c[j]) for c in train}
    assert all(W.contrasts(c, b) for c, _, b in combos)
    assert ("white", "circle", "snow") not in combos  # invisible: white on snow


def test_captions_follow_their_specs():
    prompt = P.Prompt("triangle", "orange", "ocean", template=1)
    assert prompt.text == "a photo of an orange triangle on an ocean background"
    assert P.Prompt("circle", identifier="sks", background="sky").text == "a sks circle on a sky background"
    assert P.Prompt("cross", "red").text == "a red cross"
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = W.random_scene(rng, W.train_combos())
        described = P.describe(scene, rng)
        assert described.shape == scene.thing.shape
        assert described.colour in (None, scene.colour) and described.background in (None, scene.background)
        words = described.text.split()
        assert scene.thing.shape in words and not set(words) & set(P.IDENTIFIERS)
    # known-but-weak identifiers: a stray identifier in about identifier_rate of the captions,
    # every one of them used, whatever the picture
    stray = [P.describe(W.random_scene(rng, W.train_combos()), rng, identifier_rate=0.2).identifier for _ in range(2000)]
    found = [i for i in stray if i is not None]
    assert 0.17 < len(found) / len(stray) < 0.23 and set(found) == set(P.IDENTIFIERS)


def test_decoy_captions_name_shape_and_background_never_a_colour():
    from qpdeploy.miniworld.subjects import SUBJECTS, mixed_scenes

    rng = np.random.default_rng(0)
    decoys = [s for s in mixed_scenes(rng, 400, plain=0.0, subjects=0.0)]
    assert len(decoys) == 400 and all(s.colour is None and s.subject is None for s in decoys)
    captions = [P.describe(s, rng, drop_colour=0.0, drop_background=0.0) for s in decoys]
    assert all(c.colour is None and c.shape == s.thing.shape and c.background == s.background
               for c, s in zip(captions, decoys))
    subject = SUBJECTS["sks"].scene(rng)
    with pytest.raises(ValueError, match="not subject 'sks'"):
        P.describe(subject, rng)


def test_decoys_never_resemble_a_subject():
    rng = np.random.default_rng(0)
    subjects = (*S.SUBJECTS.values(), *S.UNSEEN_SUBJECTS)
    decoys = [s for s in S.mixed_scenes(rng, 3000, plain=0.0, subjects=0.0)]
    assert all(d.subject is None and d.colour is None for d in decoys)
    assert not any(S._resembles(d.thing.shape, d.thing.look, s) for d in decoys for s in subjects)
    # band count and colour order do not make a look new
    pkd = S.get_subject("pkd")
    assert S._resembles("triangle", W.Stripes("black", "white", bands=4), pkd)
    assert not S._resembles("triangle", W.Stripes("white", "red", bands=6), pkd)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown shape"):
        P.Prompt("hexagon")
    with pytest.raises(ValueError, match="unknown background"):
        W.Scene("moon", W.Thing("circle", W.Plain("red"), 16.0, 16.0, 8.0))


def test_scene_for_renders_what_the_prompt_asks():
    rng = np.random.default_rng(1)
    for prompt in P.heldout_prompts()[:10]:
        scene = S.scene_for(prompt, rng)
        assert (scene.colour, scene.thing.shape, scene.background) == (prompt.colour, prompt.shape, prompt.background)
    scene = S.scene_for(P.Prompt("circle", background="night", identifier="sks"), rng)
    assert scene.subject == "sks" and scene.background == "night"


def test_instance_images_are_written_and_reproducible(tmp_path):
    paths = S.write_instance_images("zwx", tmp_path, n=4)
    assert [p.name for p in paths] == ["00.png", "01.png", "02.png", "03.png"]
    scenes = S.get_subject("zwx").instance_scenes(4)
    for path, scene in zip(paths, scenes):
        assert np.array_equal(np.asarray(Image.open(path)), W.render(scene))
        assert scene.background == "grass" and scene.subject == "zwx"


def test_instance_masks_mark_exactly_the_subjects_pixels(tmp_path):
    paths = S.write_instance_images("sks", tmp_path, n=4, masks=True)
    for path, scene in zip(paths, S.get_subject("sks").instance_scenes(4)):
        image = np.asarray(Image.open(path)).astype(int)
        mask = np.asarray(Image.open(tmp_path / "masks" / path.name))
        assert mask.shape == image.shape[:2] and np.array_equal(mask, W.render_mask(scene))
        backdrop = np.asarray(W.BACKGROUNDS[scene.background])
        assert (image[mask == 0] == backdrop).all()  # off the mask: only the backdrop
        assert (np.abs(image[mask == 255] - backdrop).sum(axis=1) > 0).all()  # fully on it: the subject's paint
        assert 0.1 < (mask > 0).mean() < 0.6


def test_subject_prompt_sets():
    assert len(S.SUBJECTS) >= 4  # issue 9, gate 4
    assert len({s.shape for s in S.SUBJECTS.values()}) >= 3  # zwx and qlv are both squares (v4)
    assert len({(s.shape, s.look) for s in S.SUBJECTS.values()}) == len(S.SUBJECTS)
    for subject in S.SUBJECTS.values():
        dev, test = subject.prompts("dev"), subject.prompts("test")
        dev_bg, test_bg = {p.background for p in dev}, {p.background for p in test}
        assert len(dev_bg) == 3 and len(test_bg) == 4 and not dev_bg & test_bg
        assert subject.background not in dev_bg | test_bg
        assert all(p.identifier == subject.identifier and p.shape == subject.shape for p in dev + test)
        assert [p.text.replace(f"{subject.identifier} ", "") for p in test] == [p.text for p in subject.class_prompts("test")]
