"""The built-in world: its vocabulary, `WorldConfig`, the scene records (`Obj`, `Scene`) and `ShapesWorld`,
which samples deterministic scenes of coloured shapes and places their objects (their words:
data/world_text.py; their pixels: data/draw.py).

Everything is a pure function of (config.seed, split, index), so a dataset is just a range of indices: no
files to download, and any scene can be re-rendered bit-for-bit. Some colour+shape combinations are held out
of training ("red circle", ...) so zero-shot evaluation can test composition, not memorisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from vlfm.data.randomise import FACTORS

if TYPE_CHECKING:
    from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (30, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 25),
    "purple": (145, 50, 195),
    "orange": (250, 130, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZES: tuple[str, ...] = ("small", "big")
# Object extent (largest side) as a fraction of the image, from pixels at 64 px; smaller objects are too hard to
# recognise at this resolution (docs/experiments.md §1.2).
SIZE_EXTENT: dict[str, tuple[float, float]] = {"small": (12 / 64, 15 / 64), "big": (22 / 64, 28 / 64)}
SPLITS: tuple[str, ...] = ("train", "val", "heldout", "single")
COLOUR_FREE_STYLES: tuple[str, ...] = ("grey", "off_palette")  # the values of WorldConfig.colour_free_style
MAX_OBJECTS = 4  # captions stay <= 20 words and four objects still fit at 64 px
_SPLIT_CODES = {"train": 0, "val": 1, "heldout": 2, "single": 3, "single_object": 4}
_GAP = 2 / 64  # minimum gap between object boxes, and (half of it) to the image border
# Placement reserves the largest extent a render can draw, so rendered objects can never overlap.
_HALF = {size: hi / 2 for size, (_, hi) in SIZE_EXTENT.items()}


def label(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


ALL_LABELS: tuple[str, ...] = tuple(label(c, s) for c in COLOURS for s in SHAPES)


def _parse_label(text: str) -> tuple[str, str]:
    parts = text.split()
    if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
        raise ValueError(
            f"{text!r} is not a 'colour shape' label; colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}"
        )
    return parts[0], parts[1]


@dataclass
class WorldConfig:
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    object_weights: list[float] | None = None  # probabilities of min..max objects; None: linearly decreasing
    held_out: list[str] = field(
        default_factory=lambda: ["red circle", "green square", "blue triangle", "yellow star", "purple cross"]
    )
    seed: int = 0
    # Fraction of training scenes whose captions name no colour ("a circle left of a star"). Without them the image tower learns colour-specific shape detectors and misreads the shape of a
    # held-out combination (docs/experiments.md §1.2).
    colour_free_fraction: float = 0.0
    # How a colour-free scene's objects are drawn. "grey": each at a random grey level, the picture greyscale.
    # "off_palette": each in a random colour far from every named colour (pink, teal, lime, greys, ...; never
    # one the captions could name). Shapes then come in many more colours than the six, and the tower's shape
    # detectors stop depending on the colour (docs/experiments.md §2).
    colour_free_style: str = "grey"
    # Fraction of train and val scenes that show one rendered digit glyph instead of shapes (data/glyphs.py):
    # captions such as "the digit 7", for zero-shot digit recognition on real handwriting.
    glyph_fraction: float = 0.0
    # Share of those glyph scenes drawn as synthetic handwriting (pen strokes, data/handwriting.py) instead of in a
    # font: the fonts a machine has look nothing like handwriting. 0 draws every glyph in a font, as before.
    glyph_handwritten: float = 0.0
    # Domain randomisation (data/randomise.py): how often and how far each drawing factor that should not matter
    # (background, scale, rotation, outline, edges, resizing, noise, blur, JPEG) varies in training scenes; 0 draws
    # the plain world. Evaluation scenes stay plain: the in-domain benchmark.
    randomise: float = 0.0
    # Fraction of training scenes drawn randomised (the rest plain) when `randomise` > 0.
    randomise_fraction: float = 1.0
    # Which factors vary (data/randomise.py FACTORS, e.g. [turn, proportions]); null: all of them.
    randomise_factors: list[str] | None = None

    # keys of earlier versions (config.yaml of older runs) -> their names now
    RENAMED: ClassVar[dict[str, str]] = {"grey_fraction": "colour_free_fraction", "grey_colours": "colour_free_style"}

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"world.image_size={self.image_size} is too small to draw shapes; use >= 32")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"world needs 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        n_counts = self.max_objects - self.min_objects + 1
        if self.object_weights is not None:
            w = list(self.object_weights)
            if len(w) != n_counts or not all(isinstance(x, (int, float)) and 0 <= x < float("inf") for x in w) or sum(w) <= 0:
                raise ValueError(
                    f"world.object_weights={w} must hold {n_counts} non-negative weights (one per object count "
                    f"{self.min_objects}..{self.max_objects}) with a positive sum"
                )
        if isinstance(self.held_out, str) or not isinstance(self.held_out, (list, tuple)):
            raise TypeError(f"world.held_out={self.held_out!r} must be a list of 'colour shape' strings")
        for text in self.held_out:
            _parse_label(text)
        if len(set(self.held_out)) != len(self.held_out):
            raise ValueError(f"world.held_out={self.held_out} lists a combination twice")
        if len(ALL_LABELS) - len(self.held_out) < self.max_objects:
            raise ValueError(
                f"world.held_out leaves {len(ALL_LABELS) - len(self.held_out)} combinations for training, "
                f"fewer than max_objects={self.max_objects}; hold out fewer"
            )
        if not 0.0 <= self.colour_free_fraction < 1.0:
            raise ValueError(f"world.colour_free_fraction={self.colour_free_fraction} must be in [0, 1)")
        if self.colour_free_style not in COLOUR_FREE_STYLES:
            raise ValueError(f"world.colour_free_style={self.colour_free_style!r} is not one of: {', '.join(COLOUR_FREE_STYLES)}")
        if not 0.0 <= self.glyph_fraction < 1.0:
            raise ValueError(f"world.glyph_fraction={self.glyph_fraction} must be in [0, 1)")
        if not 0.0 <= self.glyph_handwritten <= 1.0:
            raise ValueError(f"world.glyph_handwritten={self.glyph_handwritten} must be in [0, 1]")
        if not 0.0 <= self.randomise <= 1.0:
            raise ValueError(f"world.randomise={self.randomise} must be in [0, 1]")
        if not 0.0 < self.randomise_fraction <= 1.0:
            raise ValueError(f"world.randomise_fraction={self.randomise_fraction} must be in (0, 1]")
        if self.randomise_factors is not None:
            if isinstance(self.randomise_factors, str) or not all(f in FACTORS for f in self.randomise_factors):
                raise ValueError(f"world.randomise_factors={self.randomise_factors!r} must be a list of: {', '.join(FACTORS)}")
        if self.seed < 0:
            raise ValueError(f"world.seed={self.seed} must be >= 0")


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    x: float  # centre, in [0, 1] image coordinates (y grows downwards)
    y: float

    @property
    def label(self) -> str:
        return label(self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: int  # seeds the background texture and all per-render jitter
    grey: bool = False  # its captions and questions never name a colour; drawn as world.colour_free_style says
    off_palette: bool = False  # a grey scene whose objects take colours outside the palette
    digit: int | None = None  # a glyph scene: one rendered digit and no shapes
    randomised: float = 0.0  # domain randomisation strength it is drawn with (data/randomise.py)
    # A glyph scene drawn as synthetic handwriting, not in a font. Left out of repr, so the records of every world
    # without handwriting print (and hash, tests/test_shapes_pinned.py) as before; == still compares it.
    handwritten: bool = field(default=False, repr=False)
    # The randomised factors (world.randomise_factors; None: all), out of repr for the same reason.
    randomise_factors: tuple[str, ...] | None = field(default=None, repr=False)


class ShapesWorld:
    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        held = set(self.config.held_out)
        self.held_out_labels = [t for t in ALL_LABELS if t in held]
        self.seen_labels = [t for t in ALL_LABELS if t not in held]
        n_counts = self.config.max_objects - self.config.min_objects + 1
        w = np.asarray(self.config.object_weights or range(n_counts, 0, -1), dtype=float)
        self._count_p = w / w.sum()

    def scene(self, split: str, index: int) -> Scene:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        rng = self._rng(split, index)
        if split == "single":
            return self._make_scene(rng, ALL_LABELS, 1)
        if self.config.glyph_fraction and split in ("train", "val") and rng.random() < self.config.glyph_fraction:
            background, digit = int(rng.integers(2**31)), int(rng.integers(10))
            # Drawn last and only when asked for, so worlds without handwriting draw exactly the numbers they did.
            hand = bool(self.config.glyph_handwritten) and rng.random() < self.config.glyph_handwritten
            return Scene((), background, digit=digit, handwritten=hand)
        labels = self.held_out_labels if split == "heldout" else self.seen_labels
        if not labels:
            raise ValueError("split 'heldout' needs a non-empty world.held_out")
        n = self.config.min_objects + int(rng.choice(len(self._count_p), p=self._count_p))
        scene = self._make_scene(rng, labels, min(n, len(labels)))
        if split == "train" and self.config.colour_free_fraction and rng.random() < self.config.colour_free_fraction:
            scene = replace(scene, grey=True, off_palette=self.config.colour_free_style == "off_palette")
        if split == "train" and self.config.randomise and rng.random() < self.config.randomise_fraction:
            factors = self.config.randomise_factors
            scene = replace(scene, randomised=self.config.randomise, randomise_factors=None if factors is None else tuple(factors))
        return scene

    def single_object_scene(self, index: int, combos: list[str]) -> Scene:
        """One object whose combination is combos[index % len(combos)]: zero-shot classification sets."""
        if not combos:
            raise ValueError("single_object_scene needs at least one 'colour shape' combination")
        return self._make_scene(self._rng("single_object", index), [combos[index % len(combos)]], 1)

    def render(self, scene: Scene) -> Image.Image:
        from vlfm.data.draw import render  # here, not at the top: data/draw.py imports this module

        return render(scene, self.config.image_size)

    def _rng(self, split: str, index: int) -> np.random.Generator:
        if index < 0:
            raise ValueError(f"scene index must be >= 0, got {index}")
        # A list seed goes through SeedSequence: streams for nearby indices are independent, and unlike
        # hash() it is the same in every process and Python version.
        return np.random.default_rng([self.config.seed, _SPLIT_CODES[split], index])

    def _make_scene(self, rng: np.random.Generator, labels: list[str], n: int) -> Scene:
        # Distinct colour+shape combinations, so "the red circle" always names exactly one object.
        picks = [_parse_label(labels[k]) for k in rng.choice(len(labels), size=n, replace=False)]
        sizes = [SIZES[i] for i in rng.integers(0, 2, size=n)]
        # Big objects first: on an empty canvas they always fit, and the small ones fill the gaps after.
        todo = sorted(zip(sizes, picks), key=lambda t: t[0] != "big")
        for attempt in range(1, 1000):
            objects: list[Obj] = []
            for size, combo in todo:
                obj = _place(rng, combo, size, objects)
                if obj is None:
                    break
                objects.append(obj)
            else:
                return Scene(tuple(objects), int(rng.integers(2**31)))
            if attempt % 20 == 0 and any(size == "big" for size, _ in todo):
                # Too crowded (two big objects need most of the width): shrink the last big one.
                i = max(j for j, (size, _) in enumerate(todo) if size == "big")
                todo[i] = ("small", todo[i][1])
        raise RuntimeError(f"could not place {n} objects without overlap")  # unreachable for <= MAX_OBJECTS


def _place(rng: np.random.Generator, combo: tuple[str, str], size: str, others: list[Obj]) -> Obj | None:
    """Rejection-sample a centre whose box keeps clear of the image border and of the other boxes."""
    h = _HALF[size]
    lo, hi = h + _GAP / 2, 1 - h - _GAP / 2
    clear = [(o.x, o.y, h + _HALF[o.size] + _GAP) for o in others]
    for _ in range(30):
        x, y = rng.uniform(lo, hi, size=2).tolist()  # Python floats: the same doubles, cheaper arithmetic
        if all(abs(x - ox) >= d or abs(y - oy) >= d for ox, oy, d in clear):
            return Obj(combo[0], combo[1], size, x, y)
    return None
