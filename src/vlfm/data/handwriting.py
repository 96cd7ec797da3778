"""Synthetic handwritten digits: each digit 0-9 as pen strokes, drawn with a round pen, no fonts.

Every digit has a few ways people write it (a 7 with and without a crossbar, a 1 with and without a flag or a
base, a 4 open or closed, a 9 with a straight or a curved tail, ...). A stroke is a list of control points in a
unit box (x right, y down, the digit's height from 0 to 1); "curve" strokes pass smoothly through their points
(a Catmull-Rom spline), "loop" strokes too and close on themselves, "line" strokes are polylines with sharp
corners. Per sample every control point is jittered, the digit slanted, rotated, narrowed or widened, and
drawn with a pen from thin to very thick, then blurred, often reduced to 7-16 px and scaled back up, and given
pixel noise, as glyphs.render_glyph does with font digits. A pure function of (digit, seed) that uses no
fonts, so it does not depend on the machine's fonts.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

Stroke = tuple[str, tuple[tuple[float, float], ...]]  # ("curve" | "line" | "loop", control points)


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, stop: float, n: int = 8) -> tuple[tuple[float, float], ...]:
    """n points on an ellipse from angle `start` to `stop` (degrees; 0 is right, 90 down, as y grows downwards)."""
    t = np.deg2rad(np.linspace(start, stop, n))
    return tuple((float(cx + rx * np.cos(a)), float(cy + ry * np.sin(a))) for a in t)


# The ways of writing each digit, each a tuple of strokes.
STYLES: dict[int, tuple[tuple[Stroke, ...], ...]] = {
    0: (
        (("loop", _arc(0.5, 0.5, 0.4, 0.5, -90, 270, 12)[:-1]),),  # an oval from the top, anticlockwise-ish
        (("curve", _arc(0.5, 0.5, 0.38, 0.5, -80, 290, 13)),),  # an oval whose ends overlap at the top
    ),
    1: (
        (("line", ((0.55, 0.0), (0.48, 1.0))),),  # a plain bar
        (("line", ((0.25, 0.25), (0.58, 0.0), (0.52, 1.0))),),  # with a flag
        (("line", ((0.25, 0.25), (0.58, 0.0), (0.52, 1.0))), ("line", ((0.22, 1.0), (0.82, 1.0)))),  # flag and base
    ),
    2: (
        (("curve", ((0.12, 0.28), (0.3, 0.05), (0.62, 0.02), (0.85, 0.25), (0.72, 0.52), (0.1, 1.0))),
         ("line", ((0.1, 1.0), (0.92, 0.98)))),
        (("curve", ((0.15, 0.22), (0.45, 0.0), (0.8, 0.12), (0.78, 0.4), (0.42, 0.72), (0.1, 0.98))),
         ("curve", ((0.1, 0.98), (0.3, 0.86), (0.6, 0.98), (0.92, 0.92)))),  # a wavy base
        (("curve", ((0.15, 0.25), (0.45, 0.0), (0.82, 0.2), (0.65, 0.55), (0.25, 0.88), (0.15, 0.98),
                    (0.3, 0.85), (0.35, 0.97), (0.9, 0.97))),),  # a little loop at the bottom left
    ),
    3: (
        (("curve", ((0.12, 0.15), (0.48, 0.0), (0.82, 0.18), (0.72, 0.4), (0.4, 0.48))),
         ("curve", ((0.4, 0.48), (0.82, 0.6), (0.85, 0.85), (0.5, 1.0), (0.1, 0.86)))),
        (("line", ((0.12, 0.02), (0.85, 0.02), (0.4, 0.42))),  # a flat top
         ("curve", ((0.4, 0.42), (0.8, 0.55), (0.85, 0.82), (0.5, 1.0), (0.12, 0.88)))),
    ),
    4: (
        (("line", ((0.62, 0.0), (0.08, 0.68), (0.92, 0.68))), ("line", ((0.66, 0.28), (0.66, 1.0)))),  # closed
        (("line", ((0.25, 0.0), (0.15, 0.6), (0.88, 0.6))), ("line", ((0.7, 0.05), (0.7, 1.0)))),  # open top
        (("line", ((0.6, 0.0), (0.1, 0.66), (0.9, 0.64))), ("line", ((0.6, 0.0), (0.62, 1.0)))),  # closed, one corner
    ),
    5: (
        (("line", ((0.85, 0.02), (0.25, 0.02), (0.2, 0.45))),
         ("curve", ((0.2, 0.45), (0.52, 0.36), (0.84, 0.55), (0.82, 0.84), (0.5, 1.0), (0.12, 0.88)))),
        (("line", ((0.25, 0.02), (0.2, 0.45))),  # the bar drawn last, as a second stroke
         ("curve", ((0.2, 0.45), (0.55, 0.38), (0.85, 0.6), (0.75, 0.9), (0.4, 1.0), (0.1, 0.85))),
         ("line", ((0.25, 0.02), (0.85, 0.0)))),
    ),
    6: (
        (("curve", ((0.78, 0.02), (0.42, 0.18), (0.18, 0.55), (0.22, 0.88), (0.5, 1.0), (0.8, 0.84),
                    (0.76, 0.58), (0.45, 0.5), (0.2, 0.68))),),
        (("curve", ((0.7, 0.0), (0.3, 0.3), (0.15, 0.72))),  # a straighter back and a round belly
         ("loop", _arc(0.48, 0.74, 0.32, 0.26, 180, 530, 10)[:-1])),
    ),
    7: (
        (("line", ((0.1, 0.02), (0.9, 0.02), (0.38, 1.0))),),
        (("line", ((0.1, 0.02), (0.9, 0.02), (0.38, 1.0))), ("line", ((0.3, 0.52), (0.82, 0.5)))),  # crossbar
        (("line", ((0.1, 0.12), (0.12, 0.02), (0.9, 0.02))), ("curve", ((0.9, 0.02), (0.6, 0.45), (0.45, 1.0)))),
    ),
    8: (
        (("loop", ((0.78, 0.14), (0.5, 0.0), (0.2, 0.16), (0.32, 0.38), (0.7, 0.6), (0.82, 0.84), (0.5, 1.0),
                   (0.18, 0.84), (0.3, 0.6), (0.68, 0.38))),),  # one stroke, crossing in the middle
        (("loop", _arc(0.5, 0.25, 0.3, 0.25, -90, 270, 10)[:-1]),  # two stacked rings
         ("loop", _arc(0.5, 0.74, 0.38, 0.26, -90, 270, 10)[:-1])),
    ),
    9: (
        (("loop", _arc(0.48, 0.3, 0.35, 0.3, 0, 360, 10)[:-1]), ("line", ((0.83, 0.28), (0.78, 1.0)))),  # straight
        (("loop", _arc(0.48, 0.3, 0.35, 0.3, 0, 360, 10)[:-1]),
         ("curve", ((0.83, 0.3), (0.8, 0.7), (0.55, 1.0), (0.25, 0.94)))),  # a curved tail
        (("curve", ((0.82, 0.22), (0.5, 0.02), (0.16, 0.22), (0.35, 0.55), (0.8, 0.38), (0.84, 0.1),
                    (0.8, 0.6), (0.62, 1.0))),),  # loop and tail in one stroke
    ),
}


def _spline(points: np.ndarray, closed: bool, per_segment: int = 12) -> np.ndarray:
    """A Catmull-Rom curve through the points (closed: back to the first)."""
    if closed:
        p = np.concatenate([points[-1:], points, points[:2]])
    else:
        p = np.concatenate([points[:1], points, points[-1:]])
    t = np.linspace(0, 1, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3))
    out.append(p[-2:-1])  # the last point itself
    return np.concatenate(out)


def _dense(points: np.ndarray, step: float) -> np.ndarray:
    """Points along the polyline no further apart than `step`, so circles drawn at them make a continuous stroke."""
    out = [points[:1]]
    for a, b in zip(points[:-1], points[1:]):
        k = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        out.append(a + (b - a) * (np.arange(1, k + 1)[:, None] / k))
    return np.concatenate(out)


def draw_handwritten(digit: int, rng: np.random.Generator, size: int, ink: int, paper: int) -> Image.Image:
    """A `size` x `size` greyscale canvas with the digit written on it in one of its styles."""
    styles = STYLES[digit]
    strokes = styles[int(rng.integers(len(styles)))]
    jitter = rng.uniform(0.015, 0.05)  # how unsteady the hand is
    slant, aspect, angle = rng.uniform(-0.15, 0.35), rng.uniform(0.6, 1.1), np.deg2rad(rng.uniform(-10, 10))
    height = rng.uniform(0.6, 0.9) * size  # the digit's height in the image
    pen = rng.uniform(0.05, 0.22) * height  # stroke width: from a thin pen to a very thick one
    offset = rng.uniform(-0.06, 0.06, size=2) * size  # off centre
    cos, sin = np.cos(angle), np.sin(angle)
    paths = []
    for kind, control in strokes:
        p = np.asarray(control, dtype=np.float64) + rng.normal(0, jitter, size=(len(control), 2))
        path = _spline(p, closed=kind == "loop") if kind != "line" else p
        x, y = (path[:, 0] - 0.5) * aspect, path[:, 1] - 0.5
        x = x - slant * y  # forward slant leans the top right (y grows downwards)
        paths.append(np.stack([x * cos - y * sin, x * sin + y * cos], axis=1))
    widths = pen * rng.uniform(0.85, 1.15, size=len(paths))
    pts = np.concatenate(paths)
    low, high = pts.min(0), pts.max(0)
    margin = widths.max() / 2 + 0.02 * size  # the whole stroke stays inside the image
    scale = min(height / max(high[1] - low[1], 1e-6), (size - 2 * margin) / max(high[0] - low[0], 1e-6))
    half = (high - low) * scale / 2  # the drawn digit's half extent, without the pen
    centre = np.clip(size / 2 + offset, margin + half, size - margin - half)
    canvas = Image.new("L", (size, size), paper)
    draw = ImageDraw.Draw(canvas)
    for path, width in zip(paths, widths):
        xy = (path - (high + low) / 2) * scale + centre
        r = width / 2
        dense = _dense(xy, max(1.0, r / 2))
        draw.line([tuple(q) for q in dense.tolist()], fill=ink, width=max(1, int(round(width))))
        for qx, qy in dense.tolist():  # round pen: a disc at every point joins the segments smoothly
            draw.ellipse((qx - r, qy - r, qx + r, qy + r), fill=ink)
    return canvas
