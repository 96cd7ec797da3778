"""Hugging Face LLaVA and causal LMs through vlfm.load: tiny random transformers models saved to disk, loaded by
vlfm, same logits (fp32); what VisionLanguageModel cannot express is refused, naming the config key."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from test_lm import randomize
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

import vlfm
from vlfm.io import CheckpointError
from vlfm.models.lm import LanguageModel
from vlfm.models.vlm import VisionLanguageModel

TOL = 1e-4
WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "what", "colour", "is", "the", "circle", "red", "blue", "?"]
VOCAB, BOS, EOS = 64, 1, 2
GRID = 4  # 32 px images, 8 px patches: 16 image tokens


def write_tokenizer(directory, chatml=False):
    """A word-level tokenizer with `<image>` (and chatml's markers) as special tokens; returns `<image>`'s id."""
    backend = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<image>"] + (["<|im_start|>", "<|im_end|>"] if chatml else []))
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "<eos>"}))
    return backend.token_to_id("<image>")


def text_config(kind, tied=False):
    cls = transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config
    return cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=BOS,
               eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=tied)  # fmt: skip


VARIANTS = {
    # LLaVA-1.5's shape: CLIP vision, Llama, CLS dropped
    "clip-llama": dict(vision=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                                            num_attention_heads=4, image_size=32, patch_size=8),
                       text="llama", tied=False, strategy="default"),
    # SigLIP vision (no class token: every token kept), Qwen2 with a tied head, chatml markers in the tokenizer
    "siglip-qwen2": dict(vision=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                                                num_attention_heads=4, image_size=32, patch_size=8),
                         text="qwen2", tied=True, strategy="full"),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(VARIANTS))
def llava(request, tmp_path_factory):
    """(transformers model, its save_pretrained directory with tokenizer and preprocessor files, variant name)."""
    v = VARIANTS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    image_token = write_tokenizer(directory, chatml=v["text"] == "qwen2")
    config = transformers.LlavaConfig(vision_config=v["vision"], text_config=text_config(v["text"], v["tied"]),
                                      image_token_index=image_token, vision_feature_select_strategy=v["strategy"],
                                      tie_word_embeddings=v["tied"])  # fmt: skip
    theirs = randomize(transformers.LlavaForConditionalGeneration(config))
    theirs.save_pretrained(directory)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return theirs, directory, request.param


def prompt(image_token, seed=0):
    """Two rows: bos, words, the image's 16 tokens, words (the ids transformers 5 expects: already expanded)."""
    g = torch.Generator().manual_seed(seed)
    rows = [[BOS, *torch.randint(4, len(WORDS), (n,), generator=g).tolist(), *[image_token] * GRID**2,
             *torch.randint(4, len(WORDS), (5 - n,), generator=g).tolist()] for n in (1, 3)]  # fmt: skip
    return torch.tensor(rows)


def pixels(seed=0):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def their_logits(model, ids, images, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=images, **kwargs).logits


def edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**meta, **changes}))
    return dst


def test_logits_match_transformers(llava):
    theirs, directory, name = llava
    model = vlfm.load(directory)
    assert isinstance(model, VisionLanguageModel) and model.tokenizer is not None
    assert model.image_tokens == GRID**2 and model.config.feature_layer == -2
    assert model.config.template == ("chatml" if name == "siglip-qwen2" else "vlfm")
    ids = prompt(model.config.image_token_id)
    with torch.no_grad():
        ours = model(ids, pixels())
    assert (ours - their_logits(theirs, ids, pixels())).abs().max() <= TOL


@pytest.mark.parametrize("layer", [-1, 1])
def test_other_feature_layers_match_transformers(llava, layer, tmp_path):
    theirs, directory, _ = llava
    model = vlfm.load(edit_config(directory, tmp_path / "copy", vision_feature_layer=layer))
    assert model.config.feature_layer == layer
    ids = prompt(model.config.image_token_id, seed=1)
    with torch.no_grad():
        ours = model(ids, pixels(1))
    assert (ours - their_logits(theirs, ids, pixels(1), vision_feature_layer=layer)).abs().max() <= TOL


def test_greedy_generation_matches_transformers(llava):
    theirs, directory, _ = llava
    model = vlfm.load(directory)
    ids = prompt(model.config.image_token_id, seed=2)
    ours = model.generate(ids, torch.ones_like(ids), pixels(2), max_new_tokens=6, stop_tokens=[])
    with torch.no_grad():
        want = theirs.generate(input_ids=ids, pixel_values=pixels(2), max_new_tokens=6, do_sample=False, eos_token_id=None,
                               min_new_tokens=6)[:, ids.shape[1]:]  # fmt: skip
    assert ours == want.tolist()


