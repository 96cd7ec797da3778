"""Vision Transformer: patchify -> flatten -> (+ class token) -> + position embeddings -> blocks -> norm -> pool."""

from __future__ import annotations

import torch
from torch import nn

from vlfm.config import VisionConfig
from vlfm.nn import MLP, Attention, Transformer, init_transformer, mlp_width


class ConvStem(nn.Module):
    """Stride-2 3x3 convolutions down to the patch grid, then a 1x1 projection to the width.

    A single strided conv has to learn edges and shapes in one linear map (docs/experiments.md §1.2)."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        stages = patch_size.bit_length() - 1
        if 2**stages != patch_size:
            raise ValueError(f"stem=conv needs a power-of-two patch_size, got {patch_size}")
        layers: list[nn.Module] = []
        channels = 3
        for i in range(stages):
            out = max(width // 2 ** (stages - 1 - i), 16) if i < stages - 1 else width
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AttentionPool(nn.Module):
    """SigLIP's 'map' head: a learned probe attends over all tokens, followed by an MLP residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attn = Attention(width, heads)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width(width, mlp_ratio), act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The probe is the query; tokens are keys and values. Attention's q/k/v all read its input, so the
        # probe is concatenated in front and only its output row is kept.
        b, n, d = x.shape
        probe = self.probe.expand(b, -1, -1)
        heads, hd = self.attn.heads, d // self.attn.heads
        q = self.attn.q_proj(probe).view(b, 1, heads, hd).transpose(1, 2)
        k = self.attn.k_proj(x).view(b, n, heads, hd).transpose(1, 2)
        v = self.attn.v_proj(x).view(b, n, heads, hd).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        out = self.attn.out_proj(out)
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig, output_dim: int | None = None):
        super().__init__()
        self.config = c = config
        if c.stem == "conv":
            self.patch_embed = ConvStem(c.patch_size, c.width)
        else:
            self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size, bias=c.patch_bias)
        self.grid = c.image_size // c.patch_size
        tokens = self.grid**2 + int(c.class_token)
        self.class_embed = nn.Parameter(torch.randn(c.width) * 0.02) if c.class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, c.width) * 0.02)
        self.norm_pre = nn.LayerNorm(c.width, eps=c.norm_eps) if c.pre_norm else None
        self.transformer = Transformer(c.width, c.layers, c.heads, c.mlp_ratio, c.act, c.norm_eps)
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.head = AttentionPool(c.width, c.heads, c.mlp_ratio, c.act, c.norm_eps) if c.pool == "map" else None
        self.proj = nn.Linear(c.width, output_dim, bias=False) if output_dim and c.proj else None
        init_transformer(self.transformer, c.layers)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens (+ class token) with position embeddings, before the blocks: (B, tokens, width).
        Without gradients the patch projection runs in fp32 even under autocast: raw pixels rounded to bf16 are
        the largest single source of bf16 inference's difference from fp32, at a few % of the FLOPs (training
        keeps it in bf16, where the stem is a fifth of a step; docs/experiments.md §11.1)."""
        if torch.is_autocast_enabled(pixels.device.type) and not torch.is_grad_enabled():
            with torch.autocast(pixels.device.type, enabled=False):
                x = self.patch_embed(pixels.float())
        else:
            x = self.patch_embed(pixels)  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        if self.class_embed is not None:
            x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        return self.norm_pre(x) if self.norm_pre is not None else x

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """All token states after the final norm: (B, tokens, width)."""
        return self.norm(self.transformer(self.embed(pixels)))

    def hidden_states(self, pixels: torch.Tensor, layer: int) -> torch.Tensor:
        """Token states after `layer` blocks (negative counts from the end: -1 is the last block), without the
        final norm: Hugging Face's `hidden_states[layer]`, what LLaVA feeds its projector. Later blocks are
        not run."""
        blocks = self.transformer.blocks
        n = layer if layer > 0 else len(blocks) + 1 + layer
        if not 1 <= n <= len(blocks):
            raise ValueError(f"layer {layer} is outside the {len(blocks)} vision blocks")
        return self.transformer(self.embed(pixels), depth=n)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        pool = self.config.pool
        if pool == "cls":
            return tokens[:, 0]
        if pool == "map":
            return self.head(tokens)
        return tokens[:, int(self.config.class_token):].mean(dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled (and projected, when the model has a projection) image features: (B, output_dim)."""
        pooled = self.pool(self.forward_tokens(pixels))
        return self.proj(pooled) if self.proj is not None else pooled
