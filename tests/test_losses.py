import math

import numpy as np
import pytest
import torch

from vlfm.losses import (
    ClipLoss,
    SigLipLoss,
    clip_loss,
    clip_loss_chunked,
    make_loss,
    siglip_loss,
    siglip_loss_chunked,
)


def features(seed, b=5, d=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def reference_clip(image, text, scale, positives):
    """Written out with numpy and explicit loops: the average of the row-wise and column-wise CE."""
    logits = scale * image.numpy() @ text.numpy().T
    pos = positives.numpy().astype(float)
    total = 0.0
    for mat, p in ((logits, pos), (logits.T, pos.T)):
        for i in range(len(mat)):
            target = p[i] / p[i].sum()
            log_softmax = mat[i] - math.log(np.exp(mat[i]).sum())
            total -= (target * log_softmax).sum()
    return total / (2 * len(logits))


def test_clip_loss_matches_reference():
    image, text = features(0), features(1)
    eye = torch.eye(5, dtype=torch.bool)
    got = clip_loss(image, text, torch.tensor(10.0, dtype=torch.float64))
    assert got.item() == pytest.approx(reference_clip(image, text, 10.0, eye), rel=1e-9)


def test_clip_loss_multi_positive_matches_reference():
    image, text = features(2), features(3)
    groups = torch.tensor([0, 1, 0, 2, 1])
    positives = groups[:, None] == groups[None, :]
    got = clip_loss(image, text, torch.tensor(7.0, dtype=torch.float64), positives)
    assert got.item() == pytest.approx(reference_clip(image, text, 7.0, positives), rel=1e-9)
    # with only diagonal positives it is the plain loss, which differs here
    assert got.item() != pytest.approx(clip_loss(image, text, torch.tensor(7.0, dtype=torch.float64)).item())


def test_clip_loss_perfect_alignment_is_small():
    x = torch.eye(4, dtype=torch.float64)
    assert clip_loss(x, x, torch.tensor(100.0, dtype=torch.float64)).item() == pytest.approx(math.log1p(3 * math.exp(-100)))


def test_siglip_loss_matches_reference():
    image, text = features(4), features(5)
    t, b = 9.5, -3.0
    got = siglip_loss(image, text, torch.tensor(t, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            logit = t * float(image[i] @ text[j]) + b
            total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
    assert got.item() == pytest.approx(total / 5, rel=1e-9)


def test_siglip_loss_gradient_flows_to_scale_and_bias():
    image, text = features(6).requires_grad_(), features(7)
    t = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    siglip_loss(image, text, t, b).backward()
    # with b = -10 every pair looks negative, so the positive (diagonal) terms push b up: dL/db < 0
    assert b.grad.item() < 0 and t.grad is not None and image.grad.abs().sum() > 0


# --- keys, chunked -------------------------------------------------------------------------------------------
KEYS = torch.tensor([0, 1, 0, 2, 3, 1, 0, 4, 5, 5, 6])  # 11 rows: chunks of 4 leave a ragged last block


def loss_and_grads(loss_fn, image, text, dtype=torch.float64):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (image, text, torch.tensor(6.0), torch.tensor(-4.0))]
    loss = loss_fn(*leaves)
    loss.backward()
    return [loss.detach()] + [torch.zeros((), dtype=dtype) if x.grad is None else x.grad for x in leaves]


def test_keys_are_the_positives_mask():
    image, text = features(8, b=11), features(9, b=11)
    positives = KEYS[:, None] == KEYS[None, :]
    scale, bias = torch.tensor(6.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    assert clip_loss(image, text, scale, keys=KEYS) == clip_loss(image, text, scale, positives)
    assert siglip_loss(image, text, scale, bias, keys=KEYS) == siglip_loss(image, text, scale, bias, positives)
    with pytest.raises(ValueError, match="positives or keys"):
        clip_loss(image, text, scale, positives, keys=KEYS)


CHUNKED = [
    (lambda i, t, s, b, k: clip_loss(i, t, s, keys=k), lambda i, t, s, b, k: clip_loss_chunked(i, t, s, k, chunk_size=4)),
    (lambda i, t, s, b, k: siglip_loss(i, t, s, b, keys=k),
     lambda i, t, s, b, k: siglip_loss_chunked(i, t, s, b, k, chunk_size=4)),
]


@pytest.mark.parametrize("keys", [None, KEYS], ids=["diagonal", "keys"])
@pytest.mark.parametrize("full,chunked", CHUNKED, ids=["clip", "siglip"])
def test_chunked_equals_full(full, chunked, keys):
    image, text = features(10, b=11), features(11, b=11)
    expected = loss_and_grads(lambda i, t, s, b: full(i, t, s, b, keys), image, text)
    got = loss_and_grads(lambda i, t, s, b: chunked(i, t, s, b, keys), image, text)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert expected[1].abs().sum() > 0 and expected[3] != 0
    # float32 agrees closely too (the log-sum-exp of blocks is not an approximation)
    got32 = loss_and_grads(lambda i, t, s, b: chunked(i, t, s, b, keys), image, text, torch.float32)
    for a, b in zip(got32, expected):
        assert torch.allclose(a.double(), b, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("full,chunked", CHUNKED, ids=["clip", "siglip"])
def test_chunked_backward_keeps_no_full_similarity_matrix(full, chunked):
    """The full loss saves B x B tensors for the backward; the chunked one saves only its inputs (B x D) and the
    per-block row log-sum-exps (B/chunk x B): the blocks themselves are recomputed."""
    image, text = features(12, b=64).requires_grad_(), features(13, b=64)
    scale, bias = torch.tensor(6.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)

    def largest_saved(loss_fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            loss_fn(image, text, scale, bias, None).backward()
        return max(sizes)

    assert largest_saved(full) == 64 * 64
    assert largest_saved(chunked) <= max(64 * 8, 64 // 4 * 64)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_make_loss_picks_the_computation(kind):
    """make_loss builds the run's loss once from its settings; a call is the functional form it chose."""
    image, text = features(14, b=11), features(15, b=11)
    scale, bias = torch.tensor(6.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    if kind == "clip":
        loss_class, full, chunked, bias_arg, wrong_bias = ClipLoss, clip_loss, clip_loss_chunked, (), (bias,)
    else:
        loss_class, full, chunked, bias_arg, wrong_bias = SigLipLoss, siglip_loss, siglip_loss_chunked, (bias,), ()
    loss = make_loss(kind, chunk_size=4)  # train.loss_chunk=4 in one process
    assert loss == loss_class(chunk_size=4) and not loss.across_ranks
    assert loss(image, text, scale, *bias_arg, keys=KEYS) == chunked(image, text, scale, *bias_arg, KEYS, chunk_size=4)
    assert make_loss(kind)(image, text, scale, *bias_arg, keys=KEYS) == full(image, text, scale, *bias_arg, keys=KEYS)
    # train.multi_positive=false: only the diagonal, whatever keys come
    diagonal = full(image, text, scale, *bias_arg)
    assert make_loss(kind, multi_positive=False)(image, text, scale, *bias_arg, keys=KEYS) == diagonal
    assert make_loss(kind, world_size=2).across_ranks and not make_loss(kind, world_size=1).across_ranks
    with pytest.raises(ValueError, match="logit_bias"):
        make_loss(kind)(image, text, scale, *wrong_bias)  # CLIP takes no bias, SigLIP needs one


def test_make_loss_clip_local_loss_and_kinds():
    assert make_loss("clip", local_loss=True, world_size=4) == ClipLoss(local_loss=True, across_ranks=True)
    with pytest.raises(ValueError, match="no contrastive loss for model kind 'lm'"):
        make_loss("lm")
