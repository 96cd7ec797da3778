"""Parity of vlfm's open_clip loader with open_clip itself (the real package, not a layout written by us).

open_clip needs torchvision, which does not import beside the project's torch, so this runs in the bench
environment: `make parity-open-clip` (builds .venv-bench once). For each model config shipped inside
open_clip (no download: random weights), it saves the state dict as open_clip does, loads it with vlfm and
prints the largest difference of image and text features, and whether the tokenizers agree.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import open_clip
import torch

import vlfm


def check(name: str, work: Path) -> dict:
    model = open_clip.create_model(name, pretrained=None).eval()
    config = Path(open_clip.__file__).parent / "model_configs" / f"{name}.json"
    torch.save(model.state_dict(), work / f"{name}.pt")
    ours = vlfm.load(work / f"{name}.pt", config=config)
    tokenizer = open_clip.get_tokenizer(name)
    texts = ["a photo of a cat", "A RED circle, left of two blue squares!", "x"]
    ids = tokenizer(texts)
    size = ours.config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = (ours.encode_image(pixels) - model.encode_image(pixels)).abs().max().item()
        text = (ours.encode_text(ids, (ids != 0).long()) - model.encode_text(ids)).abs().max().item()
    return {"model": name, "image_max_abs_diff": image, "text_max_abs_diff": text,
            "logit_scale_equal": bool(torch.equal(ours.logit_scale, model.logit_scale))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16-quickgelu"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(json.dumps(check(name, Path(tmp))))


if __name__ == "__main__":
    main()
