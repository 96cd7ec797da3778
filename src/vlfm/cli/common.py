"""What the command modules share: checking a loaded model's kind, printing metrics, the --max-pixels flag."""

from __future__ import annotations

import json

from vlfm.io import MAX_PIXELS, UsageError


def two_tower(model, command: str):
    """The loaded model, if it has both towers (a text encoder or a fine-tuned classifier has one)."""
    from vlfm.models import ImageClassifier, TextEncoder, TwoTowerModel

    if not isinstance(model, TwoTowerModel):
        what = {TextEncoder: "text only", ImageClassifier: "image only, fixed classes"}.get(type(model), "no shared space")
        raise UsageError(f"{command} needs an image-text model; this checkpoint is a {type(model).__name__} ({what})")
    return model


def print_json(metrics: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, indent=2))


def add_max_pixels(p, what: str = "images") -> None:
    """--max-pixels: the pixel cap io.read_image checks from an image's header before decoding it."""
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"{what} whose header claims more pixels are refused (default {MAX_PIXELS:_})")
