"""The built-in world: deterministic scenes of coloured shapes (their words: data/world_text.py).

Everything is a pure function of (config.seed, split, index), so a dataset is just a range of indices: no
files to download, and any scene can be re-rendered bit-for-bit. Some colour+shape combinations are held out
of training ("red circle", ...) so zero-shot evaluation can test composition, not memorisation.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw

from vlfm.data.glyphs import render_glyph, render_handwritten
from vlfm.data.randomise import free_scale, render_randomised

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
_SUPERSAMPLE = 4  # draw at 4x, then box-filter down: antialiased edges


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
            scene = replace(scene, randomised=self.config.randomise)
        return scene

    def single_object_scene(self, index: int, combos: list[str]) -> Scene:
        """One object whose combination is combos[index % len(combos)]: zero-shot classification sets."""
        if not combos:
            raise ValueError("single_object_scene needs at least one 'colour shape' combination")
        return self._make_scene(self._rng("single_object", index), [combos[index % len(combos)]], 1)

    def render(self, scene: Scene) -> Image.Image:
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


# ----------------------------------------------------------------------------------------------- rendering


@lru_cache(maxsize=8)
def _axis(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + 0.5) / n  # pixel centres in [0, 1]


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Low-saturation, mid-to-light texture, so every object colour stays identifiable on it."""
    # Each texture is a function of x (columns) plus one of y (rows): computed on the axis and broadcast, the same
    # values as on a full grid at a fraction of the work.
    x, y = _axis(n)[None, :], _axis(n)[:, None]
    base = rng.uniform(130, 215) + rng.uniform(-10, 10, size=3)  # a grey with a faint tint
    kind = int(rng.integers(4))
    if kind == 0:  # flat tint
        tex = np.zeros((n, n), dtype=np.float32)
    elif kind == 1:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * np.pi)
        tex = rng.uniform(20, 45) * ((x - 0.5) * np.cos(a) + (y - 0.5) * np.sin(a))
    elif kind == 2:  # soft stripes, two close greys
        a = rng.choice([0, np.pi / 2, np.pi / 4, 3 * np.pi / 4])
        period = rng.uniform(5, 12) / 64
        tex = rng.uniform(6, 12) * np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period)
    else:  # checker, two close greys
        cell = rng.uniform(6, 14) / 64
        tex = rng.uniform(5, 11) * (((x // cell + y // cell) % 2) * 2 - 1)
    return tex[..., None] + base.astype(np.float32)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, rx: float, ry: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
    elif shape == "triangle":  # pointing up
        draw.polygon([(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)], fill=fill)
    elif shape == "star":  # five points; a fat inner radius keeps the points visible on small stars
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        cy += 0.1 * ry  # a star's points reach lower less far than its top: centre it in its box
        draw.polygon(
            [(cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)) for r, t in zip(rad, ang)], fill=fill
        )
    elif shape == "cross":  # plus sign
        t = 0.34 * min(rx, ry)
        draw.rectangle((cx - rx, cy - t, cx + rx, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - ry, cx + t, cy + ry), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def _grey_level(rng: np.random.Generator, background: float) -> int:
    """A grey scene's object intensity: uniform over what contrasts with the background, whatever the object's
    colour. Converting the colour render instead would keep each colour's luminance, a colour cue the tower could
    learn shapes by."""
    lo, hi = max(0.0, background - 45), min(255.0, background + 45)  # too close to the background
    level = rng.uniform(0, 255 - (hi - lo))
    return int(level if level < lo else level + (hi - lo))


_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
_PALETTE_RGB = [tuple(map(float, c)) for c in COLOURS.values()]
_OFF_PALETTE = 90.0  # an off-palette colour's least RGB distance to a named colour (render jitter is +-15 a channel)


def _off_palette(rng: np.random.Generator, background: float) -> np.ndarray:
    """An off-palette grey scene's object colour: uniform over the colours at least _OFF_PALETTE from every named
    colour whose mean stands 30 levels clear of the background (greys among them)."""
    while True:
        # Python floats in numpy's order of operations (norm: sqrt of the sum of squares; mean: sum / 3), so the
        # same colours pass, at a fraction of the cost of numpy calls on 3 numbers.
        r, g, b = colour = rng.uniform(0, 255, size=3).tolist()
        diffs = ((pr - r, pg - g, pb - b) for pr, pg, pb in _PALETTE_RGB)
        near = min(math.sqrt(dr * dr + dg * dg + db * db) for dr, dg, db in diffs)
        if near > _OFF_PALETTE and abs((r + g + b) / 3 - background) > 30:
            return np.array(colour)


def _colour(scene: Scene, obj: Obj, rng: np.random.Generator, background: float) -> np.ndarray:
    """An object's colour: its named colour jittered, or for a colour-free scene a grey level or off-palette colour."""
    jitter = rng.integers(-15, 16, size=3).tolist()  # drawn for every scene: later draws stay where they are
    colour = np.array([min(255, max(0, c + d)) for c, d in zip(COLOURS[obj.colour], jitter)])
    if scene.off_palette:
        return _off_palette(rng, background)
    return np.full(3, _grey_level(rng, background)) if scene.grey else colour


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    if scene.digit is not None:
        return (render_handwritten if scene.handwritten else render_glyph)(scene.digit, scene.background, image_size)
    if scene.randomised:
        image = render_randomised(scene, image_size, scene.randomised, SIZE_EXTENT,
                                  lambda obj, rng, back: _colour(scene, obj, rng, back), _PALETTE,
                                  free_scale(scene.objects, _HALF, _GAP))  # fmt: skip
        return image.convert("L").convert("RGB") if scene.grey and not scene.off_palette else image
    return Image.fromarray(_render_plain(scene, image_size))


def _render_plain(scene: Scene, n: int) -> np.ndarray:
    rng = np.random.default_rng(scene.background % 2**32)
    s = n * _SUPERSAMPLE
    back = _background(rng, n)
    small = np.clip(back, 0, 255).astype(np.uint8)
    bg = Image.fromarray(small).resize((s, s), Image.NEAREST)
    draw = ImageDraw.Draw(bg)
    background = float(back.mean())
    for obj in scene.objects:
        lo, hi = SIZE_EXTENT[obj.size]
        extent = rng.uniform(lo, hi) * s
        rx, ry = extent / 2 * rng.uniform(0.92, 1.0, size=2)  # a little aspect jitter, never beyond the box
        colour = _colour(scene, obj, rng, background)
        _draw(draw, obj.shape, obj.x * s, obj.y * s, rx, ry, tuple(int(c) for c in colour))
        # Off the objects each 4x4 block holds one background value, which the box filter returns unchanged:
        # only the objects' footprints need downsampling (PIL's box filter, so the same rounding as a full resize).
        x0, y0, x1, y1 = _footprint(obj.x * n, obj.y * n, max(rx, ry) / _SUPERSAMPLE, n)
        region = tuple(v * _SUPERSAMPLE for v in (x0, y0, x1, y1))
        small[y0:y1, x0:x1] = np.asarray(bg.resize((x1 - x0, y1 - y0), Image.BOX, box=region))
    # Pixel noise after compositing: objects are not flat colour either, so colour is a region statistic.
    img = small.astype(np.float32) + rng.normal(0, rng.uniform(3, 8), size=(n, n, 1))
    img += rng.normal(0, 2, size=(n, n, 3))
    img += 0.5
    image = np.clip(img, 0, 255, out=img).astype(np.uint8)
    return _greyscale(image) if scene.grey and not scene.off_palette else image


def _footprint(cx: float, cy: float, r: float, n: int) -> tuple[int, int, int, int]:
    """Output pixels an object of radii <= r around (cx, cy) can touch; the margin: stars sit low, edges spill."""
    m = 1.25 * r + 2
    return max(0, int(cx - m)), max(0, int(cy - m)), min(n, int(cx + m) + 1), min(n, int(cy + m) + 1)


def _greyscale(image: np.ndarray) -> np.ndarray:
    """PIL's convert("L").convert("RGB") in integers, exactly: L = (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    grey = (image.astype(np.uint32) @ np.array([19595, 38470, 7471], dtype=np.uint32) + 0x8000) >> 16
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


def _render_chunk(args: tuple[WorldConfig, str, int, int]) -> tuple[np.ndarray, list[Scene]]:
    config, split, start, n = args  # top level: picklable under spawn, fork and forkserver
    world = ShapesWorld(config)
    scenes = [world.scene(split, i) for i in range(start, start + n)]
    arrays = [_render_plain(sc, config.image_size) if sc.digit is None and not sc.randomised
              else np.asarray(world.render(sc)) for sc in scenes]  # fmt: skip
    return np.stack(arrays), scenes


def render_many(
    world: ShapesWorld, split: str, n: int, start: int = 0, workers: int = 2
) -> tuple[np.ndarray, list[Scene]]:
    """Scenes start..start+n-1 of `split` as uint8 [n, 3, H, W] (channels first, as models take them) plus their
    Scene records."""
    size = world.config.image_size
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    chunk = max(1, min(1000, -(-n // max(1, 4 * workers))))  # >= 4 chunks a worker evens out the load
    jobs = [(world.config, split, a, min(chunk, start + n - a)) for a in range(start, start + n, chunk)]
    scenes: list[Scene] = []
    pool = mp.get_context().Pool(min(workers, len(jobs))) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(_render_chunk, jobs) if pool else map(_render_chunk, jobs)
        for (_, _, a, m), (imgs, scs) in zip(jobs, results):
            images[a - start : a - start + m] = imgs.transpose(0, 3, 1, 2)
            scenes.extend(scs)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return images, scenes
