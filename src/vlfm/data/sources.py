"""Real data: caption files (CSV/TSV with `filepath` and `caption` columns, or JSONL) decoded into memory.

Undecodable images are skipped and counted, never fatal and never silent; a file with missing columns or
no usable rows fails early with a message that names the problem.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vlfm.data.transforms import Preprocess, to_uint8_tensor
from vlfm.io import MAX_PIXELS, ImageError, UsageError, read_image

log = logging.getLogger("vlfm")


@dataclass
class ImageTextData:
    """Images as uint8 (N, 3, H, W) and, for each, one or more captions (training picks one per step)."""

    images: torch.Tensor
    captions: list[list[str]]
    skipped: int = 0

    def __post_init__(self):
        if len(self.images) != len(self.captions):
            raise ValueError(f"{len(self.images)} images but {len(self.captions)} caption lists")

    def __len__(self) -> int:
        return len(self.captions)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CAPTION_SUFFIXES = (".csv", ".tsv", ".jsonl")


def list_images(folder: str | Path) -> list[Path]:
    """Image files in a folder, sorted by name (by suffix; whether they decode is found out when read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def read_caption_file(path: str | Path, image_column: str = "filepath", caption_column: str = "caption") -> list[tuple[Path, str]]:
    """(image path, caption) rows; relative image paths are relative to the caption file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {str(path)!r} does not exist")
    if path.suffix not in CAPTION_SUFFIXES:
        raise UsageError(f"{path}: caption files must be .csv, .tsv or .jsonl")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    rows, columns = _jsonl_rows(path, text) if path.suffix == ".jsonl" else _csv_rows(path, text)
    missing = [c for c in (image_column, caption_column) if c not in columns]
    if missing:
        raise UsageError(f"{path} lacks column(s) {', '.join(missing)} (found: {', '.join(sorted(columns)) or 'none'})")
    if not rows:
        raise UsageError(f"{path} has no rows")
    short = next((i for i, row in enumerate(rows) if row.get(image_column) is None or row.get(caption_column) is None), None)
    if short is not None:
        raise UsageError(f"{path} row {short + 1} has no {image_column} or {caption_column} value")
    return [(path.parent / str(row[image_column]), str(row[caption_column])) for row in rows]


def _jsonl_rows(path: Path, text: str) -> tuple[list[dict], set[str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as error:
                raise UsageError(f"{path} line {number} is not valid JSON ({error})") from None
            if not isinstance(rows[-1], dict):
                raise UsageError(f"{path} line {number} is a JSON {type(rows[-1]).__name__}, not an object")
    return rows, set().union(*(row.keys() for row in rows))


def _csv_rows(path: Path, text: str) -> tuple[list[dict], set[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ",")
    try:
        return list(reader), set(reader.fieldnames or [])
    except csv.Error as error:
        raise UsageError(f"{path} line {reader.line_num} is not valid {path.suffix[1:].upper()} ({error})") from None


def load_image_text(rows: list[tuple[Path, str]], preprocess: Preprocess, max_pixels: int = MAX_PIXELS) -> ImageTextData:
    """Decode (io.read_image), resize and centre-crop every image; undecodable ones and those over `max_pixels`
    are skipped and counted in the log."""
    images, captions, failures = [], [], []
    for image_path, caption in rows:
        try:
            images.append(preprocess.resize_crop(read_image(image_path, max_pixels, preprocess.image_size)))
            captions.append([caption])
        except ImageError as error:
            failures.append(str(error))
    if failures:
        log.warning("skipped %d of %d images that could not be decoded or are over the pixel cap, e.g. %s",
                    len(failures), len(rows), failures[0])  # fmt: skip
    if not images:
        raise ValueError(f"none of the {len(rows)} images could be decoded (first: {failures[0]})")
    return ImageTextData(to_uint8_tensor(images), captions, skipped=len(failures))
