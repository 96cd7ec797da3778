import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vlfm
from vlfm.io import CheckpointError, atomic_directory, atomic_file


def test_save_load_round_trip(trained_run, tmp_path):
    model = vlfm.load(trained_run)
    assert model.tokenizer is not None
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    ids, mask = model.tokenize(["a red circle", "two shapes: a big blue star and a small green cross", "x"])
    again = vlfm.load(model.save(tmp_path / "copy"))
    assert torch.equal(model.encode_image(images), again.encode_image(images))
    assert torch.equal(model.encode_text(ids, mask), again.encode_text(ids, mask))
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
        "config.json", "manifest.json", "model.safetensors", "preprocess.json", "tokenizer.json", "tokenizer_config.json"]


def test_missing_weights_is_an_error(trained_run, tmp_path):
    target = tmp_path / "broken"
    vlfm.load(trained_run).save(target)
    (target / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing .the manifest lists it"):
        vlfm.load(target)
    (target / "manifest.json").unlink()  # a directory saved before manifests
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        vlfm.load(target)


def test_mismatched_weights_list_the_keys(trained_run, tmp_path):
    target = tmp_path / "mismatch"
    vlfm.load(trained_run).save(target)
    state = load_file(str(target / "model.safetensors"))
    state.pop("logit_scale")
    state["extra.weight"] = torch.zeros(2)
    state["visual.pos_embed"] = torch.zeros(1, 3, 32)
    save_file(state, str(target / "model.safetensors"))
    (target / "manifest.json").unlink()  # weights written by hand, past the manifest's sizes
    with pytest.raises(CheckpointError) as error:
        vlfm.load(target)
    message = str(error.value)
    assert "missing: logit_scale" in message and "unexpected: extra.weight" in message
    assert "visual.pos_embed: checkpoint (1, 3, 32)" in message


def test_foreign_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="'gpt2'"):
        vlfm.load(tmp_path)


def test_atomic_directory_keeps_old_contents_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind


def test_atomic_file_keeps_the_old_file_on_failure_and_keeps_the_suffix(tmp_path):
    target = tmp_path / "vectors.npy"
    with atomic_file(target) as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path  # np.save adds .npy to a name without it
        np.save(tmp, np.arange(3))
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            np.save(tmp, np.arange(5))
            raise RuntimeError("killed while writing")
    assert np.load(target).tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.npy"]  # no temporary left behind


def test_checkpoint_written_before_the_layered_layout_still_loads():
    """tests/data/checkpoint-v1 was saved by the code of 1cd17d9 (before models registered their architectures),
    with the embeddings it gave for fixed inputs."""
    from safetensors.torch import load_file

    data = Path(__file__).parent / "data"
    model = vlfm.load(data / "checkpoint-v1", precision="fp32")
    expected = load_file(str(data / "checkpoint-v1-expected.safetensors"))
    image = model.embed_images(model.preprocess_config.normalize(expected["pixels"]))
    torch.testing.assert_close(image, expected["image_embeddings"], rtol=1e-5, atol=1e-6)
    text = model.embed_texts(["a red circle", "a blue square"])
    torch.testing.assert_close(text, expected["text_embeddings"], rtol=1e-5, atol=1e-6)
