"""What the command modules share: checking a loaded model's kind, and printing metrics."""

from __future__ import annotations

import json

from vlfm.io import UsageError


def two_tower(model, command: str):
    """The loaded model, if it has both towers (a text encoder or a fine-tuned classifier has one)."""
    from vlfm.models import ImageClassifier, TextEncoder, TwoTowerModel

    if not isinstance(model, TwoTowerModel):
        what = {TextEncoder: "text only", ImageClassifier: "image only, fixed classes"}.get(type(model), "no shared space")
        raise UsageError(f"{command} needs an image-text model; this checkpoint is a {type(model).__name__} ({what})")
    return model


def print_json(metrics: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, indent=2))
