"""The bottom layer: the error types, atomic directory and file writes, strict weight loading, JSON and image reading.

Every other module builds on these; nothing here imports another vlfm module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file


class VlfmError(ValueError):
    """A mistake the user can fix (a config key, a file, a checkpoint): the CLI prints it as one line, exit 2."""


class ConfigError(VlfmError):
    """A configuration that cannot be used; the message says which key and what to fix."""


class CheckpointError(VlfmError):
    """A checkpoint that cannot be loaded; the message says what is missing or does not match."""


class UsageError(VlfmError):
    """A mistake in the command line or an argument."""


class SearchError(VlfmError):
    """A search index that cannot be used as asked (another model, a missing file, a bad query)."""


class RunExistsError(VlfmError):
    """A run directory that already holds a run, without --resume."""


class DivergedError(VlfmError):
    """Training stopped: the loss or the gradients were non-finite for too many steps in a row (CLI exit 3)."""

    exit_code = 3


@contextmanager
def atomic_directory(path: str | Path, manifest: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` in one rename (old contents removed after), so
    a crash never leaves a half-written directory under the real name. With `manifest`, manifest.json (every
    file's size and sha256) is written last. Every file and the directory reach the disk (fsync) before the
    rename, and the parent directory after it, so a power cut leaves the old directory or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        for file in tmp.rglob("*"):
            _fsync(file)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that add one do not); on success the file
    reaches the disk and replaces `path` in one rename, so a reader (or a rerun after a kill) sees the old file
    or the new one, whole, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- manifests: what a checkpoint directory held when it was written ------------------------------------
MANIFEST = "manifest.json"
# Files a checkpoint is made of: one of these beside a manifest that does not list it was put there later.
CHECKPOINT_FILES = ("config.json", "train_state.json", "tokenizer.json", "tokenizer_config.json", "preprocess.json",
                    "adapter_config.json")  # fmt: skip


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"manifest_version": 1, "files": entries}, indent=1))


def manifest_problems(directory: str | Path, checksums: bool = False) -> dict[str, str] | None:
    """File name -> what is wrong with it (missing, another size, other bytes when `checksums`, not listed), one
    line each naming the file; None when the directory has no manifest.json (saved before manifests)."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        return None
    try:
        entries = {name: (int(e["size"]), str(e["sha256"])) for name, e in read_json(directory / MANIFEST)["files"].items()}
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError) as error:
        return {MANIFEST: f"{directory / MANIFEST}: damaged, not a manifest ({error})"}
    problems = {}
    for name, (size, digest) in entries.items():
        file = directory / name
        found = file.stat().st_size if file.is_file() else None
        if found is None:
            problems[name] = f"{file}: missing (the manifest lists it, {size} bytes)"
        elif found != size:
            change = "empty" if not found else "truncated" if found < size else f"{found - size} byte(s) more"
            problems[name] = f"{file}: {found} bytes where the manifest says {size} ({change})"
        elif checksums and sha256(file) != digest:
            problems[name] = f"{file}: its sha256 differs from the manifest's (bytes changed since it was written)"
    for file in sorted(directory.iterdir()):
        if file.is_file() and file.name not in entries and (file.suffix == ".safetensors" or file.name in CHECKPOINT_FILES):
            problems[file.name] = f"{file}: not in the manifest (added or replaced after the checkpoint was written)"
    return problems


def read_json(path: Path) -> dict:
    """A JSON object from a file; one that is not (cut short, empty, garbled) is a CheckpointError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({'empty' if not Path(path).stat().st_size else error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object (found {type(data).__name__})")
    return data


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged file (cut short, zeroed, a garbled header, bytes added) is a
    CheckpointError naming it."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is damaged: {error}") from None


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the float tensors holding NaN or inf. A check of every tensor: one pass over the weights, cheap
    beside reading them at these sizes, and overwritten bytes (0xFF...) read as NaN, never silently used."""
    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """read_weights, refusing tensors that hold NaN or inf (the first one named)."""
    state = read_weights(path)
    bad = non_finite(state)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: tensor {bad[0]!r}{more} holds NaN or infinite values (damaged bytes)")
    return state


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, refusing anything that does not match: never a silently random-initialised tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    raise_mismatch(f"{source} does not match the model config", missing, unexpected, shapes)
    model.load_state_dict(state)


