"""Rendered digit glyphs for the built-in world: one digit 0-9 per scene, dark ink on light paper, in the fonts
this machine has (every .ttf/.otf under the system font folders, plus Pillow's built-in font), with varied
height, stroke, shear, width, rotation, blur and position, and often rendered at low resolution and scaled
back up (as scans and tiny handwriting are). A model pretrained with them can be tested zero-shot on real handwriting
(`vlfm eval RUN --task zeroshot_classification --dataset digits`), a domain it never saw.

The font list depends on the machine, so font glyph images are deterministic per machine, not across machines.
`render_handwritten` draws the digit as synthetic handwriting instead (pen strokes, data/handwriting.py; no
fonts, so independent of the machine's fonts), with the same blur, resolution and noise.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vlfm.data.handwriting import draw_handwritten

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")


@lru_cache(maxsize=1)
def fonts() -> tuple[str | None, ...]:
    """Font files found on this machine (sorted), and None for Pillow's built-in font (always there)."""
    found = sorted(str(p) for d in FONT_DIRS if Path(d).is_dir() for p in Path(d).rglob("*") if p.suffix.lower() in (".ttf", ".otf"))
    return (None, *found)


def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)


def render_glyph(digit: int, seed: int, image_size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed % 2**32)
    s = image_size * 2  # drawn at twice the size, then reduced: smooth edges
    paper, ink = int(rng.uniform(200, 255)), int(rng.uniform(0, 90))
    canvas = Image.new("L", (s, s), paper)
    draw = ImageDraw.Draw(canvas)
    path, text = fonts()[rng.integers(len(fonts()))], str(digit)
    probe = _font(path, 100)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=probe)
    height = rng.uniform(0.55, 0.95) * s  # the glyph's height as a fraction of the image, whatever the font
    font = _font(path, max(8, int(100 * height / max(1, bottom - top))))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (s - (right - left)) / 2 - left + rng.uniform(-0.08, 0.08) * s
    y = (s - (bottom - top)) / 2 - top + rng.uniform(-0.08, 0.08) * s
    draw.text((x, y), text, fill=ink, font=font, stroke_width=int(rng.integers(0, 6)), stroke_fill=ink)
    # Hand-drawn variation: shear, a narrower or wider glyph, a small rotation (an affine map about the centre).
    shear, squeeze, angle = rng.uniform(-0.3, 0.3), rng.uniform(0.7, 1.15), np.deg2rad(rng.uniform(-12, 12))
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = cos / squeeze, (sin + shear) / squeeze
    d, e = -sin, cos
    c, f = s / 2 - a * s / 2 - b * s / 2, s / 2 - d * s / 2 - e * s / 2
    canvas = canvas.transform((s, s), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BICUBIC, fillcolor=paper)
    return _degrade(canvas, rng, image_size)


def render_handwritten(digit: int, seed: int, image_size: int = 64) -> Image.Image:
    """A synthetic handwritten digit (data/handwriting.py) with the same blur, resolution and noise as render_glyph;
    it uses no fonts, so it does not depend on the machine's fonts."""
    rng = np.random.default_rng([seed % 2**32, 1])  # its own stream: never the same draws as the font glyph's
    paper, ink = int(rng.uniform(200, 255)), int(rng.uniform(0, 90))
    s = image_size * 4  # drawn at four times the size, then reduced: smooth edges
    canvas = draw_handwritten(digit, rng, s, ink, paper)
    if rng.random() < 0.5:  # size-normalised, as scanned-digit sets store them: the ink's box fills the frame
        canvas = _fill_frame(canvas, rng, paper)
    return _degrade(canvas, rng, image_size)


def _fill_frame(canvas: Image.Image, rng: np.random.Generator, paper: int) -> Image.Image:
    """The ink's bounding box scaled up to fill the canvas, less a small margin: keeping its aspect ratio, or
    (half the time) stretched to fill both ways, so a narrow digit such as a 1 becomes a wide one."""
    s = canvas.width
    box = Image.eval(canvas, lambda v: 255 if v < paper - 40 else 0).getbbox()
    if box is None:
        return canvas
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    room = s * (1 - 2 * rng.uniform(0.0, 0.1))
    if rng.random() < 0.5:
        new = (room, room)
    else:
        k = room / max(w, h)
        new = (w * k, h * k)
    nw, nh = max(1, int(new[0])), max(1, int(new[1]))
    out = Image.new("L", (s, s), paper)
    out.paste(canvas.crop(box).resize((nw, nh), Image.BICUBIC), ((s - nw) // 2, (s - nh) // 2))
    return out


def _degrade(canvas: Image.Image, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Blur, reduce to image_size, often to a low resolution and back, add pixel noise; RGB out."""
    scale = canvas.width / (2 * image_size)  # the blur radius is in pixels of a canvas at twice the image size
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2.0) * scale))
    image = canvas.resize((image_size, image_size), Image.BOX)
    if rng.random() < 0.6:  # low resolution (scans, tiny writing), scaled back up as preprocessing does
        low = int(rng.integers(7, 17))
        image = image.resize((low, low), Image.BOX).resize((image_size, image_size), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(1, 6), size=(image_size, image_size))
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)).convert("RGB")


def glyph_captions(digit: int) -> list[str]:
    """Descriptions of a glyph scene; the first is canonical."""
    word = DIGIT_WORDS[digit]
    return [f"the digit {digit}", f"the number {digit}", f"the number {word}", f"a {digit}", f"{digit}",
            f"a drawing of the digit {digit}", f"digit {word}", f"a picture of the number {digit}"]  # fmt: skip
