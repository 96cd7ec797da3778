"""Nearest-neighbour search: FAISS + SQLite index, CLI, resume after interruption, model checks, bad input."""

import json

import numpy as np
import pytest
from PIL import Image

import vlfm
from vlfm.cli import main
from vlfm.search import SearchError, SearchIndex


def brute_force(model, folder, query, k):
    paths = sorted(p for p in folder.glob("0*.png"))
    vectors = model.embed_images([Image.open(p).convert("RGB") for p in paths]).numpy()
    order = np.argsort(-(vectors @ query[0]), kind="stable")[:k]
    return [str(paths[i]) for i in order]


def test_flat_index_is_exact_and_skips_broken_images(trained_run, scenes, tmp_path, capsys):
    assert main(["index", "build", str(trained_run), "--images", str(scenes), "--out", str(tmp_path / "idx")]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats == {"added": 300, "skipped": 1, "already_indexed": 0, "total": 300}
    model = vlfm.load(trained_run)
    index = SearchIndex.open(tmp_path / "idx")
    query = model.embed_texts(["a red circle"]).numpy()
    hits = index.search(query, k=10)[0]
    assert [h.path for h in hits] == brute_force(model, scenes, query, 10)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))

    assert main(["search", str(tmp_path / "idx"), "--image", str(scenes / "0007.png"), "-k", "3",
                 "--sheet", str(tmp_path / "sheet.png")]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[0] == "1" and out[1].split()[2].endswith("0007.png") and float(out[1].split()[1]) > 0.999
    assert (tmp_path / "sheet.png").is_file()


def test_interrupted_build_resumes_without_loss_or_duplicates(trained_run, scenes, tmp_path, monkeypatch):
    import faiss

    model = vlfm.load(trained_run)
    items = [(p, "") for p in sorted(scenes.glob("0*.png"))]
    index = SearchIndex.create(tmp_path / "idx", model, str(trained_run))
    real_write, calls = faiss.write_index, []

    def crash_on_third(*args):  # rows of batch 3 are committed, its vectors never reach the file
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(*args)

    monkeypatch.setattr(faiss, "write_index", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        index.add_images(model, items, batch_size=50, progress=False)
    monkeypatch.setattr(faiss, "write_index", real_write)
    index = SearchIndex.open(tmp_path / "idx")
    assert len(index) == 100 and index.index.ntotal == 100  # two batches kept, the third's rows dropped
    stats = index.add_images(model, items, batch_size=50, progress=False)
    assert stats == {"added": 200, "skipped": 0, "already_indexed": 100, "total": 300}
    again = SearchIndex.open(tmp_path / "idx")
    assert again.index.ntotal == 300 and len({h.path for h in again.search(model.embed_texts(["x"]).numpy(), k=300)[0]}) == 300


@pytest.mark.parametrize("kind,options", [("hnsw", {"hnsw_m": 8}), ("ivf", {"nlist": 4}), ("ivfpq", {"nlist": 4, "pq_m": 8})])
def test_approximate_kinds_find_the_exact_top_hit(trained_run, scenes, tmp_path, kind, options):
    model = vlfm.load(trained_run)
    items = [(p, c) for p, c in ((scenes / f"{i:04d}.png", f"scene {i}") for i in range(300))]
    index = SearchIndex.create(tmp_path / kind, model, str(trained_run), kind, **options)
    index.add_images(model, items, batch_size=64, progress=False)
    index = SearchIndex.open(tmp_path / kind)
    for i in (3, 150, 299):
        hit = index.search(model.embed_images([Image.open(scenes / f"{i:04d}.png")]).numpy(), k=1)[0][0]
        assert hit.caption == f"scene {i}" and hit.score == pytest.approx(1.0, abs=0.05)


def test_ivf_index_matches_exact_search_and_reopens(trained_run, tmp_path):
    """kind ivf (IVF-Flat) on clustered unit vectors, reopened from disk: its top 10 are the flat index's."""
    model = vlfm.load(trained_run)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, int(model.config.embed_dim)))
    vectors = centres[rng.integers(0, 8, 2000)] + 0.5 * rng.standard_normal((2000, centres.shape[1]))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    queries = vectors[:20] + 0.1 * rng.standard_normal(vectors[:20].shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for kind in ("flat", "ivf"):
        index = SearchIndex.create(tmp_path / kind, model, str(trained_run), kind, nlist=16)
        index._add(vectors, [(f"v{i}.png", f"item {i}") for i in range(len(vectors))])  # as add_collection does
        index._flush_staged()
    flat, ivf = SearchIndex.open(tmp_path / "flat"), SearchIndex.open(tmp_path / "ivf")
    assert len(ivf) == ivf.index.ntotal == 2000 and ivf.info["kind"] == "ivf"
    exact = flat.search(queries, k=10)
    found = ivf.search(queries, k=10)  # the default: 8 of the 16 lists
    assert np.mean([len({h.id for h in a} & {h.id for h in b}) / 10 for a, b in zip(exact, found)]) >= 0.95
    every = ivf.search(queries, k=10, nprobe=16)  # all lists: exact search
    assert [[h.id for h in hits] for hits in every] == [[h.id for h in hits] for hits in exact]
    assert [h.score for hits in every for h in hits] == pytest.approx([h.score for hits in exact for h in hits], abs=1e-5)


def test_captions_are_stored_and_index_add_appends(trained_run, scenes, tmp_path, capsys):
    first = tmp_path / "first.jsonl"  # elsewhere: its image paths are absolute
    lines = (scenes / "captions.jsonl").read_text().splitlines()
    first.write_text("\n".join(json.dumps({**json.loads(row), "filepath": str(scenes / json.loads(row)["filepath"])})
                                for row in lines[:100]))  # fmt: skip
    assert main(["index", "build", str(trained_run), "--captions", str(first), "--out", str(tmp_path / "idx")]) == 0
    assert main(["index", "add", str(tmp_path / "idx"), "--captions", str(scenes / "captions.jsonl")]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["added"] == 200 and stats["already_indexed"] == 100 and stats["total"] == 300
    hit = SearchIndex.open(tmp_path / "idx").search(vlfm.load(trained_run).embed_texts(["a"]).numpy(), k=1)[0][0]
    assert hit.caption == json.loads(lines[int(hit.path[-8:-4])])["caption"]


def test_queries_from_another_model_are_refused(trained_run, scenes, tmp_path, capsys):
    assert main(["index", "build", str(trained_run), "--images", str(scenes), "--out", str(tmp_path / "idx")]) == 0
    other = vlfm.load(trained_run)
    other.logit_scale.data += 1  # any weight differs: another model
    other.save(tmp_path / "other")
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "a red circle", "--checkpoint", str(tmp_path / "other")]) == 2
    assert "not comparable" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "other"), "--images", str(scenes), "--out", str(tmp_path / "idx")]) == 2
    assert "not comparable" in capsys.readouterr().err
    assert SearchIndex.open(tmp_path / "idx").index.ntotal == 300  # nothing lost


def test_bad_input_gets_clear_errors(trained_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["index", "build", str(trained_run), "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "i")]) == 2
    assert "holds no image files" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"junk")
    assert main(["index", "build", str(trained_run), "--images", str(tmp_path / "junk"), "--out", str(tmp_path / "j")]) == 2
    assert "none of the 1 images could be decoded" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("path,text\nx.png,hello\n")
    assert main(["index", "build", str(trained_run), "--captions", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "k")]) == 2
    assert "lacks column(s) filepath, caption" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nowhere"), "a red circle"]) == 2
    assert "not an index" in capsys.readouterr().err
    Image.new("RGB", (32, 32), "red").save(tmp_path / "one.png")
    index = SearchIndex.create(tmp_path / "small", vlfm.load(trained_run), str(trained_run), "ivfpq", nlist=10, pq_m=8)
    with pytest.raises(SearchError, match="needs at least 390 vectors"):
        index.add_images(vlfm.load(trained_run), [(tmp_path / "one.png", "")], progress=False)
