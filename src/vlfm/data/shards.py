"""WebDataset shards: tar files of (image, caption) samples, written and read with the `webdataset` library.

A sample is `KEY.png|jpg|...` (the original encoded bytes) + `KEY.txt` (the caption). Images that do not decode
or exceed `max_pixels` are skipped and counted, when writing and when reading; nothing sleeps or retries.
A shard source is a .tar file, a directory of .tar files, or a brace pattern (`shards/part-{000..009}.tar`).
A truncated or unreadable shard ends where it breaks (the samples before the break are kept) and is counted;
reading goes on with the next shard. Training streams shards with data/stream.py, or loads them all here.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlfm.data.sources import IMAGE_SUFFIXES, ImageTextData, list_images
from vlfm.data.transforms import Preprocess, to_uint8_tensor
from vlfm.io import MAX_PIXELS, ImageError, read_image

log = logging.getLogger("vlfm")
IMAGE_KEYS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)


@dataclass
class Skipped:
    undecodable: list[str] = field(default_factory=list)
    oversized: list[str] = field(default_factory=list)
    broken_shards: list[str] = field(default_factory=list)  # truncated or unreadable tar files (not images)

    def __len__(self) -> int:
        return len(self.undecodable) + len(self.oversized)

    def report(self, what: str) -> None:
        for kind, names in (("undecodable", self.undecodable), ("oversized", self.oversized)):
            if names:
                log.warning("%s: skipped %d %s image(s), e.g. %s", what, len(names), kind, names[0])
        if self.broken_shards:
            log.warning("%s: %d truncated or unreadable shard(s) read up to the break, e.g. %s", what,
                        len(self.broken_shards), self.broken_shards[0])


def check_image(data: bytes, max_pixels: int = MAX_PIXELS, target: int | None = None) -> Image.Image | str:
    """The decoded RGB image (io.read_image; a JPEG at no less than `target`), or the reason it is skipped:
    'undecodable' or 'oversized'."""
    try:
        return read_image(data, max_pixels, target)
    except ImageError as error:
        return error.kind


def folder_items(folder: str | Path) -> list[tuple[Path, str]]:
    """Images of a folder with their captions from same-named .txt files (empty when there is none)."""
    items = []
    for path in list_images(folder):
        caption_file = path.with_suffix(".txt")
        items.append((path, caption_file.read_text().strip() if caption_file.is_file() else ""))
    return items


def write_shards(items: list[tuple[Path, str]], out: str | Path, maxcount: int = 1000, max_pixels: int = MAX_PIXELS,
                 prefix: str = "shard") -> dict:  # fmt: skip
    """Write (image path, caption) items into out/PREFIX-000000.tar, ...; returns counts and shard paths."""
    samples = ((str(path), Path(path).read_bytes() if Path(path).is_file() else b"", Path(path).suffix, caption)
               for path, caption in items)  # fmt: skip
    return _write_samples(samples, out, maxcount, max_pixels, prefix)


def write_world_shards(n: int, out: str | Path, maxcount: int = 1000, image_size: int = 64) -> dict:
    """Scenes 0..n-1 of the built-in world's train split as PNG shards with one caption each: scene i carries
    its caption number i mod (its caption count), so the captions vary and the shards are the same every time."""
    from vlfm.data.shapes import ShapesWorld, WorldConfig
    from vlfm.data.world_text import captions

    world = ShapesWorld(WorldConfig(image_size=image_size))

    def samples() -> Iterator[tuple[str, bytes, str, str]]:
        for i in range(n):
            scene = world.scene("train", i)
            png = io.BytesIO()
            world.render(scene).save(png, format="PNG")
            texts = captions(scene)
            yield f"scene {i}", png.getvalue(), ".png", texts[i % len(texts)]

    return _write_samples(samples(), out, maxcount, MAX_PIXELS, "shard")


def _write_samples(samples: Iterable[tuple[str, bytes, str, str]], out: str | Path, maxcount: int, max_pixels: int,
                   prefix: str) -> dict:  # fmt: skip
    """(name, encoded image, suffix, caption) samples into shards; images that do not decode are skipped."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(f"{prefix}-*.tar")):
        raise FileExistsError(f"{out} already holds {prefix}-*.tar shards; write to an empty directory")
    skipped, written = Skipped(), 0
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for index, (name, data, suffix, caption) in enumerate(samples):
            checked = check_image(data, max_pixels)
            if isinstance(checked, str):
                getattr(skipped, checked).append(name)
                continue
            suffix = suffix.lower().lstrip(".")
            sink.write({"__key__": f"{index:09d}", suffix if suffix in IMAGE_KEYS else "png": data, "txt": caption})
            written += 1
    skipped.report("shard")
    shards = sorted(out.glob(f"{prefix}-*.tar"))
    return {"written": written, "undecodable": len(skipped.undecodable), "oversized": len(skipped.oversized),
            "shards": [str(p) for p in shards]}  # fmt: skip


