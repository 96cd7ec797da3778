"""Labelled image sets for evaluation and adaptation: class folders, and real data that ships in PyPI packages.

- `digits`: scikit-learn's 1,797 real handwritten digits (8x8, 16 grey levels), drawn dark on light and
  upscaled by the model's preprocessing; `digits-val` (every 4th image by index: 0, 4, 8, ...; 450 images)
  and `digits-test` (the other 1,347) split them, so a zero-shot choice (prompt templates, a checkpoint, a
  training mix) can be made on `digits-val` and reported on `digits-test`, never chosen on the test images;
- `lfw_subset`: scikit-image's 200 25x25 crops, 100 faces and 100 non-faces;
- `shapes`: the built-in world's single-object scenes, 20 per "colour shape" label (30 classes, held-out
  combinations included);
- `shapes-ood`: the same 30 labels drawn by an independent renderer in another style (data/ood.py), 20 each:
  the out-of-domain counterpart of `shapes`;
- any folder of class folders (ImageNet layout: ROOT/CLASS/*.png), class names from the folder names.

Every set is split deterministically (seeded, stratified) into train / val / test for probes and fine-tuning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlfm.data.glyphs import DIGIT_WORDS
from vlfm.data.sources import list_images
from vlfm.io import MAX_PIXELS, decode_image

log = logging.getLogger("vlfm")

NAMED = ("shapes", "shapes-ood", "digits", "digits-val", "digits-test", "lfw_subset")  # the sets load_dataset knows by name
DIGIT_NAMES = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
# Prompt templates per named set (CLIP_benchmark's style); class folders use generic ones.
TEMPLATES = {
    "shapes": ["{}", "a photo of {}", "a picture of {}", "an image of {}", "there is {}"],  # the world's ensemble
    "digits": ['a photo of the number: "{}".', "a handwritten digit {}", "the digit {}"],
    "lfw_subset": ["a photo of {}.", "a picture of {}.", "a close-up of {}."],
    "folder": ["a photo of {}.", "a picture of {}.", "{}"],
}


@dataclass
class LabelledImages:
    name: str
    images: list[Image.Image]
    targets: torch.Tensor  # (N,) class indices
    classnames: list[str]
    templates: list[str]
    skipped: int = 0
    synonyms: list[list[str]] | None = None  # per class, other names for it ("7": ["7", "seven"])

    def __len__(self) -> int:
        return len(self.images)

    def split(self, seed: int = 0, val: float = 0.2, test: float = 0.2) -> dict[str, torch.Tensor]:
        """Stratified train/val/test index tensors, the same for a given seed."""
        rng = np.random.default_rng(seed)
        parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for c in range(len(self.classnames)):
            members = rng.permutation(np.flatnonzero(self.targets.numpy() == c))
            n_test, n_val = round(len(members) * test), round(len(members) * val)
            parts["test"] += members[:n_test].tolist()
            parts["val"] += members[n_test : n_test + n_val].tolist()
            parts["train"] += members[n_test + n_val :].tolist()
        return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in parts.items()}


def load_dataset(name: str, max_pixels: int = MAX_PIXELS) -> LabelledImages:
    """A named set (NAMED) or a folder of class folders (images over `max_pixels` skipped)."""
    if name in ("digits", "digits-val", "digits-test"):
        return digits(name.partition("-")[2] or None)
    if name == "lfw_subset":
        return lfw_subset()
    if name == "shapes":
        return shapes()
    if name == "shapes-ood":
        return shapes_ood()
    if Path(name).is_dir():
        return class_folders(name, max_pixels)
    raise ValueError(f"unknown dataset {name!r}: use {', '.join(NAMED)} or a folder of class folders")


def _grey_images(arrays: np.ndarray) -> list[Image.Image]:
    """Float arrays in [0, 1] (N, H, W) -> RGB PIL images."""
    return [Image.fromarray((a * 255).round().astype(np.uint8)).convert("RGB") for a in arrays]


DIGITS_VAL_EVERY = 4  # digits-val: the images whose index is a multiple of this; digits-test: the rest


def digits_split_indices(part: str, n: int = 1797) -> np.ndarray:
    """Indices into sklearn's digits of `part` ("val" or "test"): fixed, documented, disjoint, together all n."""
    if part not in ("val", "test"):
        raise ValueError(f"digits part {part!r} must be 'val' or 'test'")
    val = np.arange(n) % DIGITS_VAL_EVERY == 0
    return np.flatnonzero(val if part == "val" else ~val)


def digits(part: str | None = None) -> LabelledImages:
    """All 1,797 digits, or part "val" / "test" of them (digits_split_indices)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = np.arange(len(data.target)) if part is None else digits_split_indices(part, len(data.target))
    images = _grey_images(1.0 - data.images[keep] / 16.0)  # ink dark on light paper, as rendered glyphs are
    synonyms = [[name, word] for name, word in zip(DIGIT_NAMES, DIGIT_WORDS)]
    name = "digits" if part is None else f"digits-{part}"
    return LabelledImages(name, images, torch.tensor(data.target[keep]), list(DIGIT_NAMES), TEMPLATES["digits"],
                          synonyms=synonyms)  # fmt: skip


def lfw_subset() -> LabelledImages:
    from skimage.data import lfw_subset as load

    arrays = load()  # the first 100 are faces, the last 100 are not
    targets = torch.tensor([0] * 100 + [1] * 100)
    names = ["a face", "something other than a face"]
    synonyms = [["a face", "a human face", "a portrait of a person"], ["something other than a face", "an object", "a scene"]]
    return LabelledImages("lfw_subset", _grey_images(arrays), targets, names, TEMPLATES["lfw_subset"], synonyms=synonyms)


def shapes(per_class: int = 20, image_size: int = 64) -> LabelledImages:
    from vlfm.data.shapes import ALL_LABELS, ShapesWorld, WorldConfig
    from vlfm.data.world_text import with_article

    world = ShapesWorld(WorldConfig(image_size=image_size))
    labels = list(ALL_LABELS)
    scenes = [world.single_object_scene(i, labels) for i in range(per_class * len(labels))]
    targets = torch.tensor([labels.index(scene.objects[0].label) for scene in scenes])
    return LabelledImages("shapes", [world.render(s) for s in scenes], targets, [with_article(x) for x in labels],
                          TEMPLATES["shapes"])  # fmt: skip


def shapes_ood(per_class: int = 20) -> LabelledImages:
    from vlfm.data.ood import ood_set
    from vlfm.data.shapes import ALL_LABELS
    from vlfm.data.world_text import with_article

    images, targets = ood_set(per_class)
    return LabelledImages("shapes-ood", images, torch.tensor(targets), [with_article(x) for x in ALL_LABELS],
                          TEMPLATES["shapes"])  # fmt: skip


def class_folders(root: str | Path, max_pixels: int = MAX_PIXELS) -> LabelledImages:
    root = Path(root)
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root} needs at least two class folders (ROOT/CLASS/image.png), found {len(classes)}")
    images, targets, skipped = [], [], []
    for index, folder in enumerate(classes):
        for path in list_images(folder):
            image = decode_image(path, max_pixels)
            if image is None:
                skipped.append(str(path))
                continue
            images.append(image)
            targets.append(index)
    if skipped:
        log.warning("skipped %d undecodable or oversized image(s), e.g. %s", len(skipped), skipped[0])
    names = [folder.name.replace("_", " ") for folder in classes]
    return LabelledImages(root.name, images, torch.tensor(targets), names, TEMPLATES["folder"], len(skipped))
