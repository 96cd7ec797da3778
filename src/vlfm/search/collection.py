"""Embedding a collection of images: the one pipeline of `vlfm embed --images` and `vlfm index build | add`.

A collection (a folder, a caption file or WebDataset shards) is cut into chunks: lists of (path, caption) items,
or one shard each. DataLoader workers decode a chunk each (io.read_image through data/), the main process encodes
it in batches, and every finished chunk is one file written to a temporary name and renamed into the work
directory:
  plan.json          the model's fingerprint, the collection's digest and the chunks (written once, atomically)
  chunk-NNNNNN.npz   vectors, ids, captions and the ids skipped as undecodable or oversized
A killed run leaves whole chunks only; rerunning embeds just the missing ones (nothing twice, nothing lost).
Under torchrun rank r of w embeds chunks r, r+w, ...; after a barrier rank 0 merges them in chunk order, so the
result equals one process's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlfm import distributed
from vlfm.data.shards import decode_sample, is_shard_source, shard_samples, shard_urls
from vlfm.data.sources import CAPTION_SUFFIXES, list_images, read_caption_file
from vlfm.data.transforms import to_uint8_tensor
from vlfm.io import MAX_PIXELS, ImageError, SearchError, UsageError, atomic_file, read_image

log = logging.getLogger("vlfm")
LISTS = ("ids", "captions", "undecodable", "oversized", "broken")  # a chunk file's string arrays


def default_workers() -> int:
    """Decoding processes: one a core (on 2 cores 2 workers beat 1: docs/experiments.md §14)."""
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class Collection:
    """What to embed: (path, caption) items, or WebDataset shards (a shard's samples are listed when read)."""

    items: list[tuple[str, str]] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)

    @classmethod
    def from_source(cls, source: str | Path) -> Collection:
        """A caption file (.csv/.tsv/.jsonl), shards (.tar, a folder of them, a brace pattern) or an image folder."""
        path = Path(source)
        try:
            if path.is_file() and path.suffix in CAPTION_SUFFIXES:
                return cls(items=[(str(p), c) for p, c in read_caption_file(path)])
            if is_shard_source(str(source)):
                return cls(shards=shard_urls(source))
            return cls(items=[(str(p), "") for p in list_images(path)])
        except ValueError as error:  # a folder without images, a caption file without its columns
            raise UsageError(str(error)) from None

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.items, self.shards]).encode()).hexdigest()[:16]

    def chunks(self, size: int, exclude: set[str]) -> list[dict]:
        todo = [list(item) for item in self.items if item[0] not in exclude]
        return [{"items": todo[i : i + size]} for i in range(0, len(todo), size)] + [{"shard": u} for u in self.shards]


class ChunkDataset(torch.utils.data.Dataset):
    """Chunk i decoded: its ids, captions, uint8 pixels (N, 3, S, S) after resize and centre crop, and the ids
    skipped as undecodable or oversized (and the shards that broke off early)."""

    def __init__(self, chunks: list[dict], preprocess, max_pixels: int = MAX_PIXELS, exclude: frozenset = frozenset()):
        self.chunks, self.preprocess, self.max_pixels, self.exclude = chunks, preprocess, max_pixels, exclude

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        out = {"ids": [], "captions": [], "images": [], "undecodable": [], "oversized": [], "broken": []}
        for key, image, caption in self._decoded(self.chunks[i], out["broken"]):
            if isinstance(image, str):
                out[image].append(key)
                continue
            out["ids"].append(key)
            out["captions"].append(caption)
            out["images"].append(self.preprocess.resize_crop(image))
        size = self.preprocess.image_size
        images = out.pop("images")
        out["pixels"] = to_uint8_tensor(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)
        return out

    def _decoded(self, chunk: dict, broken: list[str]) -> Iterator[tuple[str, object, str]]:
        """(id, RGB image or 'undecodable' / 'oversized', caption) of each item, through io.read_image."""
        target = self.preprocess.image_size
        if "shard" in chunk:
            url = chunk["shard"]
            for sample in shard_samples(url, lambda u, error: broken.append(f"{u}: {error}")):
                key = f"{url}:{sample['__key__']}"
                if key not in self.exclude:
                    image, caption = decode_sample(sample, self.max_pixels, target)
                    yield key, image, caption
            return
        for path, caption in chunk["items"]:
            try:
                yield path, read_image(path, self.max_pixels, target), caption
            except ImageError as error:
                yield path, error.kind, caption


def _plan(work: Path, fingerprint: str, collection: Collection, chunk_size: int, exclude: set[str]) -> list[dict]:
    """The chunks of this job: plan.json's when it was made for this model and collection, else new ones."""
    path = work / "plan.json"
    if distributed.rank() == 0:
        plan = json.loads(path.read_text()) if path.is_file() else None
        if plan and plan["fingerprint"] != fingerprint:
            raise SearchError(f"{work} holds chunks embedded by another model (fingerprint {plan['fingerprint']}); "
                              f"delete {work} to start over with this one")  # fmt: skip
        if plan and plan["collection"] != collection.digest():
            log.warning("%s was started on another collection: its chunks are discarded", work)
            for stale in work.glob("chunk-*.npz"):
                stale.unlink()
        if not plan or plan["collection"] != collection.digest():
            work.mkdir(parents=True, exist_ok=True)
            plan = {"fingerprint": fingerprint, "collection": collection.digest(),
                    "chunks": collection.chunks(chunk_size, exclude)}  # fmt: skip
            with atomic_file(path) as tmp:
                tmp.write_text(json.dumps(plan))
    distributed.barrier()
    return json.loads(path.read_text())["chunks"]


