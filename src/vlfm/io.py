"""The bottom layer: the error types, atomic directory writes, strict weight loading, JSON and image reading.

Every other module builds on these; nothing here imports another vlfm module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError


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


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` in one rename (old contents removed after), so
    a crash never leaves a half-written directory under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


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


def decode_image(path: str | Path) -> Image.Image | None:
    """The image as RGB, or None when it cannot be decoded (data paths count and report those)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def open_image(image: str | Path | Image.Image) -> Image.Image:
    """One image a user named (a path or an already open image) as RGB; a clear error when it cannot be read."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise UsageError(f"image {str(path)!r} does not exist")
    decoded = decode_image(path)
    if decoded is None:
        raise UsageError(f"{path} is not a readable image")
    return decoded
