"""The miniworld: named palettes, shapes and looks, scene specs, and a numpy renderer.

A scene is one object (a ``Thing``: shape, look, position, size) on a flat named background.
Everything is a frozen dataclass, so a scene is a value that can be captioned, checked by the
evaluator and rendered again bit for bit. Rendering is supersampled 4x and box-filtered, so
edges are anti-aliased and the output depends only on the spec (no PIL drawing, no fonts).

Adding an object kind is a few lines: a shape is a function ``(u, v) -> bool mask`` in the
object's local coordinates (u right, v down, both in [-1, 1] across the object), registered in
``SHAPES``; a look is a small dataclass with ``paint(u, v) -> (H, W, 3)`` colours.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4
MIN_SIZE, MAX_SIZE = 6.0, 11.0  # object half-extent in pixels: objects span 12-22 px of 32

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "sand": (222, 200, 150),
    "grass": (80, 160, 60),
    "sky": (135, 190, 235),
    "snow": (240, 240, 245),
    "night": (25, 30, 70),
    "brick": (160, 70, 50),
    "stone": (128, 128, 128),
    "ocean": (20, 95, 150),
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 220, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

MIN_CONTRAST = 100.0  # RGB distance below which an object would vanish into its background


# --------------------------------------------------------------------------------------
# Shapes: boolean masks in local coordinates (u right, v down, the object spans [-1, 1])
# --------------------------------------------------------------------------------------

def _circle(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85  # about the circle's area


def _triangle(u, v):
    return (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8)  # apex up, base 2 wide


def _diamond(u, v):
    return np.abs(u) + np.abs(v) <= 1.0


def _cross(u, v):
    arm = (np.abs(u) <= 0.32) | (np.abs(v) <= 0.32)
    return arm & (np.maximum(np.abs(u), np.abs(v)) <= 1.0)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
    "cross": _cross,
}


# --------------------------------------------------------------------------------------
# Looks: how an object is painted. Pretraining only ever uses Plain; the others make
# the personalization subjects (and the VAE's generic texture data).
# --------------------------------------------------------------------------------------

def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLOURS[name], dtype=np.float64)


@dataclass(frozen=True)
class Plain:
    """One flat colour from ``COLOURS``."""

    colour: str

    def paint(self, u, v):
        return np.broadcast_to(_rgb(self.colour), u.shape + (3,))


@dataclass(frozen=True)
class Halves:
    """Two colours split down the middle (left ``first``, right ``second``)."""

    first: str
    second: str

    def paint(self, u, v):
        return np.where((u < 0)[..., None], _rgb(self.first), _rgb(self.second))


@dataclass(frozen=True)
class Stripes:
    """``bands`` horizontal bands alternating ``first`` and ``second``, top band ``first``."""

    first: str
    second: str
    bands: int = 4

    def paint(self, u, v):
        band = np.floor((v + 1.0) / 2.0 * self.bands).astype(int) % 2
        return np.where((band == 0)[..., None], _rgb(self.first), _rgb(self.second))


@dataclass(frozen=True)
class Quadrants:
    """A 2x2 checker: ``first`` top-left and bottom-right, ``second`` elsewhere."""

    first: str
    second: str

    def paint(self, u, v):
        same = (u < 0) == (v < 0)
        return np.where(same[..., None], _rgb(self.first), _rgb(self.second))


@dataclass(frozen=True)
class Bullseye:
    """``outer`` with a round ``inner`` dot of relative radius ``radius`` at the centre."""

    outer: str
    inner: str
    radius: float = 0.45

    def paint(self, u, v):
        dot = u * u + v * v <= self.radius**2
        return np.where(dot[..., None], _rgb(self.inner), _rgb(self.outer))


@dataclass(frozen=True)
class Smudge:
    """A plain ``colour`` smeared with ``other``: a smooth blend towards ``other`` along
    direction ``angle`` (radians), reaching ``amount`` at the far edge. What an imperfect
    generation of a plain object looks like; the evaluator learns it is no subject (it is in
    no caption, no subject and no decoy)."""

    colour: str
    other: str
    angle: float
    amount: float

    def paint(self, u, v):
        along = (np.cos(self.angle) * u + np.sin(self.angle) * v + 1.0) / 2.0  # 0..1 across the object
        weight = (self.amount * np.clip(along, 0.0, 1.0))[..., None]
        return (1.0 - weight) * _rgb(self.colour) + weight * _rgb(self.other)


Look = Plain | Halves | Stripes | Quadrants | Bullseye | Smudge
TEXTURES = (Halves, Stripes, Quadrants, Bullseye)  # two-colour looks, never in pretraining


# --------------------------------------------------------------------------------------
# Scene specs
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Thing:
    """One object: a shape from ``SHAPES`` painted with a look, centred at (x, y) pixels,
    ``size`` pixels from its centre to its edge (half-extent)."""

    shape: str
    look: Look
    x: float
    y: float
    size: float

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {', '.join(SHAPES)}")


@dataclass(frozen=True)
class Scene:
    """A background from ``BACKGROUNDS`` and one thing on it; ``subject`` names the
    personalization subject the thing is (None for ordinary world objects)."""

    background: str
    thing: Thing
    subject: str | None = None

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {', '.join(BACKGROUNDS)}")

    @property
    def colour(self) -> str | None:
        """The object's colour name, or None when it is not painted in one flat colour."""
        return self.thing.look.colour if isinstance(self.thing.look, Plain) else None


def contrasts(colour: str, background: str) -> bool:
    """True when a ``colour`` object stays visible on ``background``."""
    return float(np.linalg.norm(_rgb(colour) - np.asarray(BACKGROUNDS[background], float))) >= MIN_CONTRAST


