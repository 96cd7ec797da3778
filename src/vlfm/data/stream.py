"""Streaming WebDataset shards for training: every rank and every DataLoader worker reads its own shards, epoch
after epoch, forever, and the data position is exact and resumable.

Readers: R = world size x max(1, data.workers); reader r is worker r mod K of rank r // K. Epoch e orders the
shards with a generator seeded by (seed, e), and the shard at place i goes to reader i mod R, so each shard is
read once per epoch by one reader. A reader shuffles its samples in a buffer of data.shuffle_buffer (seeded by
(seed, e, r), emptied at the end of the epoch), then decodes them in its worker (undecodable / oversized images
are skipped and counted, a truncated shard ends at the break and is counted) into batches of the rank's local
batch size. The DataLoader takes its workers in turn, so batch b of a rank comes from its worker b mod K.

The position of a reader is (epoch, samples taken from its buffer in that epoch). Resume replays that epoch up to
the offset without decoding, and DataLoader worker k plays worker (k + batches) mod K, so the batches after a
resume are the ones an uninterrupted run takes. The position is only valid for the same number of ranks,
workers, shards and batch size; load_state refuses another layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlfm import distributed
from vlfm.data.shards import decode_sample, shard_samples, shard_urls
from vlfm.data.transforms import Preprocess, to_uint8_tensor
from vlfm.io import MAX_PIXELS, ConfigError

log = logging.getLogger("vlfm")
TOKENIZER_CAPTIONS = 20_000  # a stream's tokenizer is trained on the captions of this many first samples
WORKER_TIMEOUT_S = 600  # a worker that gives no batch for this long is an error, not a silent hang


@dataclass
class ReaderState:
    """Where a reader stands, and what it has skipped so far."""

    epoch: int = 0
    offset: int = 0  # samples taken from the shuffle buffer in this epoch (decoded or skipped)
    undecodable: int = 0
    oversized: int = 0
    broken_shards: list[str] = field(default_factory=list)  # distinct truncated or unreadable shards


def check_readers(shards: int, world: int, workers: int) -> None:
    readers = world * max(1, workers)
    if shards < readers:
        raise ConfigError(f"{shards} shard(s) for {readers} stream readers ({world} process(es) x {max(1, workers)} "
                          f"data worker(s)): each reader needs its own shards; write at least {readers} shards "
                          f"(`vlfm data shard` with a smaller --maxcount) or lower data.workers")


def shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """The items in a buffered random order: a buffer of `size`, a random slot given out as each new item comes."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def caption_key(caption: str) -> int:
    """A stable integer for a caption's text: equal captions in a batch are each other's positives."""
    return int.from_bytes(hashlib.blake2b(caption.encode("utf-8"), digest_size=7).digest(), "little")


class ShardStream(IterableDataset):
    """One rank's infinite batches, `{"images": uint8 (B, 3, H, W), "captions", "reader", "state"}`: each from one
    reader, with that reader's position after it. `start` holds every global reader's position to resume from."""

    def __init__(self, urls: list[str], preprocess: Preprocess, batch_size: int, seed: int, rank: int, world: int,
                 workers: int, shuffle_buffer: int, start: list[dict], rotation: int = 0, augment: bool = False,
                 max_pixels: int = MAX_PIXELS):  # fmt: skip
        check_readers(len(urls), world, workers)
        self.urls, self.preprocess, self.batch_size, self.seed = urls, preprocess, batch_size, seed
        self.rank, self.workers, self.readers = rank, max(1, workers), world * max(1, workers)
        self.shuffle_buffer, self.start, self.rotation = shuffle_buffer, start, rotation
        self.augment, self.max_pixels = augment, max_pixels

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.reader_batches(self.rank * self.workers + (worker + self.rotation) % self.workers)

    def reader_batches(self, reader: int) -> Iterator[dict]:
        state = ReaderState(**self.start[reader])
        samples = self.reader_samples(reader, state)
        while True:
            pairs = list(itertools.islice(samples, self.batch_size))
            yield {"images": to_uint8_tensor([image for image, _ in pairs]), "captions": [c for _, c in pairs],
                   "reader": reader, "state": dataclasses.asdict(state)}  # fmt: skip

    def epoch_shards(self, epoch: int, reader: int) -> list[str]:
        order = list(range(len(self.urls)))
        random.Random(f"{self.seed}/shards/{epoch}").shuffle(order)
        return [self.urls[i] for i in order[reader :: self.readers]]

    def reader_samples(self, reader: int, state: ReaderState) -> Iterator[tuple[Image.Image, str]]:
        """Decoded, resized (image, caption) pairs of one reader from its position on; `state` follows along."""

        def broken(url: str, error: Exception) -> None:
            if url not in state.broken_shards:
                log.warning("stream reader %d: %s: %s (read up to the break; counted)", reader, url, error)
                state.broken_shards.append(url)

        while True:
            shards = self.epoch_shards(state.epoch, reader)
            raw = (sample for url in shards for sample in shard_samples(url, broken))
            samples = shuffled(raw, self.shuffle_buffer, random.Random(f"{self.seed}/samples/{state.epoch}/{reader}"))
            resumed = state.offset > 0
            for _ in itertools.islice(samples, state.offset):  # resume: replay the epoch up to the position, undecoded
                pass
            decoded = 0
            for sample in samples:
                state.offset += 1
                image, caption = decode_sample(sample, self.max_pixels)
                if isinstance(image, str):
                    if getattr(state, image) == 0:
                        log.warning("stream reader %d: skipped %s image %s:%s (later ones are counted)", reader, image,
                                    sample.get("__url__"), sample.get("__key__"))  # fmt: skip
                    setattr(state, image, getattr(state, image) + 1)
                    continue
                decoded += 1
                yield self.transform(image, reader, state), caption
            if decoded == 0 and not resumed:
                raise ValueError(f"stream reader {reader}: its shards of epoch {state.epoch} ({', '.join(shards)}) "
                                 "hold no decodable sample; remove or rewrite them")  # fmt: skip
            state.epoch, state.offset = state.epoch + 1, 0

    def transform(self, image: Image.Image, reader: int, state: ReaderState) -> Image.Image:
        if self.augment:  # a crop per sample position, the same after a resume
            return self.preprocess.random_resized_crop(image, random.Random(f"{self.seed}/{reader}/{state.epoch}/{state.offset}"))
        return self.preprocess.resize_crop(image)


