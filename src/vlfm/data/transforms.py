"""Image preprocessing with Pillow + torch: resize the short side, centre crop, normalise; random resized crop
and flip for training. The settings are saved as preprocess.json beside the weights."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlfm.io import CheckpointError, read_json, to_rgb

INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


@dataclass
class Preprocess:
    image_size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # shortest: resize short side then centre crop | squash: resize to a square
    crop_scale: tuple[float, float] = field(default=(0.8, 1.0))  # training only
    flip: bool = False  # training only; off when captions mention left/right

    def __post_init__(self):
        if self.interpolation not in INTERPOLATION:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATION)}")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of shortest, squash")
        self.mean, self.std, self.crop_scale = tuple(self.mean), tuple(self.std), tuple(self.crop_scale)

    # --- evaluation ---------------------------------------------------------------------------------
    def resize_crop(self, image: Image.Image) -> Image.Image:
        image = to_rgb(image)  # 16-bit grey scaled, transparency on white (io.to_rgb)
        size, method = self.image_size, INTERPOLATION[self.interpolation]
        if self.resize_mode == "squash":
            return image.resize((size, size), method)
        w, h = image.size
        # The long side is truncated, as transformers' and torchvision's resize do (parity with their weights).
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), method)
        left, top = (nw - size) // 2, (nh - size) // 2
        return image.crop((left, top, left + size, top + size))

    def __call__(self, images: Image.Image | list[Image.Image]) -> torch.Tensor:
        """PIL image(s) -> normalised float tensor (B, 3, size, size)."""
        if isinstance(images, Image.Image):
            images = [images]
        return self.normalize(to_uint8_tensor([self.resize_crop(image) for image in images]))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float, normalised with mean/std."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    # --- training -----------------------------------------------------------------------------------
    def random_resized_crop(self, image: Image.Image, rng: random.Random) -> Image.Image:
        """Crop a random area fraction in crop_scale (aspect 3/4..4/3), resize to size; optional flip."""
        image = to_rgb(image)  # 16-bit grey scaled, transparency on white (io.to_rgb)
        w, h = image.size
        for _ in range(10):
            area = w * h * rng.uniform(*self.crop_scale)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                image = image.crop((left, top, left + cw, top + ch))
                break
        image = image.resize((self.image_size, self.image_size), INTERPOLATION[self.interpolation])
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return image

    # --- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Preprocess:
        data = read_json(path)
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:  # an unknown or missing key, a value of the wrong kind
            raise CheckpointError(f"{path}: {error}") from None


def to_uint8_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Same-sized RGB images -> uint8 (B, 3, H, W)."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
