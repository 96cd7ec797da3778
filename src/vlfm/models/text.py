"""Text transformer: token + position embeddings -> blocks (causal for CLIP, bidirectional for SigLIP and BERT)
-> final norm -> pool (eos | last | mean | first | argmax | end) -> projection. Padding is excluded through the attention
mask, except under SigLIP's `end` pooling, where every text is padded to the context length and the padding is
part of the input (as the original weights were trained).

`TextEncoder` is a text tower on its own (e.g. a BERT / MiniLM sentence encoder), with its tokenizer attached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlfm.config import TextConfig
from vlfm.io import CheckpointError
from vlfm.models.base import SavedModel, register
from vlfm.nn import Transformer, autocast, init_transformer


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig, output_dim: int | None = None):
        super().__init__()
        self.config = c = config
        post = c.norm == "post"
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.randn(1, c.context_length, c.width) * 0.01)
        self.norm_embed = nn.LayerNorm(c.width, eps=c.norm_eps) if post else None  # BERT normalises embeddings
        self.transformer = Transformer(c.width, c.layers, c.heads, c.mlp_ratio, c.act, c.norm_eps, post_norm=post)
        self.norm = None if post else nn.LayerNorm(c.width, eps=c.norm_eps)  # post-norm blocks end normalised
        self.proj = nn.Linear(c.width, output_dim, bias=c.proj_bias) if output_dim and c.proj else None
        nn.init.normal_(self.token_embed.weight, std=0.02)
        init_transformer(self.transformer, c.layers)

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token states after the final norm: (B, L, width)."""
        b, n = input_ids.shape
        if n > self.config.context_length:
            raise ValueError(f"{n} tokens exceed the text context length {self.config.context_length}")
        x = self.token_embed(input_ids) + self.pos_embed[:, :n].to(self.token_embed.weight.dtype)
        if self.norm_embed is not None:
            x = self.norm_embed(x)
        mask = None
        if attention_mask is not None and self.config.pool != "end" and not bool(attention_mask.all()):
            right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
            # Causal + right padding: real tokens never see the padding after them, and padded positions are
            # never pooled, so the mask can be dropped and SDPA keeps its fast causal kernel.
            if not (self.config.causal and right_padded):
                mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): keys a query may attend to
        x = self.transformer(x, mask, causal=self.config.causal)
        return self.norm(x) if self.norm is not None else x

    def pool(self, tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        pool, rows = self.config.pool, torch.arange(tokens.shape[0], device=tokens.device)
        if pool == "first":
            return tokens[:, 0]
        if pool == "end":
            return tokens[:, -1]
        if pool == "argmax":
            return tokens[rows, input_ids.argmax(dim=1)]
        if pool == "eos":
            is_eos = input_ids == self.config.eos_token_id
            if not bool(is_eos.any(dim=1).all()):
                raise ValueError("eos pooling needs an end-of-text token in every sequence (was it truncated away?)")
            return tokens[rows, is_eos.int().argmax(dim=1)]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pool == "last":
            return tokens[rows, attention_mask.sum(dim=1) - 1]
        weights = attention_mask.to(tokens.dtype).unsqueeze(-1)  # mean over real tokens only
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.forward_tokens(input_ids, attention_mask)
        pooled = self.pool(tokens, input_ids, attention_mask)
        return self.proj(pooled) if self.proj is not None else pooled


class TextEmbedding:
    """Raw text in, embeddings out: for any model with a `text` tower, a `tokenizer` and a `device`.

    `precision` is what the embed_* methods (classify, search, serving, evaluation) run in: `auto` is bf16 where
    it is fast (nn.fast_bf16), whose normalised embeddings differ from fp32's by ~1e-3 an element (cosine to
    fp32's > 0.9999; bench/inference.py); set `fp32` for bit-for-bit fp32 results."""

    text: TextTransformer
    precision: str = "auto"

    def tokenize(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise CheckpointError(
                "this model has no tokenizer attached, so it cannot embed text: its directory had no tokenizer.json "
                "(or vocab files); copy the original model's tokenizer files beside the weights, or save the model "
                "with its tokenizer"
            )
        c = self.text.config
        return self.tokenizer(texts, c.context_length, pad_to_context=c.pool == "end")

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text(input_ids, attention_mask)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text embeddings (N, dim), computed in batches."""
        out = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[start : start + batch_size])
            with autocast(self.device, self.precision):
                features = self.encode_text(ids.to(self.device), mask.to(self.device))
            out.append(F.normalize(features.float(), dim=-1))
        return torch.cat(out)


@register
class TextEncoder(SavedModel, TextEmbedding, nn.Module):
    """A text tower alone (a sentence encoder such as MiniLM), e.g. the locked text side of a LiT model."""

    ARCHITECTURE = "vlfm.TextEncoder"
    CONFIG = TextConfig

    @classmethod
    def build(cls, config, tokenizer, preprocess):
        return cls(config, tokenizer)

    def __init__(self, config: TextConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.text = TextTransformer(config)
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.text.token_embed.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text(input_ids, attention_mask)
