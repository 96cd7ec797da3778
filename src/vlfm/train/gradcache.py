"""GradCache: a contrastive step over a batch whose activations do not fit in memory at once.

Plain gradient accumulation would change a contrastive loss (each micro-batch would see only its own negatives).
GradCache keeps the loss over the whole batch: embed every micro-batch without a graph, compute the loss on the
cached embeddings and backpropagate it to them, then re-embed each micro-batch with a graph and push the cached
gradients through it. Memory: one micro-batch's activations plus the (B, D) embeddings; cost: one extra forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def gradcache_step(
    encode_image: Callable[[Any], torch.Tensor],
    encode_text: Callable[[Any], torch.Tensor],
    image_chunks: Sequence[Any],
    text_chunks: Sequence[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Accumulate into `.grad` the gradient of loss_fn over the whole batch, one micro-batch of activations at a time.

    encode_image(chunk) / encode_text(chunk) -> (b, D) features exactly as loss_fn takes them (normalised, cast);
    a chunk is whatever the encoder takes (pixels, a tuple of ids and mask). Image and text chunks may differ in
    size; their rows concatenate to the same B. loss_fn(image (B, D), text (B, D)) -> scalar: parameters it uses
    itself (the logit scale and bias) get their gradients from its backward. Returns the loss, detached.

    Each micro-batch's random state is recorded and restored for its second forward, so dropout draws the same
    masks in both. BatchNorm in training mode still sees micro-batch statistics (and updates twice)."""
    image_states, image_cached = _embed_without_graph(encode_image, image_chunks)
    text_states, text_cached = _embed_without_graph(encode_text, text_chunks)
    image = torch.cat(image_cached).requires_grad_()
    text = torch.cat(text_cached).requires_grad_()
    loss = loss_fn(image, text)
    loss.backward()
    _backward_chunks(encode_image, image_chunks, image_states, image.grad.split([len(f) for f in image_cached]))
    _backward_chunks(encode_text, text_chunks, text_states, text.grad.split([len(f) for f in text_cached]))
    return loss.detach()


def _embed_without_graph(encode, chunks):
    states, features = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_random_state())
            features.append(encode(chunk))
    return states, features


def _backward_chunks(encode, chunks, states, gradients) -> None:
    for chunk, state, gradient in zip(chunks, states, gradients):
        _set_random_state(state)
        features = encode(chunk)
        if features.requires_grad:  # a locked tower has nothing to update
            torch.autograd.backward(features, gradient)


def _random_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_random_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
