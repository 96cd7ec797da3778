"""Projectors: image token features (B, N, vision width) -> language-model input embeddings (B, N', LM width).

linear        one Linear (LLaVA-1)
mlp2x_gelu    Linear, GELU, Linear (LLaVA-1.5)
pixel_shuffle each f x f block of neighbouring tokens concatenated into one, then a Linear: f^2 fewer image
              tokens for the LM to read (Idefics3 / nanoVLM), the cheap way to fit more images in a context
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Projector(nn.Module):
    def __init__(self, kind: str, vision_width: int, lm_width: int, shuffle_factor: int = 2):
        super().__init__()
        self.kind, self.factor = kind, shuffle_factor
        if kind == "linear":
            self.fc1, self.fc2 = nn.Linear(vision_width, lm_width), None
        elif kind == "mlp2x_gelu":
            self.fc1, self.fc2 = nn.Linear(vision_width, lm_width), nn.Linear(lm_width, lm_width)
        elif kind == "pixel_shuffle":
            self.fc1, self.fc2 = nn.Linear(vision_width * shuffle_factor**2, lm_width, bias=False), None
        else:
            raise ValueError(f"unknown projector {kind!r} (linear | mlp2x_gelu | pixel_shuffle)")
        self.act = nn.GELU()

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in // self.factor**2 if self.kind == "pixel_shuffle" else tokens_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "pixel_shuffle":
            x = pixel_shuffle(x, self.factor)
        x = self.fc1(x)
        return self.fc2(self.act(x)) if self.fc2 is not None else x


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, g*g, D) on a g x g grid -> (B, (g/f)^2, D*f^2): each output token holds an f x f block, row-major."""
    b, n, d = x.shape
    g = math.isqrt(n)
    if g * g != n or g % factor:
        raise ValueError(f"pixel_shuffle needs a square token grid divisible by {factor}, got {n} tokens")
    x = x.view(b, g // factor, factor, g // factor, factor, d)  # (B, rows, f, cols, f, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (g // factor) ** 2, factor * factor * d)
