"""A truncated shard never stops (or hangs) training data loading: it is read up to the break and counted."""

from PIL import Image

from vlfm.data.shards import Skipped, folder_items, read_shards, write_shards


def test_truncated_shard_is_counted_and_reading_goes_on(tmp_path, caplog):
    root = tmp_path / "scenes"
    root.mkdir()
    for i in range(25):
        Image.new("RGB", (32, 32), (i * 9, 0, 0)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"caption {i}")
    shards = write_shards(folder_items(root), tmp_path / "shards", maxcount=10)["shards"]
    middle = tmp_path / "shards" / "shard-000001.tar"
    middle.write_bytes(middle.read_bytes()[: middle.stat().st_size // 2 + 100])
    skipped = Skipped()
    captions = [c for _, c in read_shards(tmp_path / "shards", skipped=skipped)]
    assert len(shards) == 3 and len(skipped.broken_shards) == 1 and "shard-000001.tar" in skipped.broken_shards[0]
    assert captions[:10] == [f"caption {i}" for i in range(10)] and captions[-5:] == [f"caption {i}" for i in range(20, 25)]
    assert 10 + 5 <= len(captions) < 25 and len(skipped) == 0  # the break loses the rest of that shard, no image is skipped
    skipped.report("shards")
    assert "1 truncated or unreadable shard" in caplog.text
