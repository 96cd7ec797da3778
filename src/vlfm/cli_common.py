"""What every `vlfm` subcommand module shares: the error a user can fix, and reading its inputs."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


class UsageError(ValueError):
    """A mistake in the command line the user can fix: printed as one line, exit code 2."""


def open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"{path} is not a readable image ({type(error).__name__})") from None


def two_tower(model, command: str):
    """The loaded model, if it has both towers (a text encoder or a fine-tuned classifier has one)."""
    if not (hasattr(model, "visual") and hasattr(model, "text")):
        tower = "text only" if hasattr(model, "text") else "image only, fixed classes"
        raise UsageError(f"{command} needs an image-text model; this checkpoint is a {type(model).__name__} ({tower})")
    return model
