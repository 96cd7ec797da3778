"""Domain randomisation for the built-in world (`world.randomise`): the same scenes drawn in varied styles.

What a scene shows (its objects' colours, shapes, relative sizes and places) and so its captions stay exactly as
data/shapes.py makes them; what should not matter varies: the background (plain, gradient, stripes, checks or
blotches, in any colour and brightness that keeps the objects visible), a per-scene scale from small to filling
the free space, each object's aspect ratio, proportions (a star's points, a cross's arms) and rotation, filled,
outlined or bordered drawing and the stroke width, a drop shadow, a colour shade within its name, anti-aliased
or hard edges, the size drawn at before resizing, brightness and contrast, noise, blur and JPEG artefacts.
`strength` (0..1) is how often and how far each factor departs from the plain world. A pure function of the
scene, like the plain render (data/draw.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlfm.io import read_image

# Unit outlines (x right, y down, extent 2: from -1 to 1), drawn as polygons so every shape can rotate. A star's
# inner radius and a cross's arm width are the shape's proportions: the plain world's are STAR_INNER and ARM.
_T = np.linspace(0, 2 * np.pi, 48, endpoint=False)
STAR_INNER, ARM = 0.5, 0.34
# The factors `world.randomise_factors` can pick; None (the default) varies every one.
FACTORS = ("size", "edges", "shade", "background", "zoom", "outline", "shadow", "aspect", "turn", "proportions",
           "resample", "blur", "light", "noise", "jpeg")  # fmt: skip


def outline(shape: str, star_inner: float = STAR_INNER, arm: float = ARM) -> np.ndarray:
    if shape == "circle":
        return np.stack([np.cos(_T), np.sin(_T)], 1)
    if shape == "square":
        return np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float)
    if shape == "triangle":
        return np.array([(0, -1), (1, 1), (-1, 1)], dtype=float)
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        return np.stack([np.cos(t), np.sin(t) + 0.1], 1) * np.where(np.arange(10) % 2 == 0, 1.0, star_inner)[:, None]
    if shape == "cross":
        a = arm
        return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                         (-1, -a), (-a, -a)], dtype=float)  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


_CONTRAST = 90.0  # least RGB distance between the background and an object's colour


def free_scale(objects: Sequence, half: dict[str, float], gap: float) -> float:
    """The largest factor every object's box can grow by and still keep clear of the border and of the others."""
    z = min(min(o.x, 1 - o.x, o.y, 1 - o.y) / half[o.size] for o in objects)
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            z = min(z, (max(abs(a.x - b.x), abs(a.y - b.y)) - gap) / (half[a.size] + half[b.size]))
    return max(z, 0.1)


def _background(rng: np.random.Generator, s: int, avoid: list[np.ndarray]) -> np.ndarray:
    """(s, s, 3) floats: a plain or textured background in colours at least _CONTRAST from every object colour."""

    def colour() -> np.ndarray:
        for _ in range(200):
            c = rng.uniform(0, 255, size=3)
            if all(np.linalg.norm(c - a) > _CONTRAST for a in avoid):
                return c
        return np.full(3, 255.0 if np.mean(avoid) < 128 else 0.0)

    a, b = colour(), colour()
    c = (np.arange(s, dtype=np.float32) + 0.5) / s
    xx, yy = c[None, :].repeat(s, 0), c[:, None].repeat(s, 1)
    kind = int(rng.integers(5))
    if kind == 0:  # plain
        w = np.zeros_like(xx)
    elif kind == 1:  # gradient in a random direction
        t = rng.uniform(0, 2 * np.pi)
        w = np.clip((xx - 0.5) * np.cos(t) + (yy - 0.5) * np.sin(t) + 0.5, 0, 1)
    elif kind == 2:  # stripes
        t, period = rng.uniform(0, np.pi), rng.uniform(0.05, 0.3)
        w = (np.sin(2 * np.pi * (xx * np.cos(t) + yy * np.sin(t)) / period) > 0).astype(np.float32)
    elif kind == 3:  # checks
        cell = rng.uniform(0.06, 0.25)
        w = ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:  # blotches: coarse noise, smoothly upsampled
        k = int(rng.integers(3, 9))
        coarse = Image.fromarray((rng.uniform(0, 255, size=(k, k))).astype(np.uint8))
        w = np.asarray(coarse.resize((s, s), Image.BICUBIC), dtype=np.float32) / 255
    return a * (1 - w[..., None]) + b * w[..., None]


def _polygon(unit: np.ndarray, cx: float, cy: float, rx: float, ry: float, angle: float) -> list[tuple[float, float]]:
    pts = unit * (rx, ry)
    cos, sin = np.cos(angle), np.sin(angle)
    pts = pts @ np.array([[cos, sin], [-sin, cos]])
    return [(float(x + cx), float(y + cy)) for x, y in pts]


def shade(rng: np.random.Generator, colour: np.ndarray, palette: np.ndarray, spread: float) -> np.ndarray:
    """A shade of a named colour up to `spread` a channel away that is still nearest its own name."""
    own = int(np.linalg.norm(palette - colour, axis=1).argmin())
    for _ in range(50):
        c = np.clip(colour + rng.uniform(-spread, spread, size=3), 0, 255)
        if int(np.linalg.norm(palette - c, axis=1).argmin()) == own:
            return c
    return colour


