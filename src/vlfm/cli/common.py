"""What the command modules share: checking a loaded model's kind, where output goes by default, printing
metrics, the --max-pixels and collection flags, torchrun's group for a command, and argparse types that check a
flag's range."""

from __future__ import annotations

import argparse
import json
import math
from datetime import timedelta
from pathlib import Path

from vlfm.io import MAX_PIXELS, UsageError


def two_tower(model, command: str):
    """The loaded model, if it has both towers (a text encoder or a fine-tuned classifier has one)."""
    from vlfm.models import ImageClassifier, TextEncoder, TwoTowerModel

    if not isinstance(model, TwoTowerModel):
        what = {TextEncoder: "text only", ImageClassifier: "image only, fixed classes"}.get(type(model), "no shared space")
        raise UsageError(f"{command} needs an image-text model; this checkpoint is a {type(model).__name__} ({what})")
    return model


def output_home(checkpoint) -> Path:
    """Where a command writes next to its checkpoint by default: the checkpoint's directory, or the current
    directory for a hub name (never into the Hugging Face cache)."""
    from vlfm.checkpoint import resolve
    from vlfm.interop.hub import is_name

    return Path.cwd() if is_name(checkpoint) else resolve(checkpoint)


def print_json(metrics: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, indent=2))


def add_precision(p) -> None:
    """--precision: what the model embeds in (checkpoint.load; auto = bf16 where it is fast, else fp32)."""
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 on a GPU or a CPU with AVX512-BF16/AMX (embeddings within ~1e-3 of "
                        "fp32's), else fp32")


def add_max_pixels(p, what: str = "images") -> None:
    """--max-pixels: the pixel cap io.read_image checks from an image's header before decoding it."""
    p.add_argument("--max-pixels", type=positive_int, default=MAX_PIXELS, metavar="N",
                   help=f"{what} whose header claims more pixels are refused (default {MAX_PIXELS:_})")


def _number(kind, rule: str, within):
    """An argparse `type=`: a finite int or float within `rule`; otherwise argparse's one-line error, exit 2."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and within(value)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {rule}")
        return value

    parse.__name__ = f"{kind.__name__} {rule}"
    return parse


positive_int = _number(int, ">= 1", lambda v: v >= 1)
non_negative_int = _number(int, ">= 0", lambda v: v >= 0)
positive_float = _number(float, "> 0", lambda v: v > 0)
non_negative_float = _number(float, ">= 0", lambda v: v >= 0)
unit_float = _number(float, "in [0, 1]", lambda v: 0 <= v <= 1)
open_unit_float = _number(float, "in (0, 1]", lambda v: 0 < v <= 1)  # a probability mass such as top-p
world_image_size = _number(int, ">= 32 (the built-in world draws shapes at 32 px or more)", lambda v: v >= 32)


def text(value: str) -> str:
    """An argparse `type=` for a query, prompt or label list: not empty, not only whitespace."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty or only whitespace")
    return value


def unit_floats(value: str) -> list[float]:
    """An argparse `type=`: comma-separated numbers, each in [0, 1] (e.g. WiSE-FT's mixing alphas)."""
    return [unit_float(item.strip()) for item in value.split(",")]


def add_collection_flags(p) -> None:
    """Flags of the collection pipeline (search/collection.py) that `embed --images` and `index` share."""
    from vlfm.search.collection import default_workers

    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--workers", type=non_negative_int, default=default_workers(),
                   help=f"decoding processes (0: decode in the main process; default {default_workers()})")
    p.add_argument("--chunk-size", type=positive_int, default=512,
                   help="images per chunk file (the unit a rerun resumes from)")
    add_max_pixels(p, "images (skipped and counted)")


def distributed_run():
    """Under torchrun: the process group for the block (ranks share the collection's chunks). gloo, and a long
    timeout: at the merge the ranks wait for the slowest."""
    from vlfm import distributed

    return distributed.group_if_launched("gloo", timedelta(hours=12))