def shard_urls(source: str | Path) -> list[str]:
    """The shard files of a source, in order (a brace pattern is expanded)."""
    source = str(source)
    if "{" in source:
        from braceexpand import braceexpand

        return list(braceexpand(source))
    path = Path(source)
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raise FileNotFoundError(f"{path} holds no .tar shards")
        return tars
    if path.is_file():
        return [str(path)]
    raise FileNotFoundError(f"shard source {source!r} does not exist")


def is_shard_source(source: str) -> bool:
    path = Path(source)
    return source.endswith(".tar") or "{" in source or (path.is_dir() and any(path.glob("*.tar")))


def shard_samples(url: str, on_break: Callable[[str, Exception], None],
                  select_files: Callable[[str], bool] | None = None) -> Iterator[dict]:  # fmt: skip
    """The raw samples of one shard (`__key__`, `png`/`jpg`/..., `txt` bytes), nothing decoded; a truncated or
    unreadable shard ends at the break and calls on_break(url, error). select_files: the members to read."""
    import webdataset as wds

    errors: list[Exception] = []

    def broken_shard(error: Exception) -> bool:  # webdataset's handler protocol: True = go on
        errors.append(error)
        on_break(url, error)
        return True

    yield from wds.tarfile_to_samples(handler=broken_shard, select_files=select_files)(iter([{"url": url}]))
    if not errors and Path(url).is_file() and not _ends_like_a_tar(Path(url)):
        on_break(url, EOFError("no end-of-archive blocks: the file is truncated"))


def _ends_like_a_tar(path: Path) -> bool:
    """A whole tar file ends with two zero blocks (tarfile takes a cut between members for the end)."""
    size = path.stat().st_size
    if size % 512 or size < 1024:
        return False
    with path.open("rb") as file:
        file.seek(size - 1024)
        return not any(file.read())


def decode_sample(sample: dict, max_pixels: int = MAX_PIXELS, target: int | None = None) -> tuple[Image.Image | str, str]:
    """(RGB image or the reason it is skipped, caption) of a raw sample."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    checked = check_image(sample[key], max_pixels, target) if key else "undecodable"
    return checked, sample.get("txt", b"").decode("utf-8").strip()


def read_shards(source: str | Path, max_pixels: int = MAX_PIXELS, skipped: Skipped | None = None,
                target: int | None = None) -> Iterator[tuple[Image.Image, str]]:  # fmt: skip
    """(RGB image, caption) samples in shard order; bad images are skipped and recorded in `skipped`."""
    skipped = skipped if skipped is not None else Skipped()

    def broken(url: str, error: Exception) -> None:
        skipped.broken_shards.append(f"{url}: {error}")

    for url in shard_urls(source):
        for sample in shard_samples(url, broken):
            checked, caption = decode_sample(sample, max_pixels, target)
            if isinstance(checked, str):
                getattr(skipped, checked).append(f"{url}:{sample['__key__']}")
                continue
            yield checked, caption


def load_shards(source: str | Path, preprocess: Preprocess, max_pixels: int = MAX_PIXELS) -> ImageTextData:
    """Every sample of the shards decoded, resized and centre-cropped into memory (the training data)."""
    skipped = Skipped()
    images, captions = [], []
    for image, caption in read_shards(source, max_pixels, skipped, preprocess.image_size):
        images.append(preprocess.resize_crop(image))
        captions.append([caption])
    skipped.report(str(source))
    if not images:
        raise ValueError(f"{source}: no decodable samples ({len(skipped)} skipped)")
    return ImageTextData(to_uint8_tensor(images), captions, skipped=len(skipped))