def chunk_path(work: Path, k: int) -> Path:
    return work / f"chunk-{k:06d}.npz"


def embed_collection(model, collection: Collection, work: str | Path, batch_size: int = 256, workers: int = 0,
                     chunk_size: int = 512, max_pixels: int = MAX_PIXELS, progress: bool = True,
                     exclude: set[str] | None = None) -> list[Path]:  # fmt: skip
    """Embed the chunks of `collection` this rank owns that `work` does not hold yet; every rank returns, after
    all have finished, the chunk files in order. `exclude`: ids left out (already in an index)."""
    from vlfm.search.index import model_fingerprint

    work, exclude = Path(work), exclude or set()
    chunks = _plan(work, model_fingerprint(model), collection, chunk_size, exclude)
    rank, world = distributed.rank(), distributed.world_size()
    todo = [k for k in range(rank, len(chunks), world) if not chunk_path(work, k).is_file()]
    dataset = ChunkDataset([chunks[k] for k in todo], model.preprocess_config, max_pixels, frozenset(exclude))
    workers = min(workers, len(todo))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         prefetch_factor=2 if workers else None)  # fmt: skip
    known = [len(chunks[k]["items"]) for k in todo if "items" in chunks[k]]
    total = sum(known) if len(known) == len(todo) else None  # a shard's size is known once read
    bar = tqdm(total=total, desc=f"embed (rank {rank})" if world > 1 else "embed", unit="img",
               disable=not progress or rank != 0)  # fmt: skip
    was_training = model.training
    model.eval()
    for k, chunk in zip(todo, loader):
        pixels = model.preprocess_config.normalize(chunk["pixels"])
        vectors = model.embed_images(pixels, batch_size).cpu().numpy() if len(pixels) else np.zeros((0, model.config.embed_dim))
        _save_chunk(chunk_path(work, k), vectors.astype(np.float32), chunk)
        bar.update(len(chunk["ids"]) + len(chunk["undecodable"]) + len(chunk["oversized"]))
    bar.close()
    model.train(was_training)
    distributed.barrier()
    return [chunk_path(work, k) for k in range(len(chunks))]


def _save_chunk(path: Path, vectors: np.ndarray, chunk: dict) -> None:
    arrays = {name: np.array(chunk[name], dtype=str) for name in LISTS}
    with atomic_file(path) as tmp:
        np.savez(tmp, vectors=vectors, **arrays)


@dataclass
class Chunk:
    vectors: np.ndarray
    ids: list[str]
    captions: list[str]
    undecodable: list[str]
    oversized: list[str]
    broken: list[str]


def read_chunks(paths: list[Path]) -> Iterator[Chunk]:
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as data:
                lists = {name: data[name].tolist() for name in LISTS}
                yield Chunk(data["vectors"], **lists)
        except (OSError, ValueError, KeyError) as error:
            raise SearchError(f"{path} is not a readable chunk ({error}); delete it and rerun to embed it again") from None


def report_skipped(chunks: list[Chunk]) -> int:
    """Log the skipped images and broken shards; returns how many images were skipped."""
    for kind in ("undecodable", "oversized", "broken"):
        names = [name for chunk in chunks for name in getattr(chunk, kind)]
        if names:
            what = "truncated or unreadable shard(s) read up to the break" if kind == "broken" else f"{kind} image(s)"
            log.warning("skipped %d %s, e.g. %s", len(names), what, names[0])
    return sum(len(c.undecodable) + len(c.oversized) for c in chunks)


def write_embeddings(paths: list[Path], out: Path) -> dict:
    """Merge chunk files into OUT.npy (float32 rows) and OUT.txt (each row's id), each written atomically."""
    chunks = list(read_chunks(paths))
    skipped = report_skipped(chunks)
    ids = [i for chunk in chunks for i in chunk.ids]
    if not ids:
        raise UsageError(f"none of the {skipped} images could be decoded (or all are over --max-pixels)")
    vectors = np.concatenate([chunk.vectors for chunk in chunks])
    save_embeddings(out, vectors, ids)
    return {"embedded": len(ids), "skipped": skipped, "shape": list(vectors.shape)}


def save_embeddings(out: Path, vectors: np.ndarray, rows: list[str]) -> None:
    """`vlfm embed`'s output: OUT.npy (float32 rows) and OUT.txt (what each row embeds), each written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        np.save(tmp, vectors.astype(np.float32))
    with atomic_file(out.with_suffix(".txt")) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
