"""Contrastive losses over a batch of normalised image and text features: full, chunked, and distributed.

Positives: by default image i matches text i only. When captions repeat inside a batch (the built-in world has
many "a red circle"s) the repeats are true positives too: treated as negatives they cap the learned logit scale
(~17 measured on the built-in world). Two ways to say so:
- `keys` (B,) integers, one per image-text pair (a caption id): rows with equal keys are positives of each other.
  Works for every function here, across ranks too, and costs O(B) to pass around.
- `positives` (B, B, bool), the dense mask, for the single-process `clip_loss` and `siglip_loss` only.

The chunked variants compute the same loss one block of texts at a time and recompute each block in the backward,
so the loss holds O(B x chunk) memory instead of O(B x B). The distributed variants take each rank's local rows;
their loss and gradients, averaged over ranks the way DDP averages gradients, equal one process on the global batch.

A run builds its loss once with `make_loss`: a `ClipLoss` or `SigLipLoss` that has chosen full, chunked or
distributed computation from the run's settings, called as loss(image, text, logit_scale, logit_bias, keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlfm import distributed


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric softmax cross-entropy (InfoNCE) over the similarity matrix, averaged over both directions.

    image, text: (B, D) normalised; logit_scale: exp(t'), a scalar. With several positives in a row, the
    target distribution spreads evenly over them."""
    logits = logit_scale * image @ text.T  # (B, B): row i = image i against every text
    positives = _dense_positives(positives, keys)
    if positives is None:
        targets = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    return (_soft_cross_entropy(logits, positives) + _soft_cross_entropy(logits.T, positives.T)) / 2


def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    positives: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairwise sigmoid loss: -sum_ij log sigmoid(z_ij * (t * cos_ij + b)) / B, z = +1 for positives, -1 else."""
    logits = logit_scale * image @ text.T + logit_bias  # (B, B)
    positives = _dense_positives(positives, keys)
    if positives is None:
        positives = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    signs = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)


# --- chunked: one block of texts at a time -------------------------------------------------------------------
def clip_loss_chunked(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    keys: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """`clip_loss` computed over (B, chunk_size) blocks of the similarity matrix, peak memory O(B x chunk_size).

    A block holds whole columns, so the text-to-image cross-entropy of its texts finishes inside it; the
    image-to-text log-sum-exp of each row is combined across blocks from the per-block log-sum-exps."""
    keys = _row_keys(keys, len(image), image.device)
    group_sizes = _count_in(keys, keys)  # positives of each row (= of each column: one key per pair)
    row_logsumexps, block_terms = [], []
    for text_block, block_keys, block_sizes in zip(text.split(chunk_size), keys.split(chunk_size),
                                                   group_sizes.split(chunk_size)):
        row_logsumexp, terms = checkpoint(_clip_block, image, text_block, logit_scale, keys, block_keys, group_sizes,
                                          block_sizes, use_reentrant=False)
        row_logsumexps.append(row_logsumexp)
        block_terms.append(terms)
    image_to_text = torch.stack(row_logsumexps).logsumexp(dim=0).sum()  # (blocks, B) -> B row log-sum-exps
    return (image_to_text + torch.stack(block_terms).sum()) / (2 * len(image))


def _clip_block(image, text_block, logit_scale, keys, block_keys, group_sizes, block_sizes):
    """One (B, C) block: each row's log-sum-exp over these C texts (B,), and the sum of this block's other terms:
    the C columns' whole text-to-image cross-entropy minus the rows' positive logits that fall in the block."""
    logits = logit_scale * image @ text_block.T  # (B, C)
    positive_logits = logits.where(keys[:, None] == block_keys[None, :], 0)
    text_to_image = (logits.logsumexp(dim=0) - positive_logits.sum(dim=0) / block_sizes).sum()
    return logits.logsumexp(dim=1), text_to_image - (positive_logits.sum(dim=1) / group_sizes).sum()


def siglip_loss_chunked(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    keys: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """`siglip_loss` computed over (B, chunk_size) blocks of the similarity matrix, peak memory O(B x chunk_size):
    the sigmoid loss is a plain sum over pairs, so blocks just add up."""
    keys = _row_keys(keys, len(image), image.device)
    total = sum(checkpoint(_siglip_block, image, text_block, logit_scale, logit_bias, keys, block_keys,
                           use_reentrant=False)
                for text_block, block_keys in zip(text.split(chunk_size), keys.split(chunk_size)))
    return total / len(image)


def _siglip_block(image, text_block, logit_scale, logit_bias, image_keys, block_keys):
    """-sum log sigmoid(z * logit) over one (B, C) block; z = +1 where the keys match."""
    logits = logit_scale * image @ text_block.T + logit_bias  # (B, C)
    signs = torch.where(image_keys[:, None] == block_keys[None, :], 1.0, -1.0).to(logits.dtype)
    return -F.logsigmoid(signs * logits).sum()


# --- distributed: each rank passes its local rows ------------------------------------------------------------
def clip_loss_distributed(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    keys: torch.Tensor | None = None,
    local_loss: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """CLIP over the global batch: features are gathered from every rank with gradients.

    By default every rank computes the whole global loss (chunked when chunk_size is set). With local_loss each
    rank computes only its own images and texts against the global batch, O(B_local x B_global) memory, and
    returns that part scaled by the world size, so the mean over ranks is the global loss."""
    rows = len(image)
    distributed.check_equal_rows(rows, image.device)
    all_image, all_text = distributed.all_gather_with_grad(image), distributed.all_gather_with_grad(text)
    all_keys = None if keys is None else distributed.all_gather(keys)
    if not local_loss:
        if chunk_size:
            return clip_loss_chunked(all_image, all_text, logit_scale, all_keys, chunk_size)
        return clip_loss(all_image, all_text, logit_scale, keys=all_keys)
    if chunk_size:
        raise ValueError("chunk_size applies to the global loss; local_loss already holds only local x global logits")
    all_keys = _row_keys(all_keys, len(all_image), image.device)
    mine = all_keys[distributed.rank() * rows : (distributed.rank() + 1) * rows]
    positives = mine[:, None] == all_keys[None, :]  # (B_local, B_global), for images and texts alike
    image_to_text = _soft_cross_entropy(logit_scale * image @ all_text.T, positives)
    text_to_image = _soft_cross_entropy(logit_scale * text @ all_image.T, positives)
    return (image_to_text + text_to_image) / 2


def siglip_loss_distributed(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP over the global batch without gathering it: texts travel around the ring, one rank's block per step,
    and each rank adds its images' sigmoid loss against every block (recomputed in the backward, whose gradients
    travel back around the ring). Memory: O(B_local x B_local) logits at a time, plus the received text blocks
    (B_global x D) kept for the backward. The loss is this rank's part scaled by the world size (normalised by
    B_local), so the mean over ranks is the global loss."""
    rows, me, world = len(image), distributed.rank(), distributed.world_size()
    distributed.check_equal_rows(rows, image.device)
    all_keys = distributed.all_gather(keys) if keys is not None else _row_keys(None, rows * world, image.device)
    keys_by_rank = all_keys.split(rows)
    total, text_block = 0, text
    for step in range(world):
        if step:
            text_block = distributed.ring_shift(text_block)  # now the texts of rank (me - step) % world
        total = total + checkpoint(_siglip_block, image, text_block, logit_scale, logit_bias, keys_by_rank[me],
                                   keys_by_rank[(me - step) % world], use_reentrant=False)
    return total / rows


