import math

import pytest
import torch

from vlfm.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from vlfm.models.text import TextTransformer
from vlfm.models.two_tower import TwoTowerModel
from vlfm.models.vit import VisionTransformer


def vision(**kw):
    return VisionConfig(**{"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, **kw})


def text(**kw):
    return TextConfig(**{"vocab_size": 50, "context_length": 12, "width": 32, "layers": 2, "heads": 2, **kw})


@pytest.mark.parametrize("pool,class_token", [("mean", False), ("cls", True), ("map", False), ("mean", True)])
@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_vit_shapes(pool, class_token, stem):
    torch.manual_seed(0)
    vit = VisionTransformer(vision(pool=pool, class_token=class_token, stem=stem), output_dim=24).eval()
    pixels = torch.randn(3, 3, 32, 32)
    tokens = vit.forward_tokens(pixels)
    assert tokens.shape == (3, 16 + int(class_token), 32)  # 4x4 patch grid (+ class token)
    assert vit(pixels).shape == (3, 24)
    # each image is encoded independently of the rest of the batch (BatchNorm in eval mode included)
    assert torch.allclose(vit(pixels[:1]), vit(pixels)[:1], atol=1e-5)


def test_vit_pooling_reads_the_right_tokens():
    vit = VisionTransformer(vision(pool="cls", class_token=True)).eval()
    tokens = vit.forward_tokens(torch.randn(2, 3, 32, 32))
    assert torch.equal(vit.pool(tokens), tokens[:, 0])
    vit.config.pool = "mean"
    assert torch.allclose(vit.pool(tokens), tokens[:, 1:].mean(1))


def test_vision_config_errors():
    with pytest.raises(ConfigError, match="class_token"):
        VisionConfig(pool="cls", class_token=False)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        VisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ConfigError, match="vision.pool"):
        VisionConfig(pool="max")


@pytest.mark.parametrize("causal,pool", [(True, "eos"), (True, "last"), (False, "last"), (False, "mean"), (False, "first")])
def test_text_padding_does_not_change_features(causal, pool):
    torch.manual_seed(0)
    model = TextTransformer(text(causal=causal, pool=pool), output_dim=16).eval()
    ids = torch.tensor([[1, 7, 8, 9, 2]])
    padded = torch.tensor([[1, 7, 8, 9, 2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    alone = model(ids, torch.ones_like(ids))
    assert torch.allclose(model(padded, mask), alone, atol=1e-5)
    # without the mask the padding is attended to and (for bidirectional or last/mean) changes the result
    if not causal or pool in ("mean",):
        assert not torch.allclose(model(padded, torch.ones_like(padded)), alone, atol=1e-4)


def test_causal_text_ignores_later_tokens():
    torch.manual_seed(0)
    model = TextTransformer(text(causal=True)).eval()
    a = model.forward_tokens(torch.tensor([[1, 5, 6, 7, 8]]))
    b = model.forward_tokens(torch.tensor([[1, 5, 6, 9, 9]]))
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6) and not torch.allclose(a[:, 3:], b[:, 3:])


def test_eos_pooling_needs_eos():
    model = TextTransformer(text(pool="eos", eos_token_id=2)).eval()
    with pytest.raises(ValueError, match="end-of-text"):
        model(torch.tensor([[1, 5, 6]]))


def test_two_tower_features_and_logit_init():
    torch.manual_seed(0)
    clip = TwoTowerModel(ModelConfig(kind="clip", embed_dim=16, vision=vision(), text=text())).eval()
    pixels, ids = torch.randn(2, 3, 32, 32), torch.tensor([[1, 4, 2], [1, 5, 2]])
    raw = clip.encode_image(pixels)
    image, txt, scale, bias = clip(pixels, ids)
    assert torch.allclose(image, raw / raw.norm(dim=-1, keepdim=True), atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))  # encode_* is unnormalised
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5) and bias is None
    with torch.no_grad():
        clip.logit_scale.fill_(6.0)
    clip.clamp_logit_scale()
    assert clip.logit_scale.item() == pytest.approx(math.log(100), rel=1e-4)

    siglip = TwoTowerModel(ModelConfig(kind="siglip", embed_dim=16, vision=vision(pool="map"), text=text(causal=False, pool="last")))
    _, _, scale, bias = siglip(pixels, ids)
    assert scale.item() == pytest.approx(10.0, rel=1e-5) and bias.item() == -10.0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = TwoTowerModel(ModelConfig(embed_dim=16, vision=vision(), text=text()))
    pixels, ids = torch.randn(2, 3, 32, 32), torch.tensor([[1, 4, 2], [1, 5, 2]])

    def grads():
        model.zero_grad()
        image, txt, scale, _ = model(pixels, ids)
        (image @ txt.T * scale).logsumexp(1).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
