"""Labelled datasets (digits, lfw_subset, class folders), the linear probe, and `vlfm eval --task`."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlfm
from vlfm.adapt.linear_probe import fit_logistic, image_features, linear_probe
from vlfm.cli import main
from vlfm.data.datasets import class_folders, digits, lfw_subset, load_dataset


def test_digits_and_lfw_subset_ship_offline():
    d = digits()
    assert len(d) == 1797 and d.classnames[3] == "3" and sorted(set(d.targets.tolist())) == list(range(10))
    pixels = np.asarray(d.images[0])
    assert pixels.shape == (8, 8, 3) and pixels.max() == 255 and pixels.mean() > 128  # dark ink on light paper
    f = lfw_subset()
    assert len(f) == 200 and f.targets.tolist() == [0] * 100 + [1] * 100 and f.images[0].size == (25, 25)


def test_split_is_stratified_disjoint_and_deterministic():
    d = digits()
    split = d.split(seed=0)
    assert split["train"].tolist() == d.split(seed=0)["train"].tolist()
    everything = torch.cat(list(split.values()))
    assert len(everything) == len(d) and len(set(everything.tolist())) == len(d)
    counts = torch.bincount(d.targets[split["test"]], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # 20% of ~180 per class


def colour_folders(root, broken=True):
    rng = np.random.default_rng(0)
    for name, rgb in {"red_thing": (220, 30, 30), "blue_thing": (30, 60, 220), "green_thing": (30, 170, 50)}.items():
        (root / name).mkdir(parents=True)
        for i in range(20):
            noise = rng.integers(-40, 40, (32, 32, 3))
            Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    if broken:
        (root / "red_thing" / "broken.png").write_bytes(b"nope")
    return root


def test_class_folders_skip_broken_images_and_need_two_classes(tmp_path):
    data = class_folders(colour_folders(tmp_path / "colours"))
    assert len(data) == 60 and data.skipped == 1 and data.classnames == ["blue thing", "green thing", "red thing"]
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least two class folders"):
        class_folders(tmp_path / "one")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_logistic_regression_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 5, generator=g) * 4
    y = torch.arange(3).repeat_interleave(30)
    x = centres[y] + torch.randn(90, 5, generator=g) * 0.3
    weight, bias = fit_logistic(x, y, 3, 1e-4)
    assert ((x @ weight.T + bias).argmax(1) == y).all()
    small, _ = fit_logistic(x, y, 3, 10.0)
    assert small.norm() < weight.norm()  # weight decay shrinks the weights


def test_linear_probe_on_class_folders(trained_run, tmp_path):
    model = vlfm.load(trained_run)
    data = class_folders(colour_folders(tmp_path / "colours", broken=False))
    assert image_features(model, data.images[:4], "tokens").shape == (4, 16 * 32)  # 4x4 grid x width 32
    result = linear_probe(model, data, "tokens")
    assert result["top1"] == 1.0 and result["test_size"] == 12 and result["weight_decay"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    with pytest.raises(ValueError, match="features 'cls'"):
        image_features(model, data.images[:2], "cls")


def test_eval_tasks_write_json_and_csv_rows(trained_run, tmp_path, capsys):
    table = tmp_path / "results.csv"
    folders = colour_folders(tmp_path / "colours")
    assert main(["eval", str(trained_run), "--task", "linear_probe", "--dataset", str(folders), "--csv", str(table),
                 "--out", str(tmp_path / "probe.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "probe.json").read_text())["features"] == "pooled"
    assert main(["eval", str(trained_run), "--task", "zeroshot_classification", "--dataset", "lfw_subset",
                 "--csv", str(table), "--out", str(tmp_path / "zs.json")]) == 0  # fmt: skip
    zs = json.loads((tmp_path / "zs.json").read_text())
    assert zs["ensemble_gain"] == pytest.approx(zs["top1"] - zs["top1_single_template"]) and zs["images"] == 200
    rows = [{"filepath": str(p), "caption": p.parent.name.replace("_", " ")} for p in sorted(folders.glob("*/*.png"))]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["eval", str(trained_run), "--task", "zeroshot_retrieval", "--dataset", str(tmp_path / "caps.jsonl"),
                 "--csv", str(table), "--out", str(tmp_path / "ret.json")]) == 0  # fmt: skip
    ret = json.loads((tmp_path / "ret.json").read_text())
    assert ret["skipped"] == 1 and ret["images"] == 60 and 0 <= ret["t2i_r1"] <= 1
    lines = list(csv.DictReader(table.open()))
    assert [r["task"] for r in lines] == ["linear_probe", "zeroshot_classification", "zeroshot_retrieval"]
    assert lines[0]["top1"] and not lines[0]["t2i_r1"] and lines[2]["t2i_r1"]
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--task", "linear_probe", "--dataset", "mnist", "--csv", str(table)]) == 2
    assert "unknown dataset 'mnist'" in capsys.readouterr().err


def test_label_embeddings_average_synonyms(trained_run):
    model = vlfm.load(trained_run)
    both = model.label_embeddings([["a red circle", "a blue square"]], ["{}", "a photo of {}"])
    parts = model.embed_texts(["a red circle", "a photo of a red circle", "a blue square", "a photo of a blue square"])
    assert torch.allclose(both[0], torch.nn.functional.normalize(parts.mean(0), dim=0), atol=1e-5)
    assert torch.allclose(model.label_embeddings(["a red circle"])[0], parts[0], atol=1e-5)


def test_shapes_dataset_is_the_worlds_single_object_scenes(trained_run):
    data = load_dataset("shapes")
    assert len(data) == 600 and len(data.classnames) == 30 and data.classnames[0] == "a red circle"
    assert torch.bincount(data.targets).tolist() == [20] * 30


def test_eval_max_pixels_skips_and_counts_oversized_images(trained_run, tmp_path):
    folders = colour_folders(tmp_path / "colours", broken=False)
    Image.new("RGB", (64, 64), (220, 30, 30)).save(folders / "red_thing" / "big.png")  # 4096 pixels; the rest 1024
    rows = [{"filepath": str(p), "caption": p.parent.name.replace("_", " ")} for p in sorted(folders.glob("*/*.png"))]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    results = {}
    for cap in ("4096", "4095"):
        for task, dataset in (("zeroshot_classification", folders), ("zeroshot_retrieval", tmp_path / "caps.jsonl")):
            out = tmp_path / f"{task}_{cap}.json"
            assert main(["eval", str(trained_run), "--task", task, "--dataset", str(dataset), "--max-pixels", cap,
                         "--csv", str(tmp_path / "t.csv"), "--out", str(out)]) == 0  # fmt: skip
            results[task, cap] = json.loads(out.read_text())
    assert results["zeroshot_classification", "4096"]["images"] == 61
    assert results["zeroshot_classification", "4095"]["images"] == 60
    assert [results["zeroshot_retrieval", c]["skipped"] for c in ("4096", "4095")] == [0, 1]
    assert load_dataset(str(folders), max_pixels=4095).skipped == 1
