"""Shared transformer blocks: attention with separate q/k/v Linears (so LoRA and checkpoint key maps stay
simple), an MLP, and the pre-norm residual block used by both towers; and the precision a model runs in."""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@cache
def fast_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls are native (fast) here: a GPU with bf16, or a CPU with AVX512-BF16 or AMX. On other
    CPUs bf16 is emulated and slower than fp32."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where it is fast (fast_bf16), else fp32; other choices stand as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if fast_bf16(device.type) else "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` (`auto` resolved here): weights stay fp32, matmuls run in bf16/fp16."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(width, width, bias=bias)
        self.v_proj = nn.Linear(width, width, bias=bias)
        self.out_proj = nn.Linear(width, width, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        # x: (B, N, D) -> q, k, v: (B, heads, N, D/heads)
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if causal and mask is not None:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            causal = False
        out = attention(q, k, v, mask, causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


def attention(q, k, v, mask: torch.Tensor | None, causal: bool, gqa: bool = False) -> torch.Tensor:
    """Scaled dot-product attention; when training under CPU autocast in fp32, whose backward is much faster there
    than bf16's (docs/experiments.md §11). `gqa`: k, v have fewer heads than q, each serving a group of query heads."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal,
                                                 enable_gqa=gqa)  # fmt: skip
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).
    Post-norm (BERT): norm(x + attn(x)), then norm(x + mlp(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, eps: float, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width(width, mlp_ratio), act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x, mask, causal))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), mask, causal)
        return x + self.mlp(self.norm2(x))


def mlp_width(width: int, mlp_ratio: float) -> int:
    """Hidden width of the MLP; rounded, so a ratio read from a checkpoint (e.g. 37/32) gives back 37."""
    return round(width * mlp_ratio)


class Transformer(nn.Module):
    """A stack of blocks with an optional gradient-checkpointing switch (recompute activations in backward)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: str, eps: float, post_norm: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act, eps, post_norm) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                depth: int | None = None) -> torch.Tensor:
        """`depth`: run only the first `depth` blocks (a VLM reads an inner layer)."""
        for block in self.blocks[:depth]:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, causal, use_reentrant=False)
            else:
                x = block(x, mask, causal)
        return x


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block in place (any `blocks` ModuleList: the towers' and the LM's), so a
    block's norms, projections and activation fuse while host-side checks between blocks stay eager; the weights'
    names do not change. Returns the number of blocks compiled."""
    count = 0
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                block.compile()
                count += 1
    return count


def init_transformer(module: nn.Module, layers: int) -> None:
    """GPT-2 style init: normal(0.02) everywhere, residual output projections scaled by 1/sqrt(2*layers), biases 0
    (the towers and the language model alike)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2 and "embed" not in name.split(".")[-1]:
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("out_proj.weight", "fc2.weight", "down_proj.weight")) else 0.02
            nn.init.normal_(p, std=std)
        elif name.endswith("bias") and p.dim() == 1 and "norm" not in name:
            nn.init.zeros_(p)
