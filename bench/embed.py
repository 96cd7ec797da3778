"""Embedding a collection (search/collection.py, behind `vlfm embed --images` and `vlfm index build`): images/s
with DataLoader decoding workers against the single-process path (`--workers 0`: decoding in the encoding
process), all in one process on the same files, and the same collection end to end into a searchable index.

Collection: `--n` JPEG photos of `--width` x `--height` (the built-in world's scenes, upscaled, with pixel noise
so that they compress like photographs), written once to `--data` and reused. Model: a preset's (random weights:
speed does not depend on them), encoding on one thread. Each configuration embeds the whole collection into a
fresh work directory, chunks and merge included; the outputs of every configuration must equal the single
process's (checked). The load average is printed before and after: other processes take cores from the
workers. The numbers are printed only.

    .venv/bin/python bench/embed.py                         # 10,000 photos, workers 0, 1, 2
    .venv/bin/python bench/embed.py --n 2000 --workers 0 2  # a quick look
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlfm.config import load_config
from vlfm.data.shapes import ShapesWorld, WorldConfig
from vlfm.models import TwoTowerModel
from vlfm.search import SearchIndex
from vlfm.search.collection import Collection, embed_collection, write_embeddings


def make_photos(folder: Path, n: int, width: int, height: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == n:
        return
    world, rng = ShapesWorld(WorldConfig(image_size=64)), np.random.default_rng(0)
    for i in range(n):
        scene = world.render(world.scene("train", i)).resize((width, height), Image.BICUBIC)
        noisy = np.asarray(scene, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def embed(model, collection: Collection, workers: int, chunk_size: int, batch_size: int) -> tuple[float, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = embed_collection(model, collection, Path(tmp) / "work", batch_size, workers, chunk_size, progress=False)
        write_embeddings(paths, Path(tmp) / "out.npy")
        seconds = time.perf_counter() - start
        return seconds, np.load(Path(tmp) / "out.npy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes-clip.yaml")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--data", default="/tmp/vlfm-bench-embed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.data) / f"{args.n}-{args.width}x{args.height}"
    make_photos(folder, args.n, args.width, args.height)
    torch.manual_seed(0)
    model = TwoTowerModel(load_config(args.config).model).eval()
    collection = Collection.from_source(folder)
    print(f"{args.n} JPEGs {args.width}x{args.height}, {args.config}, encoder on 1 thread; load average {load()}")
    reference, single = None, None
    for workers in args.workers:
        seconds, vectors = embed(model, collection, workers, args.chunk_size, args.batch_size)
        reference = vectors if reference is None else reference
        single = seconds if workers == 0 else single
        ratio = f"  {single / seconds:.2f}x the single process" if single and workers else ""
        same = "equal to the first" if np.array_equal(vectors, reference) else "DIFFERENT from the first"
        print(f"workers {workers}: {args.n / seconds:7.1f} images/s ({seconds:.1f} s){ratio}; output {same}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        index = SearchIndex.create(Path(tmp) / "index", model, args.config)
        stats = index.add_collection(model, collection, args.batch_size, max(args.workers), args.chunk_size, progress=False)
        seconds = time.perf_counter() - start
        hit = SearchIndex.open(Path(tmp) / "index").search(reference[123:124], k=1)[0][0]
        print(f"index build, workers {max(args.workers)}: {stats['added']} images in {seconds:.1f} s "
              f"({stats['added'] / seconds:.1f} images/s); image 123's nearest: {Path(hit.path).name} ({hit.score:.3f})")  # fmt: skip
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
