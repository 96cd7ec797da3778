import json
import os

import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel

from vlfm.config import load_config

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub; everything is built or shipped locally

CLIP_WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "circle", "it", "is", "and", "blue", "square"]

TINY = [
    "model.embed_dim=32",
    "model.vision.width=32", "model.vision.layers=2", "model.vision.heads=2", "model.vision.patch_size=8",
    "model.vision.image_size=32", "data.world.image_size=32",
    "model.text.width=32", "model.text.layers=2", "model.text.heads=2", "model.text.vocab_size=512",
    "data.train_size=256", "data.eval_size=64", "data.classify_size=30", "data.workers=1",
    "train.batch_size=32", "train.steps=6", "train.warmup_steps=2", "train.eval_every=0", "train.save_every=3",
    "train.log_every=2",
]


def tiny_config(tmp_path, *overrides, name="tiny"):
    return load_config(None, TINY + [f"output_dir={tmp_path}", f"name={name}", *overrides])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny CLIP run trained once for the whole session (its directory: model/, eval.json, plots)."""
    from vlfm.train import run

    tmp = tmp_path_factory.mktemp("runs")
    config = tiny_config(tmp)
    run(config)
    return config.run_dir


@pytest.fixture(scope="session")
def scenes(tmp_path_factory):
    """300 rendered 32-px scenes as PNG files, a corrupt one, and a caption file for them."""
    from vlfm.data.shapes import ShapesWorld, WorldConfig
    from vlfm.data.world_text import captions

    folder = tmp_path_factory.mktemp("scenes")
    world = ShapesWorld(WorldConfig(image_size=32))
    rows = []
    for i in range(300):
        scene = world.scene("val", i)
        world.render(scene).save(folder / f"{i:04d}.png")
        rows.append({"filepath": f"{i:04d}.png", "caption": captions(scene)[0]})
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def write_clip_files(directory):
    """A byte-level vocabulary (every byte, alone and word-final) plus merges that spell CLIP_WORDS."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [char + "</w>" for char in alphabet]
    merges: list[tuple[str, str]] = []
    for word in CLIP_WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: "p h o t o</w>" -> "ph o t o</w>" -> ...
            pair = (parts[0], parts[1])
            parts = [parts[0] + parts[1], *parts[2:]]
            if pair not in merges:
                merges.append(pair)
                tokens.append(parts[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory / "vocab.json", directory / "merges.txt"
