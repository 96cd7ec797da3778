"""The built-in world's renderer: a scene record (data/shapes.py) to pixels. Plain scenes are drawn here (a
textured background, shapes supersampled and box-filtered down, pixel noise); glyph scenes go to
data/glyphs.py, randomised ones to data/randomise.py. `render_many` renders a range of a split's scenes, in
worker processes.

Every pixel is a pure function of the scene record (its `background` seeds all per-render randomness) and the
image size, so any scene can be re-rendered bit-for-bit.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from vlfm.data.glyphs import render_glyph, render_handwritten
from vlfm.data.randomise import free_scale, render_randomised
from vlfm.data.shapes import (
    _GAP,
    _HALF,
    COLOURS,
    SHAPES,
    SIZE_EXTENT,
    SPLITS,
    Obj,
    Scene,
    ShapesWorld,
    WorldConfig,
)

_SUPERSAMPLE = 4  # draw at 4x, then box-filter down: antialiased edges


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
                                  free_scale(scene.objects, _HALF, _GAP), scene.randomise_factors)  # fmt: skip
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
              else np.asarray(render(sc, config.image_size)) for sc in scenes]  # fmt: skip
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