@pytest.mark.parametrize("layout", ["in-memory", "transformers-4"])
def test_other_weight_layouts_load_the_same_model(llava, layout, tmp_path):
    """A state dict taken from the model in memory (`model.vision_tower.`, `lm_head.`), and the files older
    transformers (and the Hub's llava-hf models) write: CLIP's own `vision_model.` level under `vision_tower.`."""
    theirs, directory, _ = llava
    copy = shutil.copytree(directory, tmp_path / "copy")
    if layout == "in-memory":
        state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
        if theirs.config.tie_word_embeddings:  # one tensor under two names: safetensors stores it once
            del state["lm_head.weight"]
    else:
        state = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v
                 for k, v in load_file(str(directory / "model.safetensors")).items()}  # fmt: skip
    save_file(state, str(copy / "model.safetensors"))
    ids = prompt(theirs.config.image_token_id)
    with torch.no_grad():
        assert torch.equal(vlfm.load(copy)(ids, pixels()), vlfm.load(directory)(ids, pixels()))


def test_preprocessing_matches_the_image_processor(llava):
    theirs, directory, _ = llava
    model = vlfm.load(directory)
    processor = transformers.CLIPImageProcessor.from_pretrained(directory)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(47, 61), (32, 32)]]
    ids = prompt(model.config.image_token_id)
    with torch.no_grad():
        ours = model(ids, model.preprocess(images))
    want = their_logits(theirs, ids, processor(images=images, return_tensors="pt")["pixel_values"])
    assert (ours - want).abs().max() <= TOL


@pytest.mark.parametrize(("changes", "key"), [
    (dict(vision_feature_layer=[-2, -1]), r"vision_feature_layer=\[-2, -1\]"),
    (dict(vision_feature_layer=0), "vision_feature_layer=0"),
    (dict(vision_feature_layer=-4), "vision_feature_layer=-4"),  # transformers: the embeddings, before block 1
    (dict(projector_hidden_act="relu"), "projector_hidden_act='relu'"),
    (dict(multimodal_projector_bias=False), "multimodal_projector_bias=False"),
    (dict(image_token_index=5), "image_token_index=5"),
    (dict(text_config={"model_type": "mistral"}), "text_config: model_type='mistral'"),
    (dict(vision_config={"model_type": "dinov2"}), "vision_config.model_type='dinov2'"),
])  # fmt: skip
def test_what_vlfm_cannot_express_is_refused_by_key(llava, changes, key, tmp_path):
    with pytest.raises(CheckpointError, match=key):
        vlfm.load(edit_config(llava[1], tmp_path / "copy", **changes))


def test_a_strategy_that_keeps_the_class_token_or_drops_a_patch_is_refused(llava, tmp_path):
    """CLIP's 'full' would feed its class token to the projector; SigLIP's 'default' would drop a patch token."""
    _, directory, name = llava
    wrong = "full" if name == "clip-llama" else "default"
    with pytest.raises(CheckpointError, match=f"vision_feature_select_strategy='{wrong}'"):
        vlfm.load(edit_config(directory, tmp_path / "copy", vision_feature_select_strategy=wrong))


def test_missing_and_unexpected_weights_are_listed(llava, tmp_path):
    _, directory, _ = llava
    copy = shutil.copytree(directory, tmp_path / "copy")
    state = load_file(str(directory / "model.safetensors"))
    state["vision_tower.extra.weight"] = state.pop("vision_tower.post_layernorm.weight")
    save_file(state, str(copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: vision_tower\.post_layernorm\.weight.*unexpected: vision_tower\.extra\.weight"):
        vlfm.load(copy)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    theirs = randomize(transformers.LlamaForCausalLM(text_config("llama")))
    theirs.save_pretrained(directory)
    write_tokenizer(directory)
    return theirs, directory


def test_llama_directory_loads_as_a_language_model_with_its_tokenizer(llama_dir):
    theirs, directory = llama_dir
    model = vlfm.load(directory)
    assert isinstance(model, LanguageModel)
    ids = torch.tensor([[BOS] + model.tokenizer.encode("what colour is the circle ?")])
    assert ids.shape[1] == 7
    with torch.no_grad():
        assert (model(ids) - theirs(input_ids=ids).logits).abs().max() <= TOL


def test_language_model_save_load_round_trip(llama_dir, tmp_path):
    model = vlfm.load(llama_dir[1])
    again = vlfm.load(model.save(tmp_path / "lm"))
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["architecture"] == "vlfm.LanguageModel"
    assert isinstance(again, LanguageModel) and again.config == model.config
    assert again.tokenizer.encode("the red circle") == model.tokenizer.encode("the red circle") == [7, 9, 8]
    ids = torch.tensor([[BOS, 4, 5, 6, 7, 8, 11]])
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
