"""Streaming shards (data.stream): split by rank and worker, seeded shuffles, exact resume mid-epoch, bad shards
counted, and a streamed training run that checkpoints, resumes and records the samples it saw."""

import json
import shutil

import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_config
from vlfm.cli import main
from vlfm.config import ConfigError
from vlfm.data.shards import folder_items, write_shards
from vlfm.data.stream import ShardBatches
from vlfm.data.transforms import Preprocess
from vlfm.train import run


def write_numbered(tmp_path, n=48, maxcount=4):
    """n tiny images captioned "sample i" (distinct: a caption names its sample) in shards of maxcount."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (12, 10), (i * 5 % 255, 40, 90)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"sample {i}")
    return write_shards(folder_items(root), tmp_path / "shards", maxcount=maxcount)["shards"]


def stream(tmp_path, **kwargs):
    options = {"batch_size": 4, "seed": 0, "workers": 0, "shuffle_buffer": 6} | kwargs
    return ShardBatches(str(tmp_path / "shards"), Preprocess(image_size=8), **options)


def take(batches, start, count):
    return [batches.next(i) for i in range(start, start + count)]


def captions(batches):
    return [c for batch in batches for c in batch["captions"]]


def test_ranks_and_workers_split_each_epoch_without_overlap(tmp_path):
    write_numbered(tmp_path)  # 12 shards; 2 ranks x 3 workers = 6 readers of 2 shards (8 samples, 2 batches) each
    ranks = [stream(tmp_path, rank=r, world=2, workers=3) for r in range(2)]
    epochs = [[captions(take(b, e * 6, 6)) for b in ranks] for e in range(2)]
    everything = {f"sample {i}" for i in range(48)}
    for first, second in epochs:
        assert len(first) == len(second) == 24 and set(first) | set(second) == everything
    assert epochs[0] != epochs[1]  # another shard order and buffer shuffle each epoch
    assert [r["epoch"] for b in ranks for r in b.state()["readers"][b.rank * 3 : b.rank * 3 + 3]] == [1] * 6


def test_the_shuffle_is_deterministic_for_a_seed(tmp_path):
    write_numbered(tmp_path)
    first, again, other = (captions(take(stream(tmp_path, seed=s), 0, 12)) for s in (0, 0, 1))
    assert first == again and first != other
    assert sorted(first) == sorted(f"sample {i}" for i in range(48))  # one reader, one epoch: every sample once


def test_resume_mid_epoch_gives_the_batches_of_an_uninterrupted_stream(tmp_path):
    write_numbered(tmp_path)  # 2 workers: 24 samples (6 batches of 4) per reader and epoch; 17 batches cross one
    straight = take(stream(tmp_path, workers=2), 0, 17)
    interrupted = stream(tmp_path, workers=2)
    take(interrupted, 0, 7)  # stopped inside the first epoch, on an odd batch (the other worker is next)
    state = json.loads(json.dumps(interrupted.state()))  # as train_state.json stores it
    resumed = stream(tmp_path, workers=2)
    resumed.load_state(state)
    for a, b in zip(straight[7:], take(resumed, 7, 10)):
        assert a["captions"] == b["captions"] and torch.equal(a["images"], b["images"])
    with pytest.raises(RuntimeError, match="in order"):
        resumed.next(3)
    with pytest.raises(ConfigError, match="workers 2 -> 1"):
        stream(tmp_path, workers=1).load_state(state)


def test_truncated_shard_and_bad_images_are_counted_and_the_stream_goes_on(tmp_path):
    shards = write_numbered(tmp_path, n=16)  # 4 shards of 4
    with wds.TarWriter(str(tmp_path / "shards" / "shard-000004.tar")) as sink:  # one good image, one that never decodes
        sink.write({"__key__": "bad", "png": b"\x89PNG broken", "txt": "bad"})
        sink.write({"__key__": "good", "png": (tmp_path / "images" / "000.png").read_bytes(), "txt": "sample 0 again"})
    broken = tmp_path / "shards" / "shard-000001.tar"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2 + 100])
    batches = stream(tmp_path, batch_size=3)
    seen = captions(take(batches, 0, 12))  # 36 samples: more than two epochs of 14-15 decodable samples
    readers = batches.state()["readers"]
    assert readers[0]["epoch"] >= 2 and readers[0]["broken_shards"] == [shards[1]]  # counted once, not per epoch
    assert readers[0]["undecodable"] == batches.skipped() == 2  # the bad image, once per epoch
    assert {f"sample {i}" for i in [*range(4), *range(8, 16)]} | {"sample 0 again"} <= set(seen)
    assert "bad" not in seen


def test_fewer_shards_than_readers_is_refused(tmp_path):
    write_numbered(tmp_path, n=12)  # 3 shards
    with pytest.raises(ConfigError, match="3 shard.*4 stream readers.*write at least 4 shards"):
        stream(tmp_path, rank=0, world=2, workers=2)
    with pytest.raises(ConfigError, match="vlfm data shard"):
        tiny_config(tmp_path, "data.stream=true")  # the built-in world is not shards


def test_streamed_training_checkpoints_resumes_and_counts_samples(tmp_path, capsys):
    assert main(["data", "shard", "--world", "64", "--maxcount", "8", "--image-size", "32", "--out", str(tmp_path / "s")]) == 0
    assert "wrote 8 shard(s)" in capsys.readouterr().out
    options = [f"data.source={tmp_path / 's'}", "data.stream=true", "data.workers=2", "data.eval_size=0",
               "data.classify_size=0", "train.steps=2", "train.batch_size=8", "train.grad_accum=2",
               "train.save_every=1", "train.log_every=1"]  # fmt: skip
    straight = tiny_config(tmp_path, *options, name="straight")
    run(straight)
    resumed = tiny_config(tmp_path, *options, name="resumed")
    run(resumed, stop_after=1)
    run(resumed, resume=True)
    a, b = (load_file(str(c.run_dir / "model" / "model.safetensors")) for c in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples_seen"] for r in records] == [16, 32] and {r["skipped"] for r in records} == {0}
    state = json.loads((resumed.run_dir / "checkpoints" / "step_00000002" / "train_state.json").read_text())
    assert state["samples_seen"] == 32 and state["data"]["batches"] == 4  # 2 steps x 2 micro-batches of 8
    assert sum(r["epoch"] * 32 + r["offset"] for r in state["data"]["readers"]) == 32  # 2 readers of 32 samples


def test_two_ranks_stream_resume_exactly_and_refuse_another_world_size(tmp_path):
    from test_distributed_train import torchrun, weights

    main(["data", "shard", "--world", "32", "--maxcount", "8", "--image-size", "32", "--out", str(tmp_path / "s")])
    options = [f"data.source={tmp_path / 's'}", "data.stream=true", "data.workers=1", "data.eval_size=0",
               "train.steps=4", "train.batch_size=8", "train.save_every=2"]  # fmt: skip
    done = torchrun(tmp_path, "straight", *options)
    assert done.returncode == 0, done.stderr[-2000:]
    copy = tmp_path / "copy"  # the same run stopped after its step-2 checkpoint
    shutil.copytree(tmp_path / "straight", copy)
    shutil.rmtree(copy / "model")
    shutil.rmtree(copy / "checkpoints" / "step_00000004")
    done = torchrun(tmp_path, "copy", *options, flags=["--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = weights(tmp_path / "straight"), weights(copy)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((copy / "checkpoints" / "step_00000004" / "train_state.json").read_text())["data"]
    assert [(r["epoch"], r["offset"]) for r in state["readers"]] == [(0, 16), (0, 16)]  # 2 ranks x 4 batches of 4
    shutil.rmtree(copy / "model")
    with pytest.raises(ConfigError, match="world_size 2 -> 1"):
        run(tiny_config(tmp_path, *options, name="copy"), resume=True)