# --- the run's loss, its computation chosen once ---------------------------------------------------------------
@dataclass(frozen=True)
class ClipLoss:
    """The CLIP loss over the global batch: gathered from every rank when across_ranks (each rank only its own
    rows against the global batch with local_loss), in blocks of chunk_size texts when set, else full. Keys (one
    per pair, e.g. caption ids) mark positives only with multi_positive; otherwise only the diagonal."""

    multi_positive: bool = True
    chunk_size: int = 0
    local_loss: bool = False
    across_ranks: bool = False

    def __call__(self, image, text, logit_scale, logit_bias=None, keys=None) -> torch.Tensor:
        if logit_bias is not None:
            raise ValueError("the CLIP loss takes no logit_bias (a SigLIP model's; see make_loss)")
        keys = keys if self.multi_positive else None
        if self.across_ranks:
            return clip_loss_distributed(image, text, logit_scale, keys, self.local_loss, self.chunk_size or None)
        if self.chunk_size:
            return clip_loss_chunked(image, text, logit_scale, keys, self.chunk_size)
        return clip_loss(image, text, logit_scale, keys=keys)


@dataclass(frozen=True)
class SigLipLoss:
    """The SigLIP loss over the global batch: texts passed around the ranks when across_ranks, in blocks of
    chunk_size texts when set (one process), else full. Keys as for ClipLoss."""

    multi_positive: bool = True
    chunk_size: int = 0
    across_ranks: bool = False

    def __call__(self, image, text, logit_scale, logit_bias=None, keys=None) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("the SigLIP loss needs the model's logit_bias")
        keys = keys if self.multi_positive else None
        if self.across_ranks:
            return siglip_loss_distributed(image, text, logit_scale, logit_bias, keys)
        if self.chunk_size:
            return siglip_loss_chunked(image, text, logit_scale, logit_bias, keys, self.chunk_size)
        return siglip_loss(image, text, logit_scale, logit_bias, keys=keys)


def make_loss(kind: str, multi_positive: bool = True, chunk_size: int = 0, local_loss: bool = False,
              world_size: int | None = None) -> ClipLoss | SigLipLoss:
    """The loss of a run: kind clip | siglip (model.kind), multi_positive (train.multi_positive), chunk_size
    (train.loss_chunk, 0: off), local_loss (distributed.local_loss); world_size: torch.distributed's when None
    (1 when it is not initialised). Above one rank the loss spans every rank's rows."""
    across_ranks = (distributed.world_size() if world_size is None else world_size) > 1
    if kind == "clip":
        return ClipLoss(multi_positive, chunk_size, local_loss, across_ranks)
    if kind == "siglip":
        return SigLipLoss(multi_positive, chunk_size, across_ranks)
    raise ValueError(f"no contrastive loss for model kind {kind!r} (clip | siglip)")


# --- positives -----------------------------------------------------------------------------------------------
def _dense_positives(positives: torch.Tensor | None, keys: torch.Tensor | None) -> torch.Tensor | None:
    if positives is not None and keys is not None:
        raise ValueError("pass positives or keys, not both (keys k give positives k[:, None] == k[None, :])")
    return keys[:, None] == keys[None, :] if keys is not None else positives


def _row_keys(keys: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor:
    """Keys as given, or the row index when there are none (each pair its own key: diagonal positives)."""
    return torch.arange(rows, device=device) if keys is None else keys


def _count_in(keys: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """How many entries of `among` equal each key, in O(B log B) (no B x B comparison)."""
    ordered = among.sort().values
    return torch.searchsorted(ordered, keys, right=True) - torch.searchsorted(ordered, keys)


def _soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each row against an even distribution over its positives."""
    targets = positives.to(logits.dtype)
    return F.cross_entropy(logits, targets / targets.sum(dim=1, keepdim=True))