def render_randomised(scene, image_size: int, strength: float, extents: dict[str, tuple[float, float]],
                      colour_of: Callable[[object, np.random.Generator, float], np.ndarray], palette: np.ndarray,
                      scale_room: float, factors: Sequence[str] | None = None) -> Image.Image:  # fmt: skip
    """Draw `scene` in a random style. colour_of(obj, rng, background_mean) is the object's colour as the plain
    world chooses it (named, grey or off-palette), palette the named colours' RGB; scale_room is free_scale of the
    scene's objects; factors (of FACTORS) the ones that vary, None for all. Every random number is drawn whichever
    factors vary, so a factor left out changes nothing else about the drawing."""
    rng = np.random.default_rng([scene.background % 2**32, 0x5EED])
    p = strength
    on = {f: factors is None or f in factors for f in FACTORS}
    size = image_size if rng.random() > p / 2 or not on["size"] else int(rng.integers(image_size // 2, 2 * image_size + 1))
    ss = 1 if rng.random() < p / 3 and on["edges"] else 4  # hard edges: drawn at the final grid, no supersampling
    s = size * ss
    objects = scene.objects
    # Named colours first (the background must contrast with them); grey and off-palette ones after the
    # background, against the background actually drawn.
    colours = [] if scene.grey else [colour_of(o, rng, 128.0) for o in objects]
    colours = [shade(rng, c, palette, 45 * p) if rng.random() < p and on["shade"] else c for c in colours]
    back = _background(rng, s, colours) if rng.random() < p and on["background"] else np.full((s, s, 3), rng.uniform(130, 215))
    paper = back.mean((0, 1))  # the background's mean colour, computed once
    brightness = float(paper.mean())
    if scene.grey:
        colours = [colour_of(o, rng, brightness) for o in objects]
    canvas = Image.fromarray(np.clip(back, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    zoom = float(np.exp(rng.uniform(np.log(0.6), np.log(max(0.6, min(scale_room, 2.5)))))) if rng.random() < p and on["zoom"] else 1.0
    hollow = rng.random() < p / 3 and on["outline"]  # drawn as an outline only
    border = not hollow and rng.random() < p / 2 and on["outline"]  # filled, with a dark (light on a dark background) border
    ink = tuple(int(v) for v in (rng.uniform(0, 50, size=3) if brightness > 110 else rng.uniform(205, 255, size=3)))
    shadow = rng.random() < p / 3 and on["shadow"]  # a darker copy of the shape, offset down and to the right
    dark = tuple(int(v) for v in paper * 0.6)
    for obj, colour in zip(objects, colours):
        lo, hi = extents[obj.size]
        extent = rng.uniform(lo, hi) * s * zoom
        rx, ry = extent / 2 * rng.uniform(1 - 0.35 * p * on["aspect"], 1.0, size=2)
        angle = rng.uniform(-np.pi, np.pi) if rng.random() < p / 2 and on["turn"] else 0.0
        unit = outline(obj.shape, *(rng.uniform([0.35, 0.2], [0.6, 0.45]) if rng.random() < p and on["proportions"] else (STAR_INNER, ARM)))
        fill = tuple(int(v) for v in colour)
        pts = _polygon(unit, obj.x * s, obj.y * s, rx, ry, angle)
        if shadow:
            draw.polygon([(x + 0.07 * rx, y + 0.09 * ry) for x, y in pts], fill=dark)
        if hollow:
            draw.polygon(pts, outline=fill, width=max(1, int(rng.uniform(0.06, 0.2) * extent)))
        elif border:
            draw.polygon(pts, fill=fill, outline=ink,
                         width=max(1, int(rng.uniform(0.03, 0.1) * extent)))
        else:
            draw.polygon(pts, fill=fill)
    image = canvas.resize((size, size), Image.BOX) if ss > 1 else canvas
    return _degrade(rng, image, image_size, p, on)


def _degrade(rng: np.random.Generator, image: Image.Image, n: int, p: float, on: dict[str, bool]) -> Image.Image:
    """Resize to n (a random filter), then brightness/contrast, blur, noise and JPEG, each with probability ~p."""
    resample = [Image.BILINEAR, Image.BICUBIC, Image.NEAREST, Image.BOX][rng.integers(4)]
    image = image.resize((n, n), resample if on["resample"] else Image.BOX)
    if rng.random() < p / 2 and on["blur"]:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    px = np.asarray(image, dtype=np.float32)
    if rng.random() < p and on["light"]:
        px = (px - 128) * rng.uniform(0.75, 1.2) + 128 + rng.uniform(-30, 30)
    sigma = rng.uniform(0, 12 * p) if rng.random() < p and on["noise"] else rng.uniform(3, 8)
    px = px + rng.normal(0, sigma, size=(n, n, 1)) + rng.normal(0, 2, size=(n, n, 3))
    image = Image.fromarray(np.clip(px + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < p / 3 and on["jpeg"]:
        buffer = BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(15, 80)))
        image = read_image(buffer.getvalue())  # the one guarded decoder (a JPEG just written always decodes)
    return image
