import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlfm.config import ModelConfig, TextConfig, VisionConfig
from vlfm.losses import clip_loss, siglip_loss
from vlfm.models.two_tower import TwoTowerModel
from vlfm.train.gradcache import gradcache_step

KEYS = torch.tensor([0, 1, 0, 2, 3, 1, 4, 5])  # repeated captions: positives across micro-batches


def tiny_model(kind):
    vision = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, pool="map" if kind == "siglip" else "mean")
    text = TextConfig(vocab_size=50, context_length=12, width=32, layers=2, heads=2, causal=kind == "clip",
                      pool="eos" if kind == "clip" else "last")
    torch.manual_seed(0)
    return TwoTowerModel(ModelConfig(kind=kind, embed_dim=16, vision=vision, text=text))


def batch(size=8):
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(size, 3, 32, 32, generator=generator)
    ids = torch.randint(3, 50, (size, 6), generator=generator)
    ids[:, 0], ids[:, -1] = 1, 2  # start, end-of-text
    mask = torch.ones_like(ids)
    mask[::2, 4:] = 0  # some captions are shorter: padding must stay masked in every micro-batch
    ids[::2, 3] = 2
    return pixels, ids, mask


def contrastive_loss(model):
    if model.logit_bias is None:
        return lambda image, text: clip_loss(image, text, model.logit_scale.exp(), keys=KEYS)
    return lambda image, text: siglip_loss(image, text, model.logit_scale.exp(), model.logit_bias, keys=KEYS)


def gradients(model):
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradcache_equals_one_big_batch(kind):
    model = tiny_model(kind)
    pixels, ids, mask = batch()
    loss_fn = contrastive_loss(model)

    def encode_image(chunk):
        return F.normalize(model.encode_image(chunk), dim=-1)

    def encode_text(chunk):
        return F.normalize(model.encode_text(*chunk), dim=-1)

    expected_loss = loss_fn(encode_image(pixels), encode_text((ids, mask)))
    expected_loss.backward()
    expected = gradients(model)

    # image and text micro-batches of different sizes (3+3+2 and 5+3) concatenate to the same rows
    text_chunks = list(zip(ids.split(5), mask.split(5)))
    loss = gradcache_step(encode_image, encode_text, pixels.split(3), text_chunks, loss_fn)
    got = gradients(model)

    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6) and not loss.requires_grad
    assert got.keys() == expected.keys()
    assert len(got) == len([p for p in model.parameters() if p.requires_grad])
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name
    assert expected["logit_scale"] != 0


def test_gradcache_replays_dropout_masks():
    """With dropout the second forward must draw the masks of the first, or the cached gradients would belong to
    other features. Reference: the same micro-batches embedded once, with a graph, from the same seed."""
    torch.manual_seed(0)
    image_tower = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5))
    text_tower = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5))
    scale = nn.Parameter(torch.tensor(2.0))
    towers = [*image_tower.parameters(), *text_tower.parameters(), scale]
    images, texts = torch.randn(8, 6), torch.randn(8, 5)

    def loss_fn(image, text):
        return clip_loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale.exp(), keys=KEYS)

    torch.manual_seed(7)
    image = torch.cat([image_tower(chunk) for chunk in images.split(3)])
    text = torch.cat([text_tower(chunk) for chunk in texts.split(3)])
    loss_fn(image, text).backward()
    expected = [p.grad.clone() for p in towers]
    for p in towers:
        p.grad = None

    torch.manual_seed(7)
    gradcache_step(image_tower, text_tower, images.split(3), texts.split(3), loss_fn)
    for got, want in zip([p.grad for p in towers], expected):
        assert torch.allclose(got, want, atol=1e-6)
    # the masks really are random: another seed gives other gradients
    for p in towers:
        p.grad = None
    torch.manual_seed(8)
    gradcache_step(image_tower, text_tower, images.split(3), texts.split(3), loss_fn)
    assert not torch.allclose(image_tower[0].weight.grad, expected[0], atol=1e-6)
