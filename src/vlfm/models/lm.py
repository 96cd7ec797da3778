"""A Llama-style decoder language model: token embedding -> pre-norm blocks (RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP) -> RMSNorm -> output head (tied to the embedding or its own). The arithmetic follows
Hugging Face's Llama / Qwen2 (rotate-half RoPE, RMSNorm in fp32), so their weights give the same logits
(key maps: interop/hf_lm.py).

Batches are left-padded: the attention mask (B, L_total) covers cached and new tokens, and positions count real
tokens only, so a padded row sees exactly what it would see alone. `generate` decodes with a KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from vlfm.config import LMConfig
from vlfm.data.tokenizer import Tokenizer
from vlfm.models.base import SavedModel, register
from vlfm.nn import attention, init_transformer


class KVCache:
    """Keys and values of every position seen so far, per layer: (B, kv_heads, T, head_dim), RoPE applied.

    Each layer's buffers are allocated once, `capacity` positions long (generate knows its final length), and
    written in place; a forward that runs past them moves them to a buffer twice as long."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []

    @property
    def length(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions' k, v into `layer`'s buffers and return everything stored for it (views)."""
        if layer == len(self.keys):
            self.keys.append(k.new_empty(0, 0, 0, 0))
            self.values.append(v.new_empty(0, 0, 0, 0))
            self.lengths.append(0)
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if end > self.keys[layer].shape[2]:
            size = max(end, self.capacity, 2 * start)
            self.keys[layer], self.values[layer] = (_grown(self.keys[layer], k, size, start),
                                                    _grown(self.values[layer], v, size, start))
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def _grown(buffer: torch.Tensor, new: torch.Tensor, size: int, kept: int) -> torch.Tensor:
    """A buffer (B, kv_heads, size, head_dim) shaped for `new`, holding `buffer`'s first `kept` positions."""
    out = new.new_empty(*new.shape[:2], size, new.shape[3])
    if kept:
        out[:, :, :kept] = buffer[:, :, :kept]
    return out


class RMSNorm(nn.Module):
    """x / rms(x) * weight; normalised in fp32 and cast back before the scale, as Llama's weights were trained."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel for x32 * rsqrt(mean(x32^2) + eps), bit for bit what the five ops it replaced gave.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, L, head_dim) for integer positions (B, L), shaped to broadcast over heads, sin's first half
    negated for apply_rope; frequencies in fp32 whatever the model's dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions[:, None, :, None].float() * inv_freq  # rotate-half layout: dims i and i + head_dim/2 form a pair
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, L, head_dim) rotated: x * cos + (-second half, first half) * sin, the rotated copy taken as
    (second, first) by one roll, with the minus sign in sin (the same numbers: negation is exact)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class GroupedQueryAttention(nn.Module):
    """`heads` query heads share `kv_heads` key/value heads (each kv head serves heads // kv_heads queries)."""

    def __init__(self, c: LMConfig):
        super().__init__()
        self.heads, self.kv_heads = c.heads, c.kv_heads
        self.head_dim = c.head_dim or c.width // c.heads
        self.q_proj = nn.Linear(c.width, c.heads * self.head_dim, bias=c.attn_bias)
        self.k_proj = nn.Linear(c.width, c.kv_heads * self.head_dim, bias=c.attn_bias)
        self.v_proj = nn.Linear(c.width, c.kv_heads * self.head_dim, bias=c.attn_bias)
        self.out_proj = nn.Linear(c.heads * self.head_dim, c.width, bias=False)

    def forward(self, x, rotary, mask, causal, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        # x: (B, L, width) -> q: (B, heads, L, head_dim); k, v: (B, kv_heads, L, head_dim)
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rotary), apply_rope(k, *rotary)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, kv_heads, L_total, head_dim)
        if self.kv_heads != self.heads and torch.is_grad_enabled():
            # For backward: the repeated heads' gradients then sum in k and v's own dtype (bf16 under autocast), as
            # training always did; without grad, SDPA reads each kv head for its group (no copies, same numbers).
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = attention(q, k, v, mask, causal, gqa=k.shape[1] != self.heads)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.norm1 = RMSNorm(c.width, c.norm_eps)
        self.attn = GroupedQueryAttention(c)
        self.norm2 = RMSNorm(c.width, c.norm_eps)
        self.mlp = SwiGLU(c.width, c.mlp_width)

    def forward(self, x, rotary, mask, causal, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, mask, causal, cache, layer)
        return x + self.mlp(self.norm2(x))


@register
class LanguageModel(SavedModel, nn.Module):
    """Token ids or embeddings in, next-token logits out; `generate` for decoding (see the module docstring)."""

    ARCHITECTURE = "vlfm.LanguageModel"
    CONFIG = LMConfig

    @classmethod
    def build(cls, config, tokenizer, preprocess):
        return cls(config, tokenizer)

    def __init__(self, config: LMConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = c = config
        self.tokenizer = tokenizer  # saved and loaded with the weights; a VLM keeps its own, this one stays None
        self.embed_tokens = nn.Embedding(c.vocab_size, c.width)
        self.blocks = nn.ModuleList(DecoderBlock(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.width, c.norm_eps)
        # Tied: no module of its own, so the state dict holds the matrix once (safetensors refuses shared tensors).
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.width, c.vocab_size, bias=False)
        self.grad_checkpointing = False  # recompute each block in backward (training only): less memory
        init_transformer(self, c.layers)

    @property
    def output_weight(self) -> torch.Tensor:
        """The output head's matrix (vocab, width): the token embedding when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache: KVCache | None = None,
                position_ids=None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, vocab) for the new tokens; `attention_mask` (B, past + L) covers cached and new ones.
        `logits_at` (B, L) bool: only those positions' logits, (N, vocab) in reading order. Training needs
        them where a label is, and the (B, L, vocab) tensor is the largest activation of a big-vocabulary LM."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, width)
        b, n = x.shape[:2]
        past = cache.length if cache is not None else 0
        if past + n > self.config.max_positions:
            raise ValueError(f"{past} cached + {n} new tokens exceed the context length max_positions={self.config.max_positions}")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + n):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be (batch, cached + new) = {(b, past + n)}")
        if position_ids is None:
            position_ids = self._positions(attention_mask, b, past, n, x.device)
        mask, causal = self._attention_mask(attention_mask, past, n, x.device)
        rotary = rope(position_ids, self.blocks[0].attn.head_dim, self.config.rope_theta, x.dtype)
        for layer, block in enumerate(self.blocks):
            # Never under a cache: recomputing in backward would append the same keys twice.
            if self.grad_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, rotary, mask, causal, use_reentrant=False)
            else:
                x = block(x, rotary, mask, causal, cache, layer)
        x = self.norm(x)
        return F.linear(x if logits_at is None else x[logits_at], self.output_weight)

    @staticmethod
    def _positions(attention_mask, b: int, past: int, n: int, device) -> torch.Tensor:
        """Positions (B, L) of the new tokens: real tokens counted from 0, so left padding shifts nothing."""
        if attention_mask is None:
            return torch.arange(past, past + n, device=device).expand(b, n)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]

    @staticmethod
    def _attention_mask(attention_mask, past: int, n: int, device) -> tuple[torch.Tensor | None, bool]:
        """(mask (B, 1, L, past + L) of keys each query may see, or None; SDPA's is_causal flag)."""
        if attention_mask is None or bool(attention_mask.all()):
            if past == 0:
                return None, True  # SDPA's own causal kernel
            if n == 1:
                return None, False  # one new token sees every cached one
        total = past + n
        keys = torch.arange(total, device=device)
        queries = torch.arange(past, total, device=device)[:, None]
        allowed = keys <= queries  # (L, total)
        if attention_mask is not None:
            # A query always sees itself, so a padding row never attends to nothing (SDPA would give NaN there,
            # and the NaN would reach real tokens through the padding's keys).
            allowed = (allowed & attention_mask.bool()[:, None, :]) | (keys == queries)  # (B, L, total)
        return allowed.unsqueeze(-3), False

    def resize_token_embeddings(self, n: int) -> None:
        """Grow (or cut) the vocabulary to `n`; new rows start at the mean of the existing ones. Tying is kept."""
        self.embed_tokens = _resized(self.embed_tokens, n, lambda w: nn.Embedding(n, w.shape[1]))
        if self.lm_head is not None:
            self.lm_head = _resized(self.lm_head, n, lambda w: nn.Linear(w.shape[1], n, bias=False))
        self.config.vocab_size = n

    @torch.inference_mode()  # no autograd bookkeeping at all: ~8% faster decoding than no_grad (docs/experiments.md §11)
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, stop_tokens=None,
                 generator: torch.Generator | None = None, on_step=None) -> list[list[int]]:
        """New token ids per row (the stop token excluded). Prompts are left-padded ids or embeddings (a VLM's
        spliced image features); greedy at temperature 0, else temperature + nucleus (top_p) sampling.
        `on_step(out)`, if given, sees the token lists so far after every step (a server streams them)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        prompt = input_ids if input_ids is not None else inputs_embeds
        b, n = prompt.shape[:2]
        if n + max_new_tokens > self.config.max_positions:
            raise ValueError(f"a prompt of {n} tokens + max_new_tokens={max_new_tokens} = {n + max_new_tokens} exceeds "
                             f"the context length max_positions={self.config.max_positions}")
        if stop_tokens is None:
            stop_tokens = [] if self.config.eos_token_id is None else [self.config.eos_token_id]
        stop = set(stop_tokens)
        mask = attention_mask if attention_mask is not None else torch.ones(b, n, dtype=torch.long, device=prompt.device)
        # Decoding steps track positions themselves; without padding they need no mask at all (and no host sync).
        padded = not bool(mask.all())
        positions = self._positions(mask, b, 0, n, prompt.device)
        cache = KVCache(capacity=n + max_new_tokens)  # every step writes into buffers allocated once
        last = torch.zeros(b, n, dtype=torch.bool, device=prompt.device)
        last[:, -1] = True  # the output head on the prompt's last position only, not on all n
        logits = self(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask, cache=cache,
                      position_ids=positions, logits_at=last)  # fmt: skip
        position = positions[:, -1:]
        out: list[list[int]] = [[] for _ in range(b)]
        running = [True] * b
        for step in range(max_new_tokens):
            token = _next_token(logits.float(), temperature, top_p, generator)  # (B,)
            for row, t in enumerate(token.tolist()):
                if running[row] and t in stop:
                    running[row] = False
                elif running[row]:
                    out[row].append(t)
            if on_step is not None:
                on_step(out)
            if not any(running) or step == max_new_tokens - 1:
                break
            if padded:
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)  # finished rows keep decoding; their tokens are dropped
            position = position + 1
            logits = self(input_ids=token[:, None], attention_mask=mask if padded else None, cache=cache,
                          position_ids=position)[:, -1]  # fmt: skip
        return out


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """(B, vocab) logits -> (B,) token ids: argmax, or a sample from the smallest set whose mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = torch.softmax(logits / temperature, dim=-1).sort(dim=-1, descending=True)
    probs = probs * (probs.cumsum(-1) - probs < top_p)  # the most likely token is always kept
    choice = torch.multinomial(probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def _resized(module: nn.Module, n: int, make) -> nn.Module:
    old = module.weight
    new = make(old).to(device=old.device, dtype=old.dtype)
    keep = min(n, old.shape[0])
    with torch.no_grad():
        new.weight[:keep] = old[:keep]
        new.weight[keep:] = old.mean(dim=0)
    new.weight.requires_grad_(old.requires_grad)
    return new