def raise_mismatch(what: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
    """One error listing every key that is missing, unexpected or mis-shaped (none: return)."""
    parts = [
        f"{len(items)} {title}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
        if items
    ]
    if parts:
        raise CheckpointError(f"{what}: " + "; ".join(parts))


MAX_PIXELS = 50_000_000  # images whose header claims more pixels are refused before decoding (bombs included)
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
_GREY_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_TRANSPARENT = ("RGBA", "RGBa", "LA", "La", "PA", "P")


class ImageError(UsageError):
    """An image that cannot be used, in one line; `kind` is 'undecodable' or 'oversized' (data paths count each)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def read_image(source: str | Path | bytes | BinaryIO, max_pixels: int = MAX_PIXELS,
               target: int | tuple[int, int] | None = None, name: str | None = None) -> Image.Image:  # fmt: skip
    """The one guarded image decoder: a file (path, bytes or open binary file) as 8-bit RGB, else an ImageError.

    The pixel count is checked from the header before anything is decoded: more than `max_pixels` is refused
    (PIL's own decompression-bomb limit, 2 x Image.MAX_IMAGE_PIXELS, refuses too). A JPEG larger than `target`
    (w, h) is decoded at a reduced scale (`draft`), never below the target. EXIF orientation is applied; 16- and
    32-bit greyscale (I;16, I, F) is scaled to 8 bits, not clipped; transparency (RGBA, LA, P, PA, a tRNS colour)
    is composited onto BACKGROUND (white); CMYK, YCbCr and the rest are converted to RGB.
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
            with Image.open(BytesIO(source) if isinstance(source, bytes) else source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"{name} is {width} x {height} = {width * height:,} pixels, over the cap of "
                                     f"{max_pixels:,} (--max-pixels / data.max_pixels)", "oversized")  # fmt: skip
                if target is not None and image.format == "JPEG":
                    image.draft("RGB", (target, target) if isinstance(target, int) else tuple(target))
                image.load()
                if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation
                    image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:  # PIL's own limit, before any size is known here
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(claimed[1]):,} pixels" if claimed else "a decompression bomb"
        raise ImageError(f"{name} is {size}, over the cap of {min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0)):,} "
                         "(refused as a decompression bomb)", "oversized") from None  # fmt: skip
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not a readable image (not an image format Pillow knows)", "undecodable") from None
    except Exception as error:  # a broken file must never be a traceback: truncated data, bad EXIF, odd modes
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}"
        raise ImageError(f"{name} is not a readable image ({reason})", "undecodable") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: high-depth greyscale scaled to 0..255, transparency composited onto BACKGROUND (white)."""
    if image.mode in _GREY_HIGH_DEPTH:
        return Image.fromarray(_grey_to_uint8(image), "L").convert("RGB")
    if image.mode in _TRANSPARENT or "transparency" in image.info:
        rgba = image.convert("RGBA")
        out = Image.new("RGB", image.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def _grey_to_uint8(image: Image.Image) -> np.ndarray:
    """16-bit values (I;16, or I within 0..65535) / 257; F within 0..1 x 255; anything else stretched min..max."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        values = values / 257
    elif image.mode == "F" and low >= 0 and high <= 1:
        values = values * 255
    else:
        values = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def decode_image(source: str | Path | bytes | BinaryIO, max_pixels: int = MAX_PIXELS,
                 target: int | tuple[int, int] | None = None) -> Image.Image | None:  # fmt: skip
    """read_image, or None when the image is undecodable or over `max_pixels` (data paths count and report those)."""
    try:
        return read_image(source, max_pixels, target)
    except ImageError:
        return None


def open_image(image: str | Path | Image.Image, max_pixels: int = MAX_PIXELS,
               target: int | tuple[int, int] | None = None) -> Image.Image:  # fmt: skip
    """One image a user named (a path or an already open image) as RGB; a one-line UsageError (an ImageError) when
    it does not exist, cannot be decoded or is over `max_pixels`."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image)
    if not path.is_file():
        raise UsageError(f"image {str(path)!r} does not exist")
    return read_image(path, max_pixels, target)