def random_thing(rng: np.random.Generator, shape: str, look: Look) -> Thing:
    """A thing of the given shape and look at a random size and position, fully inside the image."""
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    x, y = rng.uniform(size, IMAGE_SIZE - size, size=2)
    return Thing(shape, look, float(x), float(y), size)


def random_scene(
    rng: np.random.Generator,
    combos: Sequence[tuple[str, str, str]] | None = None,
) -> Scene:
    """A plain-coloured world scene whose (colour, shape, background) is drawn from ``combos``
    (default: every visible combination)."""
    combos = combos if combos is not None else all_combos()
    colour, shape, background = combos[int(rng.integers(len(combos)))]
    return Scene(background, random_thing(rng, shape, Plain(colour)))


# --------------------------------------------------------------------------------------
# Combinations held out of pretraining (the quality gate prompts them)
# --------------------------------------------------------------------------------------

HELDOUT_SEED = 6
HELDOUT_FRACTION = 0.1


@functools.cache
def all_combos() -> tuple[tuple[str, str, str], ...]:
    """Every visible (colour, shape, background) combination, in a fixed order."""
    return tuple(
        (c, s, b)
        for c, s, b in itertools.product(COLOURS, SHAPES, BACKGROUNDS)
        if contrasts(c, b)
    )


@functools.cache
def heldout_combos() -> tuple[tuple[str, str, str], ...]:
    """About 10% of the combinations, never rendered for pretraining.

    Chosen with a fixed seed, and only among triples whose three pairs (colour-shape,
    shape-background, colour-background) all remain in pretraining, so that a held-out
    caption is a new composition of things the model has seen, not an unseen pair.
    """
    combos = all_combos()
    order = np.random.default_rng(HELDOUT_SEED).permutation(len(combos))
    held: list[tuple[str, str, str]] = []
    target = round(HELDOUT_FRACTION * len(combos))
    for i in order:
        candidate = held + [combos[i]]
        if _pairs_covered(combos, set(candidate)):
            held = candidate
        if len(held) == target:
            break
    return tuple(sorted(held, key=combos.index))


@functools.cache
def train_combos() -> tuple[tuple[str, str, str], ...]:
    """The combinations pretraining renders: ``all_combos()`` minus ``heldout_combos()``."""
    held = set(heldout_combos())
    return tuple(c for c in all_combos() if c not in held)


def _pairs_covered(combos, held) -> bool:
    kept = [c for c in combos if c not in held]
    for i, j in ((0, 1), (1, 2), (0, 2)):
        if {(c[i], c[j]) for c in combos} != {(c[i], c[j]) for c in kept}:
            return False
    return True


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render a scene to an (size, size, 3) uint8 RGB array.

    Each pixel is the mean of a 4x4 grid of samples (anti-aliased edges); only the object's
    bounding box is supersampled. ``size`` rescales the scene, whose coordinates are given
    for ``IMAGE_SIZE``.
    """
    background = np.asarray(BACKGROUNDS[scene.background], dtype=np.float64)
    image = np.broadcast_to(background, (size, size, 3)).copy()
    (y0, y1, x0, x1), u, v = _object_samples(scene, size)
    mask = SHAPES[scene.thing.shape](u, v)
    patch = np.where(mask[..., None], scene.thing.look.paint(u, v), background)
    h, w = y1 - y0, x1 - x0
    image[y0:y1, x0:x1] = patch.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_mask(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The object's mask of :func:`render`'s image: (size, size) uint8, each pixel the share
    of its samples on the object (0 background, 255 object, between on the edges)."""
    mask = np.zeros((size, size))
    (y0, y1, x0, x1), u, v = _object_samples(scene, size)
    h, w = y1 - y0, x1 - x0
    inside = SHAPES[scene.thing.shape](u, v).astype(np.float64)
    mask[y0:y1, x0:x1] = inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
    return np.rint(mask * 255).astype(np.uint8)


def _object_samples(scene: Scene, size: int) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
    """The object's bounding box in output pixels (y0, y1, x0, x1) and the object-local
    coordinates (u, v) of its supersamples, each (SUPERSAMPLE * h, SUPERSAMPLE * w)."""
    scale = size / IMAGE_SIZE
    thing = scene.thing
    x0, x1 = _span(thing.x, thing.size, scale, size)
    y0, y1 = _span(thing.y, thing.size, scale, size)
    xs = (np.arange(x0 * SUPERSAMPLE, x1 * SUPERSAMPLE) + 0.5) / SUPERSAMPLE / scale  # scene pixels
    ys = (np.arange(y0 * SUPERSAMPLE, y1 * SUPERSAMPLE) + 0.5) / SUPERSAMPLE / scale
    y, x = np.meshgrid(ys, xs, indexing="ij")
    return (y0, y1, x0, x1), (x - thing.x) / thing.size, (y - thing.y) / thing.size


def _span(centre: float, half: float, scale: float, size: int) -> tuple[int, int]:
    """Output pixel range [start, stop) covering centre +- half (scene units), clipped to the image."""
    start = int(np.floor((centre - half) * scale))
    stop = int(np.ceil((centre + half) * scale))
    return max(start, 0), min(max(stop, start + 1), size)


def render_batch(scenes: Sequence[Scene], size: int = IMAGE_SIZE) -> np.ndarray:
    """Render many scenes to an (N, size, size, 3) uint8 array."""
    return np.stack([render(s, size) for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)


def to_pil(array: np.ndarray):
    """An (H, W, 3) uint8 array as a PIL RGB image."""
    from PIL import Image

    return Image.fromarray(np.asarray(array, dtype=np.uint8), mode="RGB")
