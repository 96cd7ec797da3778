"""WebDataset shards: written from a folder or caption file, read back, trained on; bad images skipped."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from vlfm.cli import main
from vlfm.data.shapes import ShapesWorld, WorldConfig
from vlfm.data.shards import Skipped, folder_items, read_shards, write_shards
from vlfm.data.world_text import captions
from vlfm.train import run


@pytest.fixture
def folder(tmp_path):
    """25 rendered scenes with .txt captions, one corrupt image, one image without a caption."""
    world = ShapesWorld(WorldConfig(image_size=32))
    root = tmp_path / "scenes"
    root.mkdir()
    for i in range(25):
        scene = world.scene("train", i)
        world.render(scene).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(captions(scene)[0])
    (root / "bad.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (32, 32), "red").save(root / "zz_nocaption.jpg")
    return root


def test_shards_round_trip_and_skip_bad_images(folder, tmp_path):
    stats = write_shards(folder_items(folder), tmp_path / "shards", maxcount=10)
    assert stats["written"] == 26 and stats["undecodable"] == 1 and len(stats["shards"]) == 3
    samples = list(read_shards(tmp_path / "shards"))
    assert len(samples) == 26 and samples[0][1] == (folder / "000.txt").read_text() and samples[-1][1] == ""
    assert np.array_equal(np.asarray(samples[3][0]), np.asarray(Image.open(folder / "003.png").convert("RGB")))
    pattern = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    assert len(list(read_shards(pattern))) == 20
    skipped = Skipped()
    assert len(list(read_shards(tmp_path / "shards", max_pixels=100, skipped=skipped))) == 0
    assert len(skipped.oversized) == 26  # 32x32 > 100 pixels: every image is "oversized" here
    with pytest.raises(FileExistsError, match="already holds"):
        write_shards(folder_items(folder), tmp_path / "shards")


def test_training_reads_shards(folder, tmp_path):
    write_shards(folder_items(folder), tmp_path / "shards", maxcount=10)
    config = tiny_config(tmp_path, f"data.source={tmp_path / 'shards'}", "data.eval_size=0", "data.classify_size=0",
                         "train.steps=2", "train.batch_size=8", "train.save_every=0")  # fmt: skip
    run(config)
    assert (config.run_dir / "model" / "model.safetensors").is_file()
    assert len((config.run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # steps 2, logged every 2


def test_cli_shard_from_a_caption_file(folder, tmp_path, capsys):
    rows = [{"filepath": f"{i:03d}.png", "caption": f"scene {i}"} for i in range(5)] + [{"filepath": "bad.png", "caption": "x"}]
    (folder / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["data", "shard", str(folder / "caps.jsonl"), "--out", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == {"written": 5, "undecodable": 1, "oversized": 0}
    assert [c for _, c in read_shards(tmp_path / "s")] == [f"scene {i}" for i in range(5)]
    (tmp_path / "empty").mkdir()
    assert main(["data", "shard", str(tmp_path / "empty"), "--out", str(tmp_path / "t")]) == 2
    assert "holds no image files" in capsys.readouterr().err
