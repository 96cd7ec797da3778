"""The precision a model trains and embeds in: `auto` is bf16 where bf16 is fast (nn.fast_bf16), else fp32;
bf16 embeddings stay close to fp32's, and fp32 stays exactly the fp32 computation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import vlfm
from conftest import tiny_config
from vlfm.cli import main
from vlfm.nn import autocast, fast_bf16, resolve_precision
from vlfm.train import run

CPU = torch.device("cpu")


def test_auto_is_bf16_exactly_where_it_is_fast():
    assert resolve_precision("auto", CPU) == ("bf16" if fast_bf16("cpu") else "fp32")
    assert [resolve_precision(p, CPU) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="precision 'half': choose one of auto, fp32, bf16, fp16"):
        resolve_precision("half", CPU)
    assert isinstance(autocast(CPU, "bf16"), torch.autocast)


def test_bf16_embeddings_are_close_to_fp32_and_fp32_is_exact(trained_run):
    fp32 = vlfm.load(trained_run, precision="fp32")
    bf16 = vlfm.load(trained_run, precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = ["a red circle", "a blue square left of a green star", "two triangles"]
    with torch.no_grad():
        exact_images = F.normalize(fp32.encode_image(pixels), dim=-1)
        ids, mask = fp32.tokenize(texts)
        exact_texts = F.normalize(fp32.encode_text(ids, mask), dim=-1)
    assert torch.equal(fp32.embed_images(pixels), exact_images) and torch.equal(fp32.embed_texts(texts), exact_texts)
    for low, exact in ((bf16.embed_images(pixels), exact_images), (bf16.embed_texts(texts), exact_texts)):
        assert low.dtype == torch.float32 and not torch.equal(low, exact)  # bf16 did run
        assert (low - exact).abs().max() <= 2e-2 and (low * exact).sum(-1).min() >= 0.999


def test_patch_projection_stays_fp32_under_autocast_without_gradients(trained_run):
    visual = vlfm.load(trained_run, precision="fp32").visual
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = visual.embed(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inference = visual.embed(pixels)
    assert inference.dtype == torch.float32 and torch.equal(inference, exact)  # raw pixels never rounded to bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        training = visual.embed(pixels)
    assert training.dtype == torch.bfloat16 and training.requires_grad  # training keeps the stem in bf16


def test_training_records_the_precision_auto_stands_for(tmp_path):
    config = tiny_config(tmp_path, "train.steps=2", "train.save_every=0", "data.eval_size=0", "data.classify_size=0")
    assert config.train.precision == "auto"
    run(config)
    saved = yaml.safe_load((config.run_dir / "config.yaml").read_text())
    assert saved["train"]["precision"] == resolve_precision("auto", CPU)


def test_embed_command_takes_the_precision(trained_run, tmp_path):
    (tmp_path / "t.txt").write_text("a red circle\na blue square\n")
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.npy"
        assert main(["embed", str(trained_run), "--texts", str(tmp_path / "t.txt"), "--out", str(out),
                     "--precision", precision]) == 0
    want = vlfm.load(trained_run, precision="fp32").embed_texts(["a red circle", "a blue square"]).numpy()
    assert np.array_equal(np.load(tmp_path / "fp32.npy"), want)
    assert 0 < np.abs(np.load(tmp_path / "bf16.npy") - want).max() <= 2e-2
