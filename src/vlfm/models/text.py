"""Text transformer: token + position embeddings -> blocks (causal for CLIP, bidirectional for SigLIP) ->
final norm -> pool (eos | last | mean | first) -> projection. Padding is excluded through the attention mask."""

from __future__ import annotations

import torch
from torch import nn

from vlfm.config import TextConfig
from vlfm.nn import Transformer, init_transformer


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig, output_dim: int | None = None):
        super().__init__()
        self.config = c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.randn(1, c.context_length, c.width) * 0.01)
        self.transformer = Transformer(c.width, c.layers, c.heads, c.mlp_ratio, c.act, c.norm_eps)
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.proj = nn.Linear(c.width, output_dim, bias=False) if output_dim else None
        nn.init.normal_(self.token_embed.weight, std=0.02)
        init_transformer(self.transformer, c.layers)

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token states after the final norm: (B, L, width)."""
        b, n = input_ids.shape
        if n > self.config.context_length:
            raise ValueError(f"{n} tokens exceed the text context length {self.config.context_length}")
        x = self.token_embed(input_ids) + self.pos_embed[:, :n].to(self.token_embed.weight.dtype)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
            # Causal + right padding: real tokens never see the padding after them, and padded positions are
            # never pooled, so the mask can be dropped and SDPA keeps its fast causal kernel.
            if not (self.config.causal and right_padded):
                mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): keys a query may attend to
        return self.norm(self.transformer(x, mask, causal=self.config.causal))

    def pool(self, tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        pool, rows = self.config.pool, torch.arange(tokens.shape[0], device=tokens.device)
        if pool == "first":
            return tokens[:, 0]
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
