"""Personalization subjects: objects with a two-colour look that pretraining never shows.

Each subject belongs to a class noun of the world (its shape) and is photographed, as in
DreamBooth, a few times on one fixed background at varying positions and sizes. Its prompts
put it on the other backgrounds; those backgrounds are split into ``dev`` (for choices such
as intervals or K) and ``test`` (reported), and every subject prompt has a class prompt twin
(same words without the identifier) for prior preservation and language drift.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import MASK_FOLDER
from .prompts import Prompt
from .world import (
    BACKGROUNDS,
    Bullseye,
    COLOURS,
    SHAPES,
    TEXTURES,
    Halves,
    Look,
    Quadrants,
    Scene,
    Stripes,
    all_combos,
    random_scene,
    random_thing,
    render,
    render_mask,
    to_pil,
)

SPLITS = ("dev", "test")
N_DEV_BACKGROUNDS = 3  # of the 7 backgrounds besides the instance one; the other 4 are test
PROMPT_TEMPLATES = (0, 2)  # phrasings used by the personalization prompt sets


@dataclass(frozen=True)
class Subject:
    """A personalization subject: ``identifier`` token, class noun ``shape``, its ``look``,
    and the ``background`` of its instance images."""

    identifier: str
    shape: str
    look: Look
    background: str
    description: str = ""

    def scene(self, rng: np.random.Generator, background: str | None = None) -> Scene:
        """The subject at a random position and size on ``background`` (default: its own)."""
        thing = random_thing(rng, self.shape, self.look)
        return Scene(background or self.background, thing, subject=self.identifier)

    def instance_scenes(self, n: int = 5, seed: int = 0) -> list[Scene]:
        """The ``n`` instance scenes (same seed, same scenes), all on the subject's background."""
        rng = np.random.default_rng([seed, _stable_id(self.identifier)])
        return [self.scene(rng) for _ in range(n)]

    def instance_prompt(self) -> Prompt:
        """DreamBooth's instance prompt, e.g. ``"a sks circle on a sky background"``."""
        return Prompt(self.shape, background=self.background, identifier=self.identifier)

    def class_prompt(self) -> Prompt:
        """DreamBooth's class prompt, e.g. ``"a circle on a sky background"``."""
        return self.instance_prompt().without_identifier()

    def prompts(self, split: str = "test") -> list[Prompt]:
        """Recontextualization prompts (the subject on other backgrounds) of one split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        others = [b for b in BACKGROUNDS if b != self.background]
        order = np.random.default_rng(_stable_id(self.identifier)).permutation(len(others))
        chosen = order[:N_DEV_BACKGROUNDS] if split == "dev" else order[N_DEV_BACKGROUNDS:]
        return [
            Prompt(self.shape, background=others[i], identifier=self.identifier, template=t)
            for i in sorted(chosen)
            for t in PROMPT_TEMPLATES
        ]

    def class_prompts(self, split: str = "test") -> list[Prompt]:
        """The class twins of ``prompts(split)`` (preservation / language drift)."""
        return [p.without_identifier() for p in self.prompts(split)]


def _stable_id(text: str) -> int:
    return int.from_bytes(text.encode(), "little") % (2**31)  # hash() is salted per process


# Four subjects of rising difficulty: two halves (coarse), a dot in a frame and a 2x2 checker
# (medium), six thin bands (fine detail near what the f4 VAE can carry: 2-4 px per band).
# No plain object of the world resembles one of them (v1's red-and-white zwx was taken for
# a plain red square by the evaluator 7% of the time before any personalization). pkd's bands
# are white and black: blurred, they average to a grey no object of the world has. The
# model's own soft drawings still come close to pkd and zwx now and then; the evaluator's
# per-class null bank bounds that (``metrics.instance_threshold``). qlv's checker sits on a
# square since v4: the base draws diamonds as four-pointed stars. Instance photos are taken
# on a mid-tone backdrop (stone; zwx on grass): photographed on bright sky, snow or sand,
# the subjects did not carry to dark backgrounds after DreamBooth (other backgrounds
# recognised 0.20-0.52 against 0.66-0.94 on stone; ``benchmarks.miniworld.backdrops``).
SUBJECTS: dict[str, Subject] = {
    s.identifier: s
    for s in (
        Subject("sks", "circle", Halves("yellow", "purple"), "stone", "a circle, yellow left half, purple right half"),
        Subject("zwx", "square", Bullseye("orange", "blue"), "grass", "an orange square with a blue dot"),
        Subject("qlv", "square", Quadrants("black", "yellow"), "stone", "a square checkered black and yellow"),
        Subject("pkd", "triangle", Stripes("white", "black", bands=6), "stone",
                "a triangle of six white and black horizontal bands"),
    )
}


# Subjects no model or evaluator is ever trained on (decoys exclude their looks too): the
# evaluator's instance embedding is judged on them (gate 1: nearest-neighbour identification).
UNSEEN_SUBJECTS: tuple[Subject, ...] = (
    Subject("u01", "circle", Stripes("blue", "orange", bands=3), "sky"),
    Subject("u02", "square", Halves("green", "black"), "sky"),
    Subject("u03", "triangle", Quadrants("red", "blue"), "sky"),
    Subject("u04", "diamond", Bullseye("white", "red"), "sky"),
    Subject("u05", "cross", Halves("orange", "blue"), "sky"),
    Subject("u06", "circle", Quadrants("green", "white"), "sky"),
    Subject("u07", "square", Bullseye("purple", "yellow"), "sky"),
    Subject("u08", "cross", Stripes("black", "white", bands=4), "sky"),
)


def get_subject(identifier: str) -> Subject:
    """The bundled subject named by its identifier token ("sks", "zwx", "qlv", "pkd")."""
    if identifier not in SUBJECTS:
        raise KeyError(f"unknown subject {identifier!r}; expected one of {', '.join(SUBJECTS)}")
    return SUBJECTS[identifier]


def write_instance_images(
    identifier: str | Subject, folder: str | os.PathLike, n: int = 5, seed: int = 0, size: int = 32,
    masks: bool = False,
) -> list[Path]:
    """Write a subject's ``n`` instance images as PNGs (``00.png``, ``01.png``...) into ``folder``.
    ``identifier``: a bundled subject's, or a :class:`Subject` the package does not ship.
    With ``masks``, each image's subject mask goes to ``folder/masks/`` under the same name
    (what ``qpdeploy train --background-weight`` reads).

    Returns:
        The written paths, in order. The same arguments always write the same pixels.
    """
    subject = identifier if isinstance(identifier, Subject) else get_subject(identifier)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(subject.instance_scenes(n, seed)):
        path = folder / f"{i:02d}.png"
        to_pil(render(scene, size)).save(path)
        if masks:
            (folder / MASK_FOLDER).mkdir(exist_ok=True)
            Image.fromarray(render_mask(scene, size), "L").save(folder / MASK_FOLDER / path.name)
        paths.append(path)
    return paths


def scene_for(prompt: Prompt, rng: np.random.Generator) -> Scene:
    """A real render of what ``prompt`` asks for: its subject (when it names an identifier of a
    bundled subject) or a plain object of its shape and colour, on its background; unnamed
    attributes are drawn at random among visible combinations."""
    if prompt.identifier is not None:
        return get_subject(prompt.identifier).scene(rng, prompt.background or _choice(rng, BACKGROUNDS))
    options = [
        c for c in all_combos()
        if c[1] == prompt.shape and prompt.colour in (None, c[0]) and prompt.background in (None, c[2])
    ]
    if not options:
        raise ValueError(f"no visible scene for {prompt.text!r} (the colour matches the background)")
    return random_scene(rng, options)


def mixed_scenes(
    rng: np.random.Generator,
    n: int,
    plain: float = 0.55,
    subjects: float = 0.3,
    combos: Sequence[tuple[str, str, str]] | None = None,
    avoid: Sequence[Subject] | None = None,
) -> list[Scene]:
    """A mixture of world objects (drawn from ``combos``, default all), subjects on every
    background, and decoys (two-colour looks that resemble none of ``avoid``, default the
    bundled and unseen subjects), in proportions ``plain``, ``subjects`` and the rest.

    The evaluator learns from all three; the VAE from pretraining objects and decoys
    (``subjects=0``), so it can code two-colour textures without ever seeing a subject.
    """
    avoid = tuple(avoid) if avoid is not None else (*SUBJECTS.values(), *UNSEEN_SUBJECTS)
    combos = combos if combos is not None else all_combos()
    scenes = []
    for _ in range(n):
        r = rng.random()
        if r < plain:
            scenes.append(random_scene(rng, combos))
        elif r < plain + subjects:
            subject = list(SUBJECTS.values())[int(rng.integers(len(SUBJECTS)))]
            scenes.append(subject.scene(rng, _choice(rng, BACKGROUNDS)))
        else:
            scenes.append(_decoy(rng, avoid))
    return scenes


def _choice(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _decoy(rng: np.random.Generator, avoid: Sequence[Subject]) -> Scene:
    while True:
        first, second = rng.choice(list(COLOURS), size=2, replace=False)
        look = _choice(rng, TEXTURES)(str(first), str(second))
        shape = _choice(rng, SHAPES)
        if all(not _resembles(shape, look, s) for s in avoid):
            return Scene(_choice(rng, BACKGROUNDS), random_thing(rng, shape, look))


def _resembles(shape: str, look, subject: Subject) -> bool:
    """Same shape, same kind of texture and same two colours in either order (a decoy that
    differs from a subject only in its band count or colour order would be the subject)."""
    colours = lambda x: {v for v in vars(x).values() if isinstance(v, str)}  # noqa: E731
    return shape == subject.shape and type(look) is type(subject.look) and colours(look) == colours(subject.look)
