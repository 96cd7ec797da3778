"""Checkpoints by hub name, offline: a Hugging Face cache tree built here (models--ORG--NAME/snapshots/REV, refs/main)
from tiny transformers / open_clip checkpoints, HF_HUB_OFFLINE=1, huggingface_hub's real resolution; the model
loaded by name equals the one loaded from the directory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import constants
from safetensors.torch import save_file
from test_convert import hf_clip, hf_siglip, hf_to_open_clip, randomize
from test_llava import VARIANTS, text_config, write_tokenizer

import vlfm
from conftest import write_clip_files
from vlfm.interop import hub
from vlfm.interop.open_clip import open_clip_config
from vlfm.io import CheckpointError

REV_A, REV_B = "a" * 40, "b" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub reads (HF_HOME and its constants), offline."""
    root = tmp_path / "hf_home" / "hub"
    root.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(root.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))  # read at import: what HF_HOME gives a new process
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def publish(cache: Path, repo: str, directory: Path, revision: str = REV_A, ref: str | None = "main") -> None:
    """Put a checkpoint directory into the cache as huggingface_hub lays out a downloaded snapshot."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(directory, storage / "snapshots" / revision)
    if ref:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(revision)


def assert_same_model(a, b):
    assert type(a) is type(b) and a.config == b.config
    mine, theirs = a.state_dict(), b.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    if a.tokenizer is not None:
        assert a.tokenizer.encode("what colour is the circle ?") == b.tokenizer.encode("what colour is the circle ?")


def clip_dir(tmp_path):
    _, path = hf_clip(tmp_path, dict(image=32, patch=8, act="quick_gelu", proj=16, eos=99, inter=37))
    write_clip_files(path)
    return path


def siglip_dir(tmp_path):
    return hf_siglip(tmp_path, dict(image=16, patch=4, act="gelu", inter=64))[1]


def bert_dir(tmp_path):
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=24)  # fmt: skip
    randomize(transformers.BertModel(config)).save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "red"]))
    return tmp_path / "bert"


def llama_dir(tmp_path, kind="llama"):
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
    randomize(cls(text_config(kind))).save_pretrained(tmp_path / kind)
    write_tokenizer(tmp_path / kind)
    return tmp_path / kind


def llava_dir(tmp_path):
    v, directory = VARIANTS["clip-llama"], tmp_path / "llava"
    directory.mkdir()
    image_token = write_tokenizer(directory)
    config = transformers.LlavaConfig(vision_config=v["vision"], text_config=text_config("llama"), image_token_index=image_token)
    randomize(transformers.LlavaForConditionalGeneration(config)).save_pretrained(directory)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def open_clip_dir(tmp_path):
    """open_clip weights and config as open_clip's hub repositories hold them (open_clip_model.safetensors +
    open_clip_config.json), with CLIP's tokenizer files."""
    reference, _ = hf_clip(tmp_path, dict(image=32, patch=8, act="quick_gelu", proj=16, eos=99, inter=128, eps=1e-5), "ref")
    directory = tmp_path / "oc"
    directory.mkdir()
    save_file(hf_to_open_clip({k: t.detach() for k, t in reference.state_dict().items()}), str(directory / "open_clip_model.safetensors"))
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP | {"quick_gelu": True}}))
    return directory


TINY_OPEN_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
                  "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 4, "layers": 2}}  # fmt: skip
LAYOUTS = {"clip": clip_dir, "siglip": siglip_dir, "bert": bert_dir, "llama": llama_dir,
           "qwen2": lambda tmp: llama_dir(tmp, "qwen2"), "llava": llava_dir, "open_clip": open_clip_dir}  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads_by_name_as_from_its_directory(layout, cache, tmp_path):
    directory = LAYOUTS[layout](tmp_path)
    publish(cache, f"someone/tiny-{layout}", directory)
    local = vlfm.load(directory)
    for name in (f"someone/tiny-{layout}", f"hf-hub:someone/tiny-{layout}", f"someone/tiny-{layout}@main"):
        assert_same_model(vlfm.load(name), local)
    if layout in ("clip", "siglip", "open_clip"):  # and the same outputs
        pixels = torch.randn(2, 3, 32, 32)[..., : local.config.vision.image_size, : local.config.vision.image_size]
        with torch.no_grad():
            assert torch.equal(vlfm.load(f"someone/tiny-{layout}").encode_image(pixels), local.encode_image(pixels))


