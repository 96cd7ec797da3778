"""shapes-ood: coloured shapes drawn by a renderer written apart from the world's, for evaluation only.

The built-in world (data/draw.py) draws with PIL's ImageDraw on textured light-grey backgrounds. This renderer
shares none of that code and none of its constants: it builds each shape as a numpy coverage mask (an implicit
test per pixel, 3x3 samples a pixel), in its own palette shades and proportions (an equilateral triangle, a
thinner star and cross), large and centred-ish as clip-art is, often rotated, with a dark (or, on a dark
background, light) outline and a soft drop shadow, on white, pastel or dark slate backgrounds, at 96 px (the
model's preprocessing resizes it). Only the names are the world's: "colour shape" labels, 30 classes; and
`render_scene` draws a world scene's records (where each object is, its size word) in this style, for VQA.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageColor

from vlfm.data.shapes import ALL_LABELS

SIZE = 96
_SAMPLES = 3  # coverage samples per pixel and axis: anti-aliased edges
# Shades of each named colour unlike the world's (nearer web and plotting palettes).
_HEX = {"red": "#cd1e32", "green": "#329141", "blue": "#2869cd", "yellow": "#f0de3c", "purple": "#803eac",
        "orange": "#ee7620"}  # fmt: skip
OOD_COLOURS: dict[str, tuple[int, int, int]] = {name: ImageColor.getrgb(code) for name, code in _HEX.items()}
_MAX_TURN = {"circle": 0.0, "square": 30.0, "triangle": 20.0, "star": 36.0, "cross": 25.0}  # degrees


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points (u, v) (unit coordinates about the shape's centre, v down) fall inside the shape."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "cross":
        arm = 0.27
        return ((np.abs(u) <= arm) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= arm) & (np.abs(u) <= 0.95))
    if shape == "triangle":  # equilateral, a vertex up, inscribed in the unit circle
        normals = [(np.cos(a), np.sin(a)) for a in np.deg2rad([90, 210, 330])]  # outward normals (v down)
        return np.all([u * nx + v * ny <= 0.5 for nx, ny in normals], axis=0)
    if shape == "star":  # five points, inner radius 0.4: inside when under the boundary in polar form
        r, theta = np.hypot(u, v), np.mod(np.arctan2(v, u) + np.pi / 2, 2 * np.pi / 5)
        t = np.abs(theta / (2 * np.pi / 5) - 0.5) * 2  # 1 at a point's tip direction, 0 between two points
        inner, outer, half = 0.4, 1.0, np.pi / 5
        # the straight edge from the inner vertex (angle half) to the tip (angle 0), intersected with the ray
        phi = (1 - t) * half
        tip, valley = np.array([outer, 0.0]), np.array([inner * np.cos(half), inner * np.sin(half)])
        d = valley - tip
        denom = np.cos(phi) * d[1] - np.sin(phi) * d[0]
        boundary = (tip[0] * d[1] - tip[1] * d[0]) / denom
        return r <= boundary
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(shape: str, n: int, cx: float, cy: float, radius: float, turn: float) -> np.ndarray:
    """(n, n) fraction of each pixel inside the shape centred at (cx, cy) pixels, `radius` pixels, turned."""
    lo = [max(0, int(c - radius) - 2) for c in (cx, cy)]  # only the shape's box is sampled
    hi = [min(n, int(c + radius) + 3) for c in (cx, cy)]
    offsets = (np.arange(_SAMPLES) + 0.5) / _SAMPLES
    x, y = ((np.arange(a, b)[:, None] + offsets[None, :]).reshape(-1) for a, b in zip(lo, hi))
    x, y = np.meshgrid(x, y)
    cos, sin = np.cos(turn), np.sin(turn)
    u, v = ((x - cx) * cos + (y - cy) * sin) / radius, (-(x - cx) * sin + (y - cy) * cos) / radius
    h, w = hi[1] - lo[1], hi[0] - lo[0]
    out = np.zeros((n, n))
    out[lo[1] : hi[1], lo[0] : hi[0]] = _inside(shape, u, v).reshape(h, _SAMPLES, w, _SAMPLES).mean(axis=(1, 3))
    return out


def _paper(rng: np.random.Generator, n: int) -> tuple[np.ndarray, bool]:
    """The background (n, n, 3) and whether it is dark."""
    kind = rng.choice(["white", "pastel", "slate"], p=[0.45, 0.35, 0.2])
    if kind == "white":
        return np.full((n, n, 3), rng.uniform(240, 255)), False
    if kind == "slate":
        return np.full((n, n, 3), rng.uniform(25, 60)) + rng.uniform(-6, 6, size=3), True
    top, bottom = 255 - rng.uniform(10, 50, size=3), 255 - rng.uniform(10, 50, size=3)
    w = np.linspace(0, 1, n)[:, None, None]
    return np.broadcast_to(top * (1 - w) + bottom * w, (n, n, 3)).copy(), False


def draw(colour: str, shape: str, seed: int) -> Image.Image:
    """One object of the named colour and shape, SIZE x SIZE RGB."""
    rng = np.random.default_rng([seed, 3003])
    n = SIZE
    canvas, dark = _paper(rng, n)
    radius = rng.uniform(0.17, 0.38) * n
    cx, cy = rng.uniform(radius + 2, n - radius - 2, size=2)
    canvas = _paint(canvas, dark, colour, shape, cx, cy, radius, rng)
    return _finish(canvas, rng)


def render_scene(scene, image_size: int = SIZE) -> Image.Image:
    """A scene of the world (its objects' colour, shape, size word and centre in [0, 1]) drawn in this style
    at SIZE, then resized to image_size: the same questions hold, the drawing is another's. A size word is a
    radius of its own here, inside the box the world keeps clear around each object."""
    if getattr(scene, "digit", None) is not None or getattr(scene, "grey", False):
        raise ValueError("shapes-ood draws the named colours of shapes: not a digit or a colour-free scene")
    rng = np.random.default_rng([scene.background % 2**32, 3004])
    n = SIZE
    canvas, dark = _paper(rng, n)
    for obj in scene.objects:
        radius = rng.uniform(*_SCENE_RADIUS[obj.size]) * n
        canvas = _paint(canvas, dark, obj.colour, obj.shape, obj.x * n, obj.y * n, radius, rng)
    image = _finish(canvas, rng)
    return image if image_size == n else image.resize((image_size, image_size), Image.BICUBIC)


_SCENE_RADIUS = {"small": (0.085, 0.105), "big": (0.16, 0.195)}  # fractions of the image


def _paint(canvas: np.ndarray, dark: bool, colour: str, shape: str, cx: float, cy: float, radius: float,
           rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """The canvas with one object painted: turned, maybe a drop shadow, maybe an outline, then the fill."""
    n = canvas.shape[0]
    turn = np.deg2rad(rng.uniform(-1, 1) * _MAX_TURN[shape])
    if rng.random() < 0.5:  # a soft drop shadow, down and to the right
        shadow = _coverage(shape, n, cx + 0.06 * radius, cy + 0.08 * radius, radius, turn)[..., None]
        canvas = canvas * (1 - 0.35 * shadow)
    fill = np.clip(np.array(OOD_COLOURS[colour]) + rng.uniform(-10, 10, size=3), 0, 255)
    body = _coverage(shape, n, cx, cy, radius, turn)[..., None]
    if rng.random() < 0.7:  # an outline: the shape, a few pixels larger, in ink under the fill
        ink = np.full(3, 235.0 if dark else 20.0)
        border = _coverage(shape, n, cx, cy, radius + rng.uniform(1.5, 3.5), turn)[..., None]
        canvas = canvas * (1 - border) + ink * border
        body = _coverage(shape, n, cx, cy, radius - 0.5, turn)[..., None]
    return canvas * (1 - body) + fill * body


def _finish(canvas: np.ndarray, rng: np.random.Generator) -> Image.Image:
    canvas = canvas + rng.normal(0, 2.0, size=canvas.shape)
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))


def ood_set(per_class: int = 20, seed: int = 0) -> tuple[list[Image.Image], list[int]]:
    """per_class drawings of each of the 30 labels (ALL_LABELS order) and their label indices."""
    images, targets = [], []
    for i in range(per_class * len(ALL_LABELS)):
        k = i % len(ALL_LABELS)
        colour, shape = ALL_LABELS[k].split()
        images.append(draw(colour, shape, seed * 1_000_003 + i))
        targets.append(k)
    return images, targets
