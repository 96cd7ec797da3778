import math

import numpy as np
import pytest
import torch

from vlfm.losses import clip_loss, siglip_loss


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
