"""The collection pipeline (search/collection.py) behind `vlfm embed --images` and `vlfm index build`: decoding
workers give the single-process result, a SIGKILLed run resumes to the uninterrupted output without embedding
anything twice, skipped files are counted, and two torchrun ranks merge into one process's output and index."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_distributed_train import free_port

import vlfm
from vlfm.cli import main
from vlfm.data.shapes import ShapesWorld, WorldConfig
from vlfm.data.shards import write_world_shards
from vlfm.models import TwoTowerModel
from vlfm.search import SearchIndex


def embed(run, source, out, *flags):
    assert main(["embed", str(run), "--images", str(source), "--out", str(out), *flags]) == 0
    return np.load(out), out.with_suffix(".txt").read_text().splitlines()


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_workers_give_the_single_process_output_and_count_skipped(trained_run, scenes, tmp_path, capsys):
    one, rows = embed(trained_run, scenes, tmp_path / "w0.npy", "--workers", "0", "--chunk-size", "40")
    assert last_json(capsys)["skipped"] == 1 and one.shape == (300, 32) and "broken.png" not in " ".join(rows)
    assert rows == [str(p) for p in sorted(scenes.glob("0*.png"))]
    two, rows_two = embed(trained_run, scenes, tmp_path / "w2.npy", "--workers", "2", "--chunk-size", "40")
    assert np.array_equal(one, two) and rows == rows_two and not (tmp_path / "w2.parts").exists()
    reference = vlfm.load(trained_run).embed_images([vlfm.io.open_image(p) for p in rows]).numpy()
    assert np.abs(one - reference).max() < 1e-5  # the pipeline embeds what model.embed_images does


def test_caption_files_and_shards_are_sources(trained_run, scenes, tmp_path, capsys):
    folder, _ = embed(trained_run, scenes, tmp_path / "folder.npy", "--workers", "0")
    listed, rows = embed(trained_run, scenes / "captions.jsonl", tmp_path / "captions.npy", "--workers", "0")
    assert np.array_equal(folder, listed) and last_json(capsys)["skipped"] == 0
    write_world_shards(30, tmp_path / "shards", maxcount=12, image_size=32)
    shards, keys = embed(trained_run, tmp_path / "shards", tmp_path / "shards.npy", "--workers", "2", "--chunk-size", "5")
    assert shards.shape == (30, 32) and keys[0].endswith("shard-000000.tar:000000000") and len(set(keys)) == 30
    world = ShapesWorld(WorldConfig(image_size=32))
    scene_7 = vlfm.load(trained_run).embed_images([world.render(world.scene("train", 7))]).numpy()
    assert np.abs(shards[7] - scene_7).max() < 1e-5


def test_sigkilled_run_resumes_to_the_uninterrupted_output(trained_run, scenes, tmp_path, monkeypatch, capsys):
    """Item 101 is a FIFO: the run blocks opening it after writing chunks 0-4 (20 items each), is SIGKILLed
    there, and the rerun (the FIFO now the real image) embeds only the 201 items of the missing chunks."""
    rows = [json.loads(line) for line in (scenes / "captions.jsonl").read_text().splitlines()]
    rows = [{**row, "filepath": str(scenes / row["filepath"])} for row in rows]
    rows.insert(50, {"filepath": str(scenes / "broken.png"), "caption": "undecodable"})
    (tmp_path / "ref.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reference, reference_rows = embed(trained_run, tmp_path / "ref.jsonl", tmp_path / "ref.npy", "--chunk-size", "20")
    rows[101]["filepath"] = str(tmp_path / "late.png")  # scene 0100
    os.mkfifo(tmp_path / "late.png")
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "e.npy"
    args = [sys.executable, "-m", "vlfm.cli", "embed", str(trained_run), "--images", str(tmp_path / "list.jsonl"),
            "--out", str(out), "--workers", "0", "--chunk-size", "20"]  # fmt: skip
    process = subprocess.Popen(args, env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE)
    parts = tmp_path / "e.parts"
    deadline = time.monotonic() + 60
    while len(list(parts.glob("chunk-*.npz"))) < 5 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # it is now blocked on the FIFO: nothing more can be written
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert sorted(p.name for p in parts.glob("chunk-*")) == [f"chunk-{k:06d}.npz" for k in range(5)]
    os.unlink(tmp_path / "late.png")
    (tmp_path / "late.png").write_bytes((scenes / "0100.png").read_bytes())

    embedded = []
    real = TwoTowerModel.embed_images
    monkeypatch.setattr(TwoTowerModel, "embed_images", lambda self, x, *a: embedded.append(len(x)) or real(self, x, *a))
    resumed, resumed_rows = embed(trained_run, tmp_path / "list.jsonl", out, "--workers", "0", "--chunk-size", "20")
    assert sum(embedded) == 301 - 5 * 20  # 301 items (broken.png, item 50, in chunk 2), 5 chunks of 20 done
    assert last_json(capsys) == {"embedded": 300, "skipped": 1, "shape": [300, 32], "out": str(out)}
    assert np.array_equal(resumed, reference)
    assert [r.replace(str(tmp_path / "late.png"), str(scenes / "0100.png")) for r in resumed_rows] == reference_rows


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "vlfm.cli", *map(str, args)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_ranks_merge_into_one_output_and_one_index(trained_run, scenes, tmp_path, capsys):
    """Ranks embed alternate chunks (2 workers each); rank 0 merges: the single process's array and index."""
    single, rows = embed(trained_run, scenes, tmp_path / "one.npy", "--workers", "0", "--chunk-size", "30")
    torchrun("embed", trained_run, "--images", scenes, "--out", tmp_path / "two.npy", "--chunk-size", "30", "--workers", "1")
    assert np.array_equal(np.load(tmp_path / "two.npy"), single)
    assert (tmp_path / "two.txt").read_text().splitlines() == rows

    result = torchrun("index", "build", trained_run, "--images", scenes, "--out", tmp_path / "idx", "--chunk-size", "30")
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"added": 300, "skipped": 1, "already_indexed": 0, "total": 300}
    index = SearchIndex.open(tmp_path / "idx")
    hits = index.search(single[[3, 250]], k=1)
    assert [h[0].path for h in hits] == [rows[3], rows[250]] and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert not (tmp_path / "idx" / "embedding").exists()