class ShardBatches:
    """This rank's batches from a shard stream, taken in order, with the exact data position (`state`)."""

    def __init__(self, source: str, preprocess: Preprocess, batch_size: int, seed: int, workers: int,
                 shuffle_buffer: int = 1000, augment: bool = False, rank: int | None = None,
                 world: int | None = None, max_pixels: int = MAX_PIXELS):  # fmt: skip
        self.urls = shard_urls(source)
        self.rank = distributed.rank() if rank is None else rank
        self.world = distributed.world_size() if world is None else world
        check_readers(len(self.urls), self.world, workers)  # before anything is trained
        self.preprocess, self.batch_size, self.seed, self.workers = preprocess, batch_size, seed, workers
        self.shuffle_buffer, self.augment, self.max_pixels = shuffle_buffer, augment, max_pixels
        self.layout = {"shards": len(self.urls), "world_size": self.world, "workers": max(1, workers),
                       "batch_size": batch_size, "seed": seed, "shuffle_buffer": shuffle_buffer}  # fmt: skip
        self.batches = 0
        self.readers = [dataclasses.asdict(ReaderState()) for _ in range(self.world * max(1, workers))]
        self._iterator: Iterator[dict] | None = None

    def next(self, index: int) -> dict:
        """Batch number `index` of this rank (0, 1, 2, ... in order)."""
        if index != self.batches:
            raise RuntimeError(f"a stream gives its batches in order: batch {self.batches} is next, not {index}")
        if self._iterator is None:
            stream = ShardStream(self.urls, self.preprocess, self.batch_size, self.seed, self.rank, self.world,
                                 self.workers, self.shuffle_buffer, self.readers, self.batches % max(1, self.workers),
                                 self.augment, self.max_pixels)  # fmt: skip
            self._iterator = iter(DataLoader(stream, batch_size=None, num_workers=self.workers,
                                             timeout=WORKER_TIMEOUT_S if self.workers else 0))  # fmt: skip
        batch = next(self._iterator)
        self.readers[batch["reader"]] = batch["state"]
        self.batches += 1
        return batch

    def skipped(self) -> int:
        """Images this rank's readers have skipped so far (undecodable or oversized)."""
        return sum(r["undecodable"] + r["oversized"] for r in self.readers)

    def state(self) -> dict:
        """Batches taken (the same on every rank) and every reader's position; under torchrun every rank calls
        this (the positions are gathered), and rank 0's answer is the whole state."""
        readers = self.readers
        if self.world > 1 and distributed.is_distributed():
            k = max(1, self.workers)
            parts: list = [None] * self.world
            dist.all_gather_object(parts, self.readers[self.rank * k : (self.rank + 1) * k])
            readers = [r for part in parts for r in part]
        return {"batches": self.batches, "layout": self.layout, "readers": readers}

    def load_state(self, state: dict) -> None:
        if state["layout"] != self.layout:
            changed = ", ".join(f"{k} {v} -> {self.layout.get(k)}" for k, v in state["layout"].items() if self.layout.get(k) != v)
            raise ConfigError(f"the checkpoint's stream position does not fit this run ({changed}); resume a stream "
                              "with the same torchrun size, data.workers, train.batch_size, seed, shuffle buffer and "
                              "shards, or start a new run")  # fmt: skip
        self.batches, self.readers, self._iterator = state["batches"], list(state["readers"]), None

    def first_captions(self, limit: int = TOKENIZER_CAPTIONS) -> list[str]:
        """The captions of the first `limit` samples in shard order (only the .txt members are read)."""
        samples = (s for url in self.urls for s in shard_samples(url, lambda *_: None, lambda name: name.endswith(".txt")))
        return [s.get("txt", b"").decode("utf-8").strip() for s in itertools.islice(samples, limit)]


def tokenize_batch(batch: dict, tokenizer, context_length: int, pad_to_context: bool) -> dict[str, torch.Tensor]:
    """A stream batch as the contrastive task's batch: captions tokenized, caption keys from their text."""
    ids, mask = tokenizer(batch["captions"], context_length, pad_to_context=pad_to_context)
    keys = torch.tensor([caption_key(c) for c in batch["captions"]])
    return {"images": batch["images"], "input_ids": ids, "attention_mask": mask, "caption": keys}
