import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlfm.data.transforms import Preprocess


def test_resize_crop_and_normalise():
    image = Image.new("RGB", (100, 50), (255, 0, 128))
    pre = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    pixels = pre(image)
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.allclose(pixels[0, :, 5, 5], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)


def test_centre_crop_keeps_the_centre():
    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, 20:60] = 255  # white band in the middle 40 columns
    crop = Preprocess(image_size=40, interpolation="nearest").resize_crop(Image.fromarray(array))
    assert crop.size == (40, 40) and np.asarray(crop).min() == 255


def test_random_resized_crop_is_seeded(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    pre = Preprocess(image_size=32, flip=True)
    a = pre.random_resized_crop(image, random.Random(3))
    b = pre.random_resized_crop(image, random.Random(3))
    assert a.size == (32, 32) and np.array_equal(np.asarray(a), np.asarray(b))
    pre.save(tmp_path / "preprocess.json")
    assert Preprocess.load(tmp_path / "preprocess.json") == pre


def test_bad_settings():
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(interpolation="cubic")
