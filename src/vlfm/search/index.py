"""Nearest-neighbour search in a model's embedding space: a FAISS index with SQLite metadata beside it.

An index is a directory:
  index.faiss   the vectors (inner product on normalised embeddings), ids = SQLite row ids;
                kind flat (exact), hnsw (graph), ivf (inverted lists, exact distances in the probed ones: the
                one for millions) or ivfpq (inverted lists + product codes, re-ranked exactly: the smallest)
  meta.sqlite   items(id, path, caption) and info(key, value): the model's path and fingerprint, dim, kind

Building is incremental and survives interruption: images are embedded by search/collection.py (chunk files in
`embedding/`, resumable), then each chunk's rows are committed and the FAISS file is replaced atomically. On open, committed rows the FAISS file does not hold (a crash between the
two writes) are dropped, and adding the same source again skips every path already indexed: re-running a build
resumes it.
Queries must be embedded by the model that built the index (checked by fingerprint).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlfm import distributed
from vlfm.io import MAX_PIXELS, SearchError, atomic_file, decode_image
from vlfm.search.collection import Collection, embed_collection, read_chunks, report_skipped

log = logging.getLogger("vlfm")
KINDS = ("flat", "hnsw", "ivf", "ivfpq")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError("search needs FAISS: pip install faiss-cpu (or `pip install -e .[search]`)") from None
    return faiss


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every weight (names, shapes and bytes): the same model gives the same fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Hit:
    score: float
    id: int
    path: str
    caption: str


class SearchIndex:
    def __init__(self, directory: Path, db: sqlite3.Connection, index, info: dict[str, str]):
        self.directory, self.db, self.index, self.info = directory, db, index, info
        self._staged: list[tuple[np.ndarray, list[tuple[str, str]]]] = []  # an IVF before it is trained

    # --- creation and opening -----------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path, model, model_path: str, kind: str = "flat", hnsw_m: int = 32,
               nlist: int = 1024, pq_m: int = 16) -> SearchIndex:  # fmt: skip
        directory = Path(directory)
        if kind not in KINDS:
            raise SearchError(f"index kind {kind!r} is not one of {', '.join(KINDS)}")
        if (directory / "meta.sqlite").exists():
            raise SearchError(f"{directory} already holds an index; add to it with `vlfm index add`")
        dim = int(model.config.embed_dim)
        if kind == "ivfpq" and dim % pq_m:
            raise SearchError(f"ivfpq: the embedding size {dim} is not divisible by pq_m={pq_m}")
        directory.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(directory / "meta.sqlite")
        db.executescript("CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT UNIQUE, caption TEXT);"
                         "CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT);")  # fmt: skip
        info = {"model_path": str(model_path), "model_fingerprint": model_fingerprint(model), "dim": str(dim),
                "kind": kind, "hnsw_m": str(hnsw_m), "nlist": str(nlist), "pq_m": str(pq_m)}  # fmt: skip
        db.executemany("INSERT INTO info VALUES (?, ?)", info.items())
        db.commit()
        return cls(directory, db, _new_faiss(info), info)

    @classmethod
    def open(cls, directory: str | Path) -> SearchIndex:
        directory = Path(directory)
        if not (directory / "meta.sqlite").is_file():
            raise SearchError(f"{directory} is not an index (no meta.sqlite); build one with `vlfm index build`")
        db, info, rows = _read_meta(directory / "meta.sqlite")
        index = _read_faiss(directory / "index.faiss", info)
        held = set(_faiss().vector_to_array(index.id_map).tolist()) if index.ntotal else set()
        if rows - held:  # committed rows whose vectors never reached the FAISS file: redo them
            log.warning("%s: %d rows without vectors (an interrupted build) are dropped and will be redone",
                        directory, len(rows - held))  # fmt: skip
            db.executemany("DELETE FROM items WHERE id = ?", [(r,) for r in rows - held])
            db.commit()
        if held - rows:
            raise SearchError(f"{directory}: index.faiss holds {len(held - rows)} vectors without metadata; rebuild it")
        return cls(directory, db, index, info)

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def path_of(self, item_id: int) -> str | None:
        """The stored path of an item id (a Hit's id), None when no item has it."""
        row = self.db.execute("SELECT path FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else row[0]

    def check_model(self, model) -> None:
        found = model_fingerprint(model)
        if found != self.info["model_fingerprint"]:
            raise SearchError(
                f"{self.directory} was built with the model at {self.info['model_path']} (fingerprint "
                f"{self.info['model_fingerprint']}); this model's fingerprint is {found}: its embeddings are not comparable"
            )

    # --- adding -----------------------------------------------------------------------------------------------
    def add_images(self, model, items: Iterable[tuple[Path, str]], batch_size: int = 256, progress: bool = True,
                   max_pixels: int = MAX_PIXELS) -> dict:  # fmt: skip
        """Embed and add (path, caption) items in one process, in chunks of `batch_size` (add_collection)."""
        collection = Collection(items=[(str(p), c) for p, c in items])
        return self.add_collection(model, collection, batch_size, chunk_size=batch_size, max_pixels=max_pixels,
                                   progress=progress)  # fmt: skip

    def add_collection(self, model, collection: Collection, batch_size: int = 256, workers: int = 0,
                       chunk_size: int = 512, max_pixels: int = MAX_PIXELS, progress: bool = True) -> dict:  # fmt: skip
        """Embed a collection (search/collection.py: decoding workers, chunks in `embedding/`, resumable, shared
        among torchrun ranks) and add it, skipping paths already indexed and images that do not decode or are
        over `max_pixels`. Rank 0 adds the chunks in order and returns the counts; other ranks return {}."""
        self.check_model(model)
        done = {p for (p,) in self.db.execute("SELECT path FROM items")}
        work = self.directory / "embedding"
        paths = embed_collection(model, collection, work, batch_size, workers, chunk_size, max_pixels, progress, done)
        if distributed.rank() != 0:
            return {}
        chunks, added = list(read_chunks(paths)), 0
        for chunk in chunks:
            new = [n for n, i in enumerate(chunk.ids) if i not in done]  # a merge cut short added some already
            if new:
                self._add(chunk.vectors[new], [(chunk.ids[n], chunk.captions[n]) for n in new])
                added += len(new)
        self._flush_staged()
        skipped = report_skipped(chunks)
        shutil.rmtree(work)
        return {"added": added, "skipped": skipped, "already_indexed": len(done), "total": len(self)}

    def _add(self, vectors: np.ndarray, items: list[tuple[str, str]]) -> None:
        if not self.index.is_trained:
            self._staged.append((vectors, items))  # an IVF learns its lists (and codebooks) from the first vectors
            if sum(len(v) for v, _ in self._staged) >= max(40 * int(self.info["nlist"]), 256):
                self._flush_staged()
            return
        start = self.db.execute("SELECT COALESCE(MAX(id), -1) + 1 FROM items").fetchone()[0]
        ids = np.arange(start, start + len(items), dtype=np.int64)
        self.db.executemany("INSERT INTO items VALUES (?, ?, ?)", [(int(i), p, c) for i, (p, c) in zip(ids, items)])
        self.db.commit()  # rows first: a crash before the vectors are written only leaves rows open() redoes
        self.index.add_with_ids(vectors, ids)
        with atomic_file(self.directory / "index.faiss") as tmp:
            _faiss().write_index(self.index, str(tmp))

    def _flush_staged(self) -> None:
        if not self._staged:
            return
        vectors = np.concatenate([v for v, _ in self._staged])
        items = [item for _, batch in self._staged for item in batch]
        self._staged = []
        if not self.index.is_trained:
            nlist = int(self.info["nlist"])
            need = max(39 * nlist, 256)  # k-means for the lists, and 256 codes per product sub-quantizer
            if len(vectors) < need:
                raise SearchError(f"{self.info['kind']} with nlist={nlist} needs at least {need} vectors to train; got "
                                  f"{len(vectors)} (lower --nlist, or use --kind flat / hnsw for small collections)")  # fmt: skip
            self.index.train(vectors)
        self._add(vectors, items)

    def _inner(self):
        faiss = _faiss()
        index = faiss.downcast_index(self.index.index)
        return faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index

    # --- searching --------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 10, ef_search: int = 128, nprobe: int = 0) -> list[list[Hit]]:
        """The k nearest items of each (normalised) query vector, best first. `nprobe`: IVF lists searched; 0: 8 for
        ivf (recall@10 0.993 at 26x numpy on 1M x 512 with nlist 2048: docs/experiments.md §9), 32 for ivfpq."""
        if not len(self):
            raise SearchError(f"{self.directory} is empty")
        faiss = _faiss()
        inner = self._inner()
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = max(ef_search, k)
        if isinstance(inner, faiss.IndexIVF):
            inner.nprobe = nprobe or (32 if self.info["kind"] == "ivfpq" else 8)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        query = f"SELECT id, path, caption FROM items WHERE id IN ({','.join('?' * len(wanted))})"
        rows = {i: (p, c) for i, p, c in self.db.execute(query, wanted)}
        return [[Hit(float(s), int(i), *rows[int(i)]) for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]


def _read_meta(path: Path) -> tuple[sqlite3.Connection, dict[str, str], set[int]]:
    """meta.sqlite's connection, info and row ids; a truncated or foreign file is one SearchError naming it."""
    try:
        db = sqlite3.connect(path)
        info = dict(db.execute("SELECT key, value FROM info").fetchall())
        rows = {row for (row,) in db.execute("SELECT id FROM items")}
    except sqlite3.Error as error:
        raise SearchError(f"{path} is not a readable index database ({error}); rebuild the index") from None
    missing = [key for key in ("model_path", "model_fingerprint", "dim", "kind", "hnsw_m", "nlist", "pq_m") if key not in info]
    if missing or info.get("kind") not in KINDS or not str(info.get("dim")).isdigit():
        raise SearchError(f"{path} is not a vlfm index database (info lacks or garbles {', '.join(missing) or 'kind/dim'}); "
                          "rebuild the index")  # fmt: skip
    return db, info, rows


def _read_faiss(path: Path, info: dict[str, str]):
    """index.faiss (none yet: a new empty index); truncated or garbage: one SearchError naming the file."""
    faiss = _faiss()
    if not path.is_file():
        return _new_faiss(info)
    try:
        index = faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as error:
        reason = next((line for line in str(error).splitlines() if "Error" in line or "error" in line), "unreadable")
        raise SearchError(f"{path} is truncated or not a FAISS index ({reason.strip()[:200]}); rebuild the index") from None
    if not isinstance(index, faiss.IndexIDMap2) or index.d != int(info["dim"]):
        raise SearchError(f"{path} is not this index's vectors (expected {info['dim']}-d vectors with ids); rebuild the index")
    return index


def _new_faiss(info: dict[str, str]):
    faiss = _faiss()
    dim, kind = int(info["dim"]), info["kind"]
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, int(info["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf":
        inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, int(info["nlist"]), faiss.METRIC_INNER_PRODUCT)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        ivfpq = faiss.IndexIVFPQ(quantizer, dim, int(info["nlist"]), int(info["pq_m"]), 8, faiss.METRIC_INNER_PRODUCT)
        inner = faiss.IndexRefineFlat(ivfpq)  # product codes find candidates; exact vectors re-rank them
        inner.k_factor = 10  # re-rank 10x the hits asked for (bench/search.py; docs/experiments.md §9)
    return faiss.IndexIDMap2(inner)


def contact_sheet(hits: list[Hit], path: str | Path, thumb: int = 128, columns: int = 5) -> Path:
    """A PNG grid of the hits' images, each captioned with its rank and score."""
    from PIL import Image, ImageDraw

    rows = max(1, -(-len(hits) // columns))
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, hit in enumerate(hits):
        x, y = (n % columns) * thumb, (n // columns) * (thumb + 14)
        image = decode_image(hit.path, target=thumb)
        if image is not None:
            image.thumbnail((thumb, thumb))
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        draw.text((x + 2, y + thumb), f"{n + 1}. {hit.score:.3f}", fill="black")
    path = Path(path)
    sheet.save(path)
    return path
