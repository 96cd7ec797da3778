"""Reading other layouts from disk: detect a directory's layout, read weights (safetensors, shards, weights-only
torch files), translate preprocessor_config.json, and load Hugging Face / open_clip checkpoints as vlfm models
through the key maps and config translations in convert.py (language models and LLaVA: convert_lm.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlfm.checkpoint import CheckpointError, load_state_strict
from vlfm.config import ConfigError
from vlfm.convert import (
    DROPPED,
    OPENAI_MEAN,
    OPENAI_STD,
    RESAMPLE,
    bert_config,
    bert_map,
    hf_clip_config,
    hf_clip_map,
    hf_siglip_config,
    hf_siglip_map,
    open_clip_config,
    open_clip_map,
    square,
    to_vlfm,
)
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.transforms import Preprocess

log = logging.getLogger("vlfm")


def detect(path: str | Path) -> str | None:
    """The layout of a directory: vlfm | clip | siglip | bert | llava | causal_lm (Llama / Qwen2) | open_clip, or
    None if it is none of them."""
    path = Path(path)
    if path.is_file() or (path / "open_clip_config.json").is_file():
        return "open_clip"
    if not (path / "config.json").is_file():
        return None
    meta = _read_json(path / "config.json")
    if "architecture" in meta and str(meta["architecture"]).startswith("vlfm."):
        return "vlfm"
    model_type = meta.get("model_type")
    if model_type in ("clip", "siglip", "bert", "llava"):
        return model_type
    if model_type in ("llama", "qwen2"):
        return "causal_lm"
    found = model_type or ", ".join(meta.get("architectures", [])) or "unknown"
    raise CheckpointError(
        f"{path}/config.json describes {found!r}: vlfm loads vlfm checkpoints, Hugging Face CLIPModel (clip), "
        "SiglipModel (siglip), BertModel (bert), LlavaForConditionalGeneration (llava), LlamaForCausalLM (llama) "
        "and Qwen2ForCausalLM (qwen2) directories, and open_clip checkpoints"
    )


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, sharded model.safetensors.index.json, or pytorch_model.bin (weights_only)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(_read_json(index)["weight_map"].values())):
            if not (directory / name).is_file():
                raise CheckpointError(f"{index} names shard {name!r}, which is not in {directory}")
            state.update(load_file(str(directory / name)))
        return state
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return torch_weights(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory} has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def torch_weights(path: Path) -> dict[str, torch.Tensor]:
    """A .bin/.pt state dict through torch.load(weights_only=True): tensors only, never arbitrary pickles.
    Training checkpoints ({'state_dict': ...}) and DDP's 'module.' prefix are unwrapped."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the unpickler's own message says which type it refused
        raise CheckpointError(f"{path} cannot be read as a weights-only state dict: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None



def hf_preprocess(directory: Path, kind: str, image_size: int) -> Preprocess:
    """preprocessor_config.json -> Preprocess; documented defaults (said in the log) when the file is missing."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        defaults = (Preprocess(image_size=image_size, mean=OPENAI_MEAN, std=OPENAI_STD) if kind == "clip"
                    else Preprocess(image_size=image_size, resize_mode="squash"))  # fmt: skip
        log.warning("%s has no preprocessor_config.json: using the %s defaults %s", directory, kind, defaults)
        return defaults
    c = _read_json(path)
    if c.get("do_pad"):
        log.warning("%s: do_pad (pad to a square before resizing) is not supported: images are resized and cropped "
                    "unpadded, so non-square images differ from what the model was trained on", path)
    size, crop = c.get("size", image_size), c.get("crop_size", image_size)
    if c.get("do_center_crop", False):
        crop = square([crop["height"], crop["width"]] if isinstance(crop, dict) else crop, f"{path}: crop_size")
        short = size.get("shortest_edge", crop) if isinstance(size, dict) else size
        if short != crop:
            log.warning("%s: resize to %s then crop %s; vlfm resizes the short side to the crop size", path, short, crop)
        size, mode = crop, "shortest"
    else:
        size = square([size["height"], size["width"]] if isinstance(size, dict) else size, f"{path}: size")
        mode = "squash"
    normalize = c.get("do_normalize", True)
    return Preprocess(
        image_size=size, resize_mode=mode, interpolation=RESAMPLE.get(c.get("resample", 3), "bicubic"),
        mean=tuple(c.get("image_mean", OPENAI_MEAN)) if normalize else (0.0, 0.0, 0.0),
        std=tuple(c.get("image_std", OPENAI_STD)) if normalize else (1.0, 1.0, 1.0),
    )  # fmt: skip


def load_foreign(path: str | Path, config_path: str | Path | None = None):
    """A Hugging Face or open_clip checkpoint as a vlfm model: TwoTowerModel, TextEncoder (BERT),
    VisionLanguageModel (LLaVA) or LanguageModel (Llama / Qwen2)."""
    from vlfm import convert_lm  # it reads weights through this module
    from vlfm.models.text import TextEncoder
    from vlfm.models.two_tower import TwoTowerModel

    path = Path(path)
    kind = detect(path)
    if kind == "open_clip":
        return _load_open_clip(path, config_path)
    if kind == "llava":
        return convert_lm.load_hf_llava(path)
    if kind == "causal_lm":
        return convert_lm.load_hf_lm(path)
    if kind is None:
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face or vlfm model directory")
    meta = _read_json(path / "config.json")
    theirs = read_weights(path)
    tokenizer = Tokenizer.from_directory(path)
    try:
        if kind == "bert":
            config = bert_config(meta)
            model = TextEncoder(config, tokenizer)
            theirs = {k.removeprefix("bert."): v for k, v in theirs.items()}
            state = to_vlfm(theirs, bert_map(config), DROPPED["bert"], model.state_dict(), str(path))
            if "embeddings.token_type_embeddings.weight" in theirs:  # all-zero token types: a constant per token
                state["text.pos_embed"] = state["text.pos_embed"] + theirs["embeddings.token_type_embeddings.weight"][0]
        else:
            config = hf_clip_config(meta) if kind == "clip" else hf_siglip_config(meta)
            preprocess = hf_preprocess(path, kind, config.vision.image_size)
            model = TwoTowerModel(config, tokenizer, preprocess)
            rules = hf_clip_map(config) if kind == "clip" else hf_siglip_map(config)
            state = to_vlfm(theirs, rules, DROPPED[kind], model.state_dict(), str(path))
    except (ConfigError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}/config.json cannot be translated: {error}") from None
    load_state_strict(model, state, str(path))
    log.info("loaded %s checkpoint %s", kind, path)
    return model.eval()


def _load_open_clip(path: Path, config_path: str | Path | None):
    from vlfm.models.two_tower import TwoTowerModel

    directory = path if path.is_dir() else path.parent
    if path.is_dir():
        candidates = [directory / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")]
        candidates += sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        weights = next((p for p in candidates if p.is_file()), None)
        if weights is None:
            raise CheckpointError(f"{directory} has no open_clip weights (.safetensors, .bin or .pt)")
    else:
        weights = path
    config_path = Path(config_path) if config_path else directory / "open_clip_config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{weights} needs its open_clip model config (e.g. ViT-B-32.json): put open_clip_config.json beside it "
            "or pass config=PATH (vlfm convert ... --config PATH)"
        )
    meta = _read_json(config_path)
    try:
        config = open_clip_config(meta)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{config_path} cannot be translated: {error}") from None
    pre = meta.get("preprocess_cfg", {})
    preprocess = Preprocess(
        image_size=config.vision.image_size, mean=tuple(pre.get("mean", OPENAI_MEAN)), std=tuple(pre.get("std", OPENAI_STD)),
        interpolation=pre.get("interpolation", "bicubic"), resize_mode=pre.get("resize_mode", "shortest"),
    )  # fmt: skip
    model = TwoTowerModel(config, Tokenizer.from_directory(directory), preprocess)
    state = to_vlfm(torch_weights(weights), open_clip_map(config), DROPPED["open_clip"], model.state_dict(), str(weights))
    load_state_strict(model, state, str(weights))
    return model.eval()


