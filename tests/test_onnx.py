"""`vlfm export --to onnx`: both encoders under onnxruntime equal vlfm's embeddings within 1e-4 at two batch sizes
(a causal CLIP text tower, and a bidirectional mean-pooled one that reads the mask), with the files beside them."""

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import vlfm
from conftest import TINY
from vlfm.cli import main
from vlfm.config import load_config
from vlfm.models import TextEncoder, TwoTowerModel

TEXTS = ["a red circle", "a photo of a blue square and a red circle", "it", "the dog is blue", "a cat"]


def bidirectional(trained_run, tmp_path):
    """A SigLIP-kind model with a conv stem (BatchNorm: exported in eval mode, not with batch statistics) and a
    bidirectional, mean-pooled text tower (random weights, the run's tokenizer)."""
    config = load_config(None, TINY + [f"output_dir={tmp_path}", "model.kind=siglip", "model.text.causal=false",
                                       "model.text.pool=mean", "model.vision.stem=conv"]).model  # fmt: skip
    torch.manual_seed(0)
    model = TwoTowerModel(config, tokenizer=vlfm.load(trained_run).tokenizer)
    return model.save(tmp_path / "bidirectional")


@pytest.mark.parametrize("which", ["clip", "bidirectional"])
def test_onnx_encoders_equal_vlfm(trained_run, tmp_path, capsys, which):
    checkpoint = trained_run if which == "clip" else bidirectional(trained_run, tmp_path)
    assert main(["export", str(checkpoint), str(tmp_path / "onnx"), "--to", "onnx"]) == 0
    out = tmp_path / "onnx"
    assert {"image_encoder.onnx", "text_encoder.onnx", "preprocess.json", "tokenizer.json", "onnx_config.json"} <= {
        p.name for p in out.iterdir()}  # fmt: skip
    config = json.loads((out / "onnx_config.json").read_text())
    assert config["text_inputs"] == (["input_ids"] if which == "clip" else ["input_ids", "attention_mask"])
    model = vlfm.load(checkpoint, precision="fp32")  # the ONNX graphs compute in fp32
    image = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        got = image.run(None, {"pixel_values": pixels.numpy()})[0]
        assert got.shape == (batch, 32) and np.abs(got - model.embed_images(pixels).numpy()).max() <= 1e-4
        ids, mask = model.tokenize(TEXTS[:batch])
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        got = text.run(None, {name: feeds[name] for name in config["text_inputs"]})[0]
        assert got.shape == (batch, 32) and np.abs(got - model.embed_texts(TEXTS[:batch]).numpy()).max() <= 1e-4
    if which == "bidirectional":  # the mask matters: dropping it changes padded texts
        ones = text.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(mask.numpy())})[0]
        assert np.abs(ones - got).max() > 1e-3


def test_export_refuses_a_text_encoder(trained_run, tmp_path, capsys):
    model = vlfm.load(trained_run)
    TextEncoder(model.text.config, model.tokenizer).save(tmp_path / "text")
    assert main(["export", str(tmp_path / "text"), str(tmp_path / "o"), "--to", "onnx"]) == 2
    assert "export needs an image-text model; this checkpoint is a TextEncoder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("training", [False, True])
def test_export_leaves_the_model_in_its_mode(trained_run, tmp_path, training):
    """The exporter puts a module it found training back into training mode: a model in eval mode must stay there
    (BatchNorm's batch statistics would change the caller's next embeddings)."""
    from vlfm.models.onnx import export_onnx

    model = vlfm.load(trained_run).train(training)
    export_onnx(model, tmp_path / "onnx")
    assert model.training is training and all(m.training is training for m in model.modules())


def test_export_refuses_a_bfloat16_model_and_leaves_it_as_it_was(trained_run, tmp_path):
    from vlfm.io import UsageError
    from vlfm.models.onnx import export_onnx

    model = vlfm.load(trained_run).to(torch.bfloat16).train()
    with pytest.raises(UsageError, match="traces a float32 model on the CPU"):
        export_onnx(model, tmp_path / "onnx")
    assert model.training and not (tmp_path / "onnx").exists()


def test_export_without_onnx_says_what_to_install(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the onnx package were not installed
    assert main(["export", str(trained_run), str(tmp_path / "onnx"), "--to", "onnx"]) == 2
    assert "pip install 'vlfm[onnx]'" in capsys.readouterr().err and not (tmp_path / "onnx").exists()
