"""Rendered digit glyphs for the built-in world: one digit 0-9 per scene, dark ink on light paper, in the fonts
this machine has (every .ttf/.otf under the system font folders, plus Pillow's built-in font), with varied
size, rotation, stroke, blur and position, and sometimes rendered at low resolution and scaled back up (as
scanned or tiny handwriting is). A model pretrained with them can be tested zero-shot on real handwriting
(`vlfm eval RUN --task zeroshot_classification --dataset digits`), a domain it never saw.

The font list depends on the machine, so glyph images are deterministic per machine, not across machines.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

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
    font = _font(fonts()[rng.integers(len(fonts()))], int(s * rng.uniform(0.6, 1.05)))
    text = str(digit)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (s - (right - left)) / 2 - left + rng.uniform(-0.1, 0.1) * s
    y = (s - (bottom - top)) / 2 - top + rng.uniform(-0.1, 0.1) * s
    draw.text((x, y), text, fill=ink, font=font, stroke_width=int(rng.integers(0, 4)), stroke_fill=ink)
    canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, fillcolor=paper)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2.0)))
    image = canvas.resize((image_size, image_size), Image.BOX)
    if rng.random() < 0.5:  # low resolution, scaled back up
        low = int(rng.integers(6, 17))
        image = image.resize((low, low), Image.BOX).resize((image_size, image_size), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(1, 6), size=(image_size, image_size))
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)).convert("RGB")


def glyph_captions(digit: int) -> list[str]:
    """Descriptions of a glyph scene; the first is canonical."""
    word = DIGIT_WORDS[digit]
    return [f"the digit {digit}", f"the number {digit}", f"the number {word}", f"a {digit}", f"{digit}",
            f"a drawing of the digit {digit}", f"digit {word}", f"a picture of the number {digit}"]  # fmt: skip
