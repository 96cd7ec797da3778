"""What a request may hold (the server's limits), the error every bad request becomes, and images from requests.

Every image a request carries (a data URL, bare base64, an upload) goes through `vlfm.io.read_image`, the one
guarded decoder, with the server's pixel cap checked from the header before anything is decoded.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from PIL import Image

from vlfm.io import ImageError, read_image


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8_000_000  # a request body, uploads included
    max_pixels: int = 16_000_000  # an image's width x height, from its header (decompression bombs)
    max_inputs: int = 64  # inputs of one embeddings request, images of one classify request
    max_labels: int = 64  # labels (and, separately, templates) of one classify request
    max_text_chars: int = 2_000  # one text: an input, a label, a query, a chat message
    max_k: int = 100  # hits of one search
    max_tokens: int = 256  # tokens one chat completion may generate
    max_messages: int = 32  # messages of one chat request


# the flag each limit is set by (named in the errors, so a user knows what to change)
FLAGS = {name: "--" + name.replace("_", "-") for name in Limits.__dataclass_fields__}


class ServeError(Exception):
    """A request the server refuses: the HTTP status, the error `type` and a message naming the problem."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type


def over_limit(limits: Limits, name: str, found: int, what: str) -> None:
    """A ServeError (413 for bytes and pixels, 400 otherwise) when `found` exceeds the limit `name`."""
    limit = getattr(limits, name)
    if found > limit:
        status = 413 if name in ("max_body_bytes", "max_pixels") else 400
        raise ServeError(status, f"{what}: {found:,} is over the limit of {limit:,} (the server's {FLAGS[name]})",
                         "limit_exceeded")  # fmt: skip


def check_text(limits: Limits, value: str, what: str) -> str:
    """A text that is not empty (after stripping) and within max_text_chars."""
    if not value.strip():
        raise ServeError(400, f"{what} is empty")
    over_limit(limits, "max_text_chars", len(value), f"{what} has {len(value):,} characters")
    return value


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.IGNORECASE)


def is_data_url(value: str) -> bool:
    return value[:5].lower() == "data:"


def image_from_string(value: str, limits: Limits, size: int, what: str) -> Image.Image:
    """An image given as a data URL (`data:image/png;base64,...`) or as bare base64."""
    payload = value
    if is_data_url(value):
        match = _DATA_URL.match(value)
        if match is None:
            raise ServeError(400, f"{what} is a data URL that is not base64 (expected data:image/...;base64,...)")
        if match["mime"] and not match["mime"].lower().startswith("image/"):
            raise ServeError(400, f"{what} is a data URL of {match['mime']}, not an image")
        payload = value[match.end() :]
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(400, f"{what} is not valid base64") from None
    return image_from_bytes(data, limits, size, what)


def image_from_bytes(data: bytes, limits: Limits, size: int, what: str) -> Image.Image:
    """Bytes through the guarded decoder: undecodable -> 400, over the pixel cap -> 413 (type limit_exceeded)."""
    if not data:
        raise ServeError(400, f"{what} is empty (0 bytes)")
    try:
        return read_image(data, limits.max_pixels, size, name=what)
    except ImageError as error:
        if error.kind == "oversized":
            raise ServeError(413, f"{error} (the server's {FLAGS['max_pixels']})", "limit_exceeded") from None
        raise ServeError(400, str(error), "invalid_image") from None
