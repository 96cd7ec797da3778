"""Contrastive losses over a batch of normalised image and text features.

`positives` (B, B, bool) marks pairs that match. By default only the diagonal does; when captions repeat
inside a batch (the built-in world has many "a red circle"s) the repeats are true positives too: treated as
negatives they cap the learned logit scale (~17 measured on the built-in world).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric softmax cross-entropy (InfoNCE) over the similarity matrix, averaged over both directions.

    image, text: (B, D) normalised; logit_scale: exp(t'), a scalar. With several positives in a row, the
    target distribution spreads evenly over them."""
    logits = logit_scale * image @ text.T  # (B, B): row i = image i against every text
    if positives is None:
        targets = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    targets = positives.to(logits.dtype)
    image_to_text = targets / targets.sum(dim=1, keepdim=True)
    text_to_image = targets.T / targets.T.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, image_to_text) + F.cross_entropy(logits.T, text_to_image)) / 2


def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairwise sigmoid loss: -sum_ij log sigmoid(z_ij * (t * cos_ij + b)) / B, z = +1 for positives, -1 else."""
    logits = logit_scale * image @ text.T + logit_bias  # (B, B)
    if positives is None:
        positives = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    signs = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)
