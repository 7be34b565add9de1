"""Captions of the miniworld, built from a structured ``Prompt`` spec, and its tokenizer.

A prompt says which attributes it asks for (shape always; colour, background and a subject
identifier optionally) and which phrasing template it uses, so the evaluator can check a
generated image against exactly what was asked. Captions never contain punctuation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .world import BACKGROUNDS, COLOURS, SHAPES, Scene, heldout_combos

# Identifier tokens: known but weak, like "sks" in Stable Diffusion. Pretraining captions carry
# one at random now and then (``describe``'s ``identifier_rate``), unrelated to the picture, so
# the model reads "a sks circle" as a plain circle until personalization gives the word a
# look. The first four name the bundled subjects; the spares let a new subject be added
# without a new tokenizer.
IDENTIFIERS = ("sks", "zwx", "qlv", "pkd", "vyt", "bnq", "hjx", "tzr")
MAX_LENGTH = 16  # tokens, <bos> and <eos> included; the longest caption has 13

TEMPLATES = (
    "{a} {thing} on {a_bg} {background} background",
    "a photo of {a} {thing} on {a_bg} {background} background",
    "{a} {thing} in front of {a_bg} {background} background",
    "{a_bg} {background} background with {a} {thing}",
)
BARE_TEMPLATES = ("{a} {thing}", "a photo of {a} {thing}")  # prompts without a background
GLUE_WORDS = ("a", "an", "photo", "of", "on", "in", "front", "background", "with")


@dataclass(frozen=True)
class Prompt:
    """What a caption asks for: a shape, optionally its colour, the background and a subject
    identifier, phrased with template number ``template`` (``TEMPLATES`` when a background is
    given, else ``BARE_TEMPLATES``)."""

    shape: str
    colour: str | None = None
    background: str | None = None
    identifier: str | None = None
    template: int = 0

    def __post_init__(self):
        _check(self.shape, SHAPES, "shape")
        _check(self.colour, COLOURS, "colour")
        _check(self.background, BACKGROUNDS, "background")
        _check(self.identifier, IDENTIFIERS, "identifier")
        templates = TEMPLATES if self.background else BARE_TEMPLATES
        if not 0 <= self.template < len(templates):
            raise ValueError(f"template {self.template} out of range 0..{len(templates) - 1}")

    @property
    def text(self) -> str:
        """The caption, e.g. ``"a red circle on a sand background"``."""
        thing = " ".join(w for w in (self.identifier, self.colour, self.shape) if w)
        if self.background is None:
            return BARE_TEMPLATES[self.template].format(a=_article(thing), thing=thing)
        return TEMPLATES[self.template].format(
            a=_article(thing), thing=thing, a_bg=_article(self.background), background=self.background
        )

    def without_identifier(self) -> "Prompt":
        """The class prompt of a subject prompt (same attributes and phrasing, no identifier)."""
        return replace(self, identifier=None)


def parse_prompt(text: str) -> Prompt:
    """The ``Prompt`` spec whose caption is ``text`` (the inverse of ``Prompt.text``).

    Raises:
        ValueError: ``text`` is not a miniworld caption (naming the first word it cannot place).
    """
    words = text.lower().split()
    found: dict[str, list[str]] = {"shape": [], "colour": [], "background": [], "identifier": []}
    for word in words:
        for what, names in (("shape", SHAPES), ("colour", COLOURS), ("background", BACKGROUNDS),
                            ("identifier", IDENTIFIERS)):
            if word in names:
                found[what].append(word)
                break
        else:
            if word not in GLUE_WORDS:
                raise ValueError(f"{text!r} is not a miniworld prompt: {word!r} is not in its vocabulary")
    if len(found["shape"]) != 1 or any(len(v) > 1 for v in found.values()):
        raise ValueError(f"{text!r} is not a miniworld prompt: it must name one shape and at most one colour, "
                         "background and identifier")
    attributes = {k: (v[0] if v else None) for k, v in found.items()}
    templates = TEMPLATES if attributes["background"] else BARE_TEMPLATES
    for template in range(len(templates)):
        prompt = Prompt(**attributes, template=template)
        if prompt.text == " ".join(words):
            return prompt
    raise ValueError(f"{text!r} is not a miniworld prompt: its words are known but not in a caption's order")


def _check(value, allowed, what: str) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def vocabulary() -> list[str]:
    """Every word a miniworld caption can use, in a fixed order (the tokenizer's ids)."""
    return [*GLUE_WORDS, *COLOURS, *SHAPES, *BACKGROUNDS, *IDENTIFIERS]


def build_tokenizer():
    """The miniworld's word-level tokenizer (``qpdeploy.tokenizer.build_word_tokenizer``)."""
    from ..tokenizer import build_word_tokenizer

    return build_word_tokenizer(vocabulary(), max_length=MAX_LENGTH)


def describe(
    scene: Scene,
    rng: np.random.Generator,
    drop_colour: float = 0.15,
    drop_background: float = 0.1,
    identifier_rate: float = 0.0,
) -> Prompt:
    """A random pretraining caption for a world scene (no subject).

    The colour or the background is left out of some captions, so the model also learns
    prompts such as ``"a circle on a sand background"`` (the class prompts of DreamBooth).
    A two-colour object (a decoy look) is captioned without a colour: the vocabulary has no
    words for looks, as real captions rarely say how an object is patterned.
    With probability ``identifier_rate`` the caption also carries a random identifier token
    that says nothing about the picture (known-but-weak identifiers, see ``IDENTIFIERS``).
    """
    if scene.subject is not None:
        raise ValueError(f"pretraining captions describe world scenes, not subject {scene.subject!r}")
    colour = None if rng.random() < drop_colour else scene.colour
    background = None if rng.random() < drop_background else scene.background
    n_templates = len(TEMPLATES if background else BARE_TEMPLATES)
    template = int(rng.integers(n_templates))
    identifier = IDENTIFIERS[int(rng.integers(len(IDENTIFIERS)))] if identifier_rate and rng.random() < identifier_rate else None
    return Prompt(scene.thing.shape, colour, background, identifier=identifier, template=template)


def prompt_for(scene: Scene, template: int = 0) -> Prompt:
    """The full caption of a plain-coloured scene (colour, shape and background)."""
    if scene.colour is None:
        raise ValueError("prompt_for describes plain-coloured scenes; use Subject.prompt for subjects")
    return Prompt(scene.thing.shape, scene.colour, scene.background, template=template)


def heldout_prompts(templates: tuple[int, ...] = (0,)) -> list[Prompt]:
    """Full captions of the (colour, shape, background) combinations held out of pretraining."""
    return [Prompt(s, c, b, template=t) for c, s, b in heldout_combos() for t in templates]



def calibration_prompts(n: int = 16, seed: int = 0) -> list[str]:
    """``n`` distinct pretraining captions (seeded), shipped beside the pipeline as its
    ``calibration_prompts.txt``: the built-in English calibration list is mostly unknown
    words to this vocabulary."""
    from .world import random_scene, train_combos

    rng = np.random.default_rng(seed)
    prompts: dict[str, None] = {}
    while len(prompts) < n:
        prompts[describe(random_scene(rng, train_combos()), rng, 0.0, 0.0).text] = None
    return list(prompts)