def test_open_clip_model_tag_names_use_open_clip_config_and_repository(cache, tmp_path, monkeypatch):
    """`MODEL/TAG` -> the repository open_clip publishes the tag in, built with open_clip's config for MODEL
    (here a tiny model added to the table; the repository holds weights only)."""
    directory = open_clip_dir(tmp_path)
    (directory / "open_clip_config.json").unlink()
    publish(cache, "timm/vit_tiny_clip.openai", directory)
    write_clip_files(tmp_path / "oc")  # the tokenizer comes from OpenAI's CLIP repository
    publish(cache, hub.CLIP_TOKENIZER, clip_dir(tmp_path))
    monkeypatch.setitem(hub.OPEN_CLIP_MODELS, "ViT-tiny", TINY_OPEN_CLIP)
    monkeypatch.setitem(hub.OPEN_CLIP_PRETRAINED, ("ViT-tiny", "openai"), ("timm/vit_tiny_clip.openai", hub.OPENAI))
    model = vlfm.load("ViT-tiny/openai")
    assert model.config.vision.act == "quick_gelu" and model.tokenizer is not None
    weights = directory / "open_clip_model.safetensors"
    assert_same_model(model, vlfm.load(weights, config={"model_cfg": TINY_OPEN_CLIP | {"quick_gelu": True}}))
    assert model.tokenizer.encode("a photo of the cat") == vlfm.load(clip_dir(tmp_path / "x")).tokenizer.encode("a photo of the cat")


@pytest.mark.parametrize("name, vision, act", [  # (width, layers, heads, patch) of open_clip's model configs
    ("ViT-B-32/openai", (768, 12, 12, 32), "quick_gelu"), ("ViT-B-32/laion2b_s34b_b79k", (768, 12, 12, 32), "gelu"),
    ("ViT-L-14/laion2b_s32b_b82k", (1024, 24, 16, 14), "gelu"), ("ViT-H-14/laion2b_s32b_b79k", (1280, 32, 16, 14), "gelu"),
])  # fmt: skip
def test_open_clip_names_translate_to_their_model_dimensions(name, vision, act):
    repo, revision, meta = hub.parse(name + "@v1")
    assert hub.open_clip_meta_for_name(name) == meta
    config = open_clip_config(meta)
    assert repo.startswith(("laion/", "timm/")) and revision == "v1"
    v = config.vision
    assert (v.width, v.layers, v.heads, v.patch_size) == vision and v.act == act == config.text.act
    assert config.text.context_length == 77 and config.text.vocab_size == 49408


def test_only_open_clip_tag_names_carry_open_clip_meta(tmp_path, monkeypatch):
    assert hub.open_clip_meta_for_name("ViT-B-32/openai")["model_cfg"]["quick_gelu"] is True
    assert hub.open_clip_meta_for_name("someone/tiny") is None
    (tmp_path / "ViT-B-32" / "openai").mkdir(parents=True)  # a local folder of that name is a path, not a name
    monkeypatch.chdir(tmp_path)
    assert hub.open_clip_meta_for_name("ViT-B-32/openai") is None


def test_a_revision_picks_its_snapshot(cache, tmp_path):
    first, second = llama_dir(tmp_path / "a"), llama_dir(tmp_path / "b")
    with torch.no_grad():
        model = vlfm.load(second)
        model.embed_tokens.weight.add_(1.0)
        model.save(tmp_path / "changed")
    publish(cache, "someone/lm", first, REV_A)
    publish(cache, "someone/lm", tmp_path / "changed", REV_B, ref="v2")
    assert_same_model(vlfm.load("someone/lm"), vlfm.load(first))
    for name in (f"someone/lm@{REV_B}", "someone/lm@v2"):
        assert_same_model(vlfm.load(name), vlfm.load(tmp_path / "changed"))


def test_a_local_directory_wins_over_a_name(cache, tmp_path, monkeypatch):
    publish(cache, "someone/tiny", llama_dir(tmp_path / "cached"))
    local = llama_dir(tmp_path / "work")
    with torch.no_grad():
        model = vlfm.load(local)
        model.norm.weight.mul_(2.0)
        model.save(tmp_path / "work" / "someone" / "tiny")
    monkeypatch.chdir(tmp_path / "work")
    assert torch.equal(vlfm.load("someone/tiny").norm.weight, model.norm.weight)


def test_offline_and_not_cached_is_one_line_naming_the_id_the_cache_and_the_fix(cache):
    with pytest.raises(CheckpointError) as error:
        vlfm.load("nobody/nothing@v3")
    message = str(error.value)
    assert "\n" not in message and "nobody/nothing@v3" in message and str(cache) in message
    assert "unset HF_HUB_OFFLINE" in message
    with pytest.raises(CheckpointError, match="open_clip MODEL/TAG"):
        hub.parse("hf-hub:not a name")


def test_cli_resolves_names_through_hf_home(cache, tmp_path):
    """A new process: HF_HOME alone says where the cache is; a miss is one line, exit 2."""
    publish(cache, "someone/tiny-clip", clip_dir(tmp_path))
    env = {**os.environ, "HF_HOME": str(cache.parent), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(vlfm.__file__).parents[1])}
    env.pop("HF_HUB_CACHE", None)
    run = lambda *args: subprocess.run([sys.executable, "-m", "vlfm.cli", "info", *args], env=env, capture_output=True, text=True, cwd=tmp_path)  # noqa: E731
    found = run("someone/tiny-clip")
    assert found.returncode == 0, found.stderr
    assert f"snapshots/{REV_A}" in found.stdout and "kind: clip" in found.stdout
    missing = run("someone/absent")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "someone/absent" in missing.stderr and str(cache) in missing.stderr
