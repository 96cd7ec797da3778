"""Every key map between vlfm and other checkpoint layouts, in one place.

In:  Hugging Face `CLIPModel`, `SiglipModel` and `BertModel` directories; open_clip ViT CLIP state dicts.
Out: Hugging Face `CLIPModel` / `SiglipModel` directories that transformers loads.

A key map is a list of rules `(vlfm key, their key, how)`; `how` says how the tensor changes on the way:
  same    identical shape
  row     ours (1, N, D)  <-> theirs (N, D)            position embeddings
  scalar  ours ()         <-> theirs (1,)              SigLIP's logit scale and bias
  t       ours (out, in)  <-> theirs (in, out)         open_clip's projections (x @ proj)
  qkv     ours q, k, v    <-> theirs one fused tensor   nn.MultiheadAttention's in_proj (split along dim 0)
Every key of theirs is either mapped or listed as deliberately dropped; anything else is an error.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlfm.checkpoint import CheckpointError, atomic_directory, load_state_strict, raise_mismatch
from vlfm.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.transforms import Preprocess

log = logging.getLogger("vlfm")

Rule = tuple[str | tuple[str, ...], str, str]

# --- transformer blocks, by layout: our sub-module -> theirs (each has .weight and .bias) --------------------
HF_CLIP_BLOCK = {
    "norm1": "layer_norm1", "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj", "attn.out_proj": "self_attn.out_proj", "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}  # fmt: skip
BERT_BLOCK = {
    "attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key", "attn.v_proj": "attention.self.value",
    "attn.out_proj": "attention.output.dense", "norm1": "attention.output.LayerNorm",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "norm2": "output.LayerNorm",
}  # fmt: skip
OPEN_CLIP_BLOCK = {"norm1": "ln_1", "attn.out_proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")

# Keys that exist in their checkpoints and are deliberately not used.
DROPPED = {
    "clip": [r"position_ids$"],
    "siglip": [r"position_ids$"],
    # BERT's pooler and MLM heads are not used; token type 0 is folded into the position embeddings.
    "bert": [r"position_ids$", r"token_type_ids$", r"^pooler\.", r"^cls\.", r"^embeddings\.token_type_embeddings\.weight$"],
    "open_clip": [r"^attn_mask$", r"\.attn_mask$"],
}

ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}  # fmt: skip
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _wb(ours: str, theirs: str) -> list[Rule]:
    return [(f"{ours}.weight", f"{theirs}.weight", "same"), (f"{ours}.bias", f"{theirs}.bias", "same")]


def _blocks(ours: str, theirs: str, layers: int, names: dict[str, str], fused: str | None = None) -> list[Rule]:
    rules: list[Rule] = []
    for i in range(layers):
        for our, their in names.items():
            rules += _wb(f"{ours}.{i}.{our}", f"{theirs}.{i}.{their}")
        if fused:
            for part in ("weight", "bias"):
                rules.append((tuple(f"{ours}.{i}.{q}.{part}" for q in QKV), f"{theirs}.{i}.{fused}_{part}", "qkv"))
    return rules


# --- key maps ------------------------------------------------------------------------------------------------
def hf_clip_map(config: ModelConfig) -> list[Rule]:
    v, t = "vision_model.", "text_model."
    return [
        ("visual.class_embed", v + "embeddings.class_embedding", "same"),
        ("visual.patch_embed.weight", v + "embeddings.patch_embedding.weight", "same"),
        ("visual.pos_embed", v + "embeddings.position_embedding.weight", "row"),
        *_wb("visual.norm_pre", v + "pre_layrnorm"),  # sic: transformers spells it so
        *_blocks("visual.transformer.blocks", v + "encoder.layers", config.vision.layers, HF_CLIP_BLOCK),
        *_wb("visual.norm", v + "post_layernorm"),
        ("visual.proj.weight", "visual_projection.weight", "same"),
        ("text.token_embed.weight", t + "embeddings.token_embedding.weight", "same"),
        ("text.pos_embed", t + "embeddings.position_embedding.weight", "row"),
        *_blocks("text.transformer.blocks", t + "encoder.layers", config.text.layers, HF_CLIP_BLOCK),
        *_wb("text.norm", t + "final_layer_norm"),
        ("text.proj.weight", "text_projection.weight", "same"),
        ("logit_scale", "logit_scale", "same"),
    ]


def hf_siglip_map(config: ModelConfig) -> list[Rule]:
    v, t = "vision_model.", "text_model."
    return [
        *_wb("visual.patch_embed", v + "embeddings.patch_embedding"),
        ("visual.pos_embed", v + "embeddings.position_embedding.weight", "row"),
        *_blocks("visual.transformer.blocks", v + "encoder.layers", config.vision.layers, HF_CLIP_BLOCK),
        *_wb("visual.norm", v + "post_layernorm"),
        ("visual.head.probe", v + "head.probe", "same"),
        (tuple(f"visual.head.{q}.weight" for q in QKV), v + "head.attention.in_proj_weight", "qkv"),
        (tuple(f"visual.head.{q}.bias" for q in QKV), v + "head.attention.in_proj_bias", "qkv"),
        *_wb("visual.head.attn.out_proj", v + "head.attention.out_proj"),
        *_wb("visual.head.norm", v + "head.layernorm"),
        *_wb("visual.head.mlp.fc1", v + "head.mlp.fc1"),
        *_wb("visual.head.mlp.fc2", v + "head.mlp.fc2"),
        ("text.token_embed.weight", t + "embeddings.token_embedding.weight", "same"),
        ("text.pos_embed", t + "embeddings.position_embedding.weight", "row"),
        *_blocks("text.transformer.blocks", t + "encoder.layers", config.text.layers, HF_CLIP_BLOCK),
        *_wb("text.norm", t + "final_layer_norm"),
        *_wb("text.proj", t + "head"),
        ("logit_scale", "logit_scale", "scalar"),
        ("logit_bias", "logit_bias", "scalar"),
    ]


def bert_map(config: TextConfig) -> list[Rule]:
    # token_type_embeddings[0] is added to every token (token types are all 0 for one sentence): it is folded
    # into the position embeddings when loading (see _fold_token_type).
    return [
        ("text.token_embed.weight", "embeddings.word_embeddings.weight", "same"),
        ("text.pos_embed", "embeddings.position_embeddings.weight", "row"),
        *_wb("text.norm_embed", "embeddings.LayerNorm"),
        *_blocks("text.transformer.blocks", "encoder.layer", config.layers, BERT_BLOCK),
    ]


def open_clip_map(config: ModelConfig) -> list[Rule]:
    rules = [
        ("visual.class_embed", "visual.class_embedding", "same"),
        ("visual.pos_embed", "visual.positional_embedding", "row"),
        ("visual.patch_embed.weight", "visual.conv1.weight", "same"),
        *_wb("visual.norm_pre", "visual.ln_pre"),
        *_blocks("visual.transformer.blocks", "visual.transformer.resblocks", config.vision.layers, OPEN_CLIP_BLOCK, "attn.in_proj"),
        *_wb("visual.norm", "visual.ln_post"),
        ("visual.proj.weight", "visual.proj", "t"),
        ("text.token_embed.weight", "token_embedding.weight", "same"),
        ("text.pos_embed", "positional_embedding", "row"),
        *_blocks("text.transformer.blocks", "transformer.resblocks", config.text.layers, OPEN_CLIP_BLOCK, "attn.in_proj"),
        *_wb("text.norm", "ln_final"),
        ("text.proj.weight", "text_projection", "t"),
        ("logit_scale", "logit_scale", "same"),
    ]
    return rules + ([("logit_bias", "logit_bias", "same")] if config.kind == "siglip" else [])


# --- applying a map ----------------------------------------------------------------------------------------
def to_vlfm(theirs: dict[str, torch.Tensor], rules: list[Rule], dropped: list[str], expected: dict, source: str) -> dict:
    """Their state dict -> ours, refusing missing, unexpected and mis-shaped keys (all listed, in their names)."""
    ours, used, missing, shapes = {}, set(), [], []
    for our, their, how in rules:
        if their not in theirs:
            missing.append(their)
            continue
        used.add(their)
        tensor = theirs[their]
        if how == "qkv":
            if tensor.shape[0] % 3:
                shapes.append(f"{their}: {tuple(tensor.shape)} is not three stacked q/k/v")
                continue
            parts = dict(zip(our, tensor.chunk(3)))
        else:
            parts = {our: _reshape(tensor, how, to_ours=True)}
        for key, value in parts.items():
            if key in expected and tuple(value.shape) != tuple(expected[key].shape):
                shapes.append(f"{their}: checkpoint {tuple(tensor.shape)} does not fit the config ({tuple(expected[key].shape)} as {key})")
            ours[key] = value.contiguous()
    unexpected = [k for k in theirs if k not in used and not any(re.search(p, k) for p in dropped)]
    raise_mismatch(f"{source} does not match its config", missing, unexpected, shapes)
    return ours


def _reshape(tensor: torch.Tensor, how: str, to_ours: bool) -> torch.Tensor:
    if how == "row":
        return tensor.unsqueeze(0) if to_ours else tensor.squeeze(0)
    if how == "scalar":
        return tensor.reshape(()) if to_ours else tensor.reshape(1)
    if how == "t":
        return tensor.T
    if how != "same":
        raise ValueError(f"unknown reshape {how!r}")
    return tensor


def from_vlfm(ours: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    out = {}
    for our, their, how in rules:
        if how == "qkv":
            out[their] = torch.cat([ours[k] for k in our])
        else:
            out[their] = _reshape(ours[our], how, to_ours=False)
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


# --- reading their files -------------------------------------------------------------------------------------
def detect(path: str | Path) -> str | None:
    """The layout of a directory: vlfm | clip | siglip | bert | open_clip, or None if it is none of them."""
    path = Path(path)
    if path.is_file() or (path / "open_clip_config.json").is_file():
        return "open_clip"
    if not (path / "config.json").is_file():
        return None
    meta = _read_json(path / "config.json")
    if "architecture" in meta and str(meta["architecture"]).startswith("vlfm."):
        return "vlfm"
    model_type = meta.get("model_type")
    if model_type in ("clip", "siglip", "bert"):
        return model_type
    found = model_type or ", ".join(meta.get("architectures", [])) or "unknown"
    raise CheckpointError(
        f"{path}/config.json describes {found!r}: vlfm loads vlfm checkpoints, Hugging Face CLIPModel (clip), "
        "SiglipModel (siglip) and BertModel (bert) directories, and open_clip checkpoints"
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


def _act(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise CheckpointError(f"{where}: activation {name!r} is not supported (vlfm has {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _square(value, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{key}={value}: vlfm supports square images and patches only")
        value = value[0]
    return int(value)


# --- configs: theirs -> ours ------------------------------------------------------------------------------------
CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
             "pad_token_id": 1, "eos_token_id": 49407}  # fmt: skip
CLIP_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}  # fmt: skip
SIGLIP_TEXT = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
               "layer_norm_eps": 1e-6, "pad_token_id": 1, "eos_token_id": 49407, "projection_size": None}  # fmt: skip
SIGLIP_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                 "vision_use_head": True}  # fmt: skip
BERT = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute"}  # fmt: skip


def _hf_vision(c: dict, where: str, **layout) -> VisionConfig:
    return VisionConfig(
        image_size=_square(c["image_size"], f"{where}.image_size"), patch_size=_square(c["patch_size"], f"{where}.patch_size"),
        width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
        mlp_ratio=c["intermediate_size"] / c["hidden_size"], act=_act(c["hidden_act"], where), norm_eps=c["layer_norm_eps"],
        **layout,
    )  # fmt: skip


def _hf_text(c: dict, where: str, **layout) -> TextConfig:
    return TextConfig(
        vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"], width=c["hidden_size"],
        layers=c["num_hidden_layers"], heads=c["num_attention_heads"], mlp_ratio=c["intermediate_size"] / c["hidden_size"],
        act=_act(c["hidden_act"], where), norm_eps=c["layer_norm_eps"], pad_token_id=c.get("pad_token_id") or 0, **layout,
    )  # fmt: skip


def hf_clip_config(meta: dict) -> ModelConfig:
    t = {**CLIP_TEXT, **meta.get("text_config", {})}
    v = {**CLIP_VISION, **meta.get("vision_config", {})}
    eos = t["eos_token_id"]
    # transformers keeps a legacy rule: eos_token_id 2 means "pool at the highest token id" (old CLIP configs).
    pool = {"pool": "argmax"} if eos == 2 else {"pool": "eos", "eos_token_id": int(eos)}
    vision = _hf_vision(v, "vision_config", patch_bias=False, class_token=True, pre_norm=True, pool="cls")
    text = _hf_text(t, "text_config", causal=True, **pool)
    return ModelConfig(kind="clip", embed_dim=meta.get("projection_dim", 512), vision=vision, text=text)


def hf_siglip_config(meta: dict) -> ModelConfig:
    t = {**SIGLIP_TEXT, **meta.get("text_config", {})}
    v = {**SIGLIP_VISION, **meta.get("vision_config", {})}
    if not v["vision_use_head"]:
        raise CheckpointError("vision_config.vision_use_head=false (no attention-pooling head) is not supported")
    if (t["projection_size"] or t["hidden_size"]) != v["hidden_size"]:
        raise CheckpointError("text_config.projection_size must equal vision_config.hidden_size (the shared embedding)")
    vision = _hf_vision(v, "vision_config", patch_bias=True, pool="map", proj=False)
    text = _hf_text(t, "text_config", causal=False, pool="end", eos_token_id=int(t["eos_token_id"]), proj_bias=True)
    return ModelConfig(kind="siglip", embed_dim=v["hidden_size"], vision=vision, text=text)


def bert_config(meta: dict) -> TextConfig:
    c = {**BERT, **meta}
    if c["position_embedding_type"] != "absolute":
        raise CheckpointError(f"position_embedding_type={c['position_embedding_type']!r}: only 'absolute' is supported")
    return _hf_text(c, "config.json", causal=False, pool="mean", norm="post", proj=False)


def open_clip_config(meta: dict) -> ModelConfig:
    """open_clip's model config (ViT-B-32.json, or model_cfg inside open_clip_config.json)."""
    meta = meta.get("model_cfg", meta)
    v, t = meta.get("vision_cfg", {}), meta.get("text_cfg", {})
    refused = {
        "vision_cfg.ls_init_value": v.get("ls_init_value"), "text_cfg.ls_init_value": t.get("ls_init_value"),
        "vision_cfg.attentional_pool": v.get("attentional_pool"), "vision_cfg.timm_model_name": v.get("timm_model_name"),
        "text_cfg.hf_model_name": t.get("hf_model_name"), "text_cfg.proj_bias": t.get("proj_bias"),
        "vision_cfg.final_ln_after_pool": v.get("final_ln_after_pool"), "text_cfg.embed_cls": t.get("embed_cls"),
        "vision_cfg.no_ln_pre": v.get("no_ln_pre"),
    }  # fmt: skip
    found = [f"{k}={val!r}" for k, val in refused.items() if val]
    if found or not isinstance(v.get("layers", 12), int):
        raise CheckpointError(f"open_clip settings vlfm cannot express: {', '.join(found) or 'vision_cfg.layers as a list (ResNet)'}")
    act = "quick_gelu" if meta.get("quick_gelu") else "gelu"
    vision_width = v.get("width", 768)
    pool = v.get("pool_type", "avg" if v.get("global_average_pool") else "tok")
    if pool not in ("tok", "avg"):
        raise CheckpointError(f"vision_cfg.pool_type={pool!r} is not supported (tok or avg)")
    vision = VisionConfig(
        image_size=_square(v.get("image_size", 224), "vision_cfg.image_size"),
        patch_size=_square(v.get("patch_size", 16), "vision_cfg.patch_size"), width=vision_width,
        layers=v.get("layers", 12), heads=vision_width // v.get("head_width", 64), mlp_ratio=v.get("mlp_ratio", 4.0),
        act=act, patch_bias=False, class_token=True, pre_norm=True, pool="cls" if pool == "tok" else "mean",
    )  # fmt: skip
    text_pool = {"argmax": "argmax", "last": "end", "first": "first"}.get(t.get("pool_type", "argmax"))
    if text_pool is None:
        raise CheckpointError(f"text_cfg.pool_type={t.get('pool_type')!r} is not supported (argmax, last or first)")
    text_width = t.get("width", 512)
    text = TextConfig(
        vocab_size=t.get("vocab_size", 49408), context_length=t.get("context_length", 77), width=text_width,
        layers=t.get("layers", 12), heads=t.get("heads", 8), mlp_ratio=t.get("mlp_ratio", 4.0), act=act,
        causal=not t.get("no_causal_mask", False), pool=text_pool, pad_token_id=t.get("pad_id", 0),
        eos_token_id=t.get("vocab_size", 49408) - 1,
    )  # fmt: skip
    kind = "siglip" if meta.get("init_logit_bias") is not None else "clip"
    return ModelConfig(kind=kind, embed_dim=meta.get("embed_dim", 512), vision=vision, text=text)


def hf_preprocess(directory: Path, kind: str, image_size: int) -> Preprocess:
    """preprocessor_config.json -> Preprocess; documented defaults (said in the log) when the file is missing."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        defaults = (Preprocess(image_size=image_size, mean=OPENAI_MEAN, std=OPENAI_STD) if kind == "clip"
                    else Preprocess(image_size=image_size, resize_mode="squash"))  # fmt: skip
        log.warning("%s has no preprocessor_config.json: using the %s defaults %s", directory, kind, defaults)
        return defaults
    c = _read_json(path)
    size, crop = c.get("size", image_size), c.get("crop_size", image_size)
    if c.get("do_center_crop", False):
        crop = _square([crop["height"], crop["width"]] if isinstance(crop, dict) else crop, f"{path}: crop_size")
        short = size.get("shortest_edge", crop) if isinstance(size, dict) else size
        if short != crop:
            log.warning("%s: resize to %s then crop %s; vlfm resizes the short side to the crop size", path, short, crop)
        size, mode = crop, "shortest"
    else:
        size = _square([size["height"], size["width"]] if isinstance(size, dict) else size, f"{path}: size")
        mode = "squash"
    normalize = c.get("do_normalize", True)
    return Preprocess(
        image_size=size, resize_mode=mode, interpolation=RESAMPLE.get(c.get("resample", 3), "bicubic"),
        mean=tuple(c.get("image_mean", OPENAI_MEAN)) if normalize else (0.0, 0.0, 0.0),
        std=tuple(c.get("image_std", OPENAI_STD)) if normalize else (1.0, 1.0, 1.0),
    )  # fmt: skip


# --- loading --------------------------------------------------------------------------------------------------
def load_foreign(path: str | Path, config_path: str | Path | None = None):
    """A Hugging Face or open_clip checkpoint as a vlfm model (TwoTowerModel, or TextEncoder for BERT)."""
    from vlfm.models.text import TextEncoder
    from vlfm.models.two_tower import TwoTowerModel

    path = Path(path)
    kind = detect(path)
    if kind == "open_clip":
        return _load_open_clip(path, config_path)
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


# --- export to Hugging Face --------------------------------------------------------------------------------------
def _refusals(config: ModelConfig, kind: str) -> list[str]:
    v, t = config.vision, config.text
    want = {
        "clip": {"vision.stem": "patch", "vision.patch_bias": False, "vision.class_token": True, "vision.pre_norm": True,
                 "vision.pool": "cls", "vision.proj": True, "text.causal": True, "text.norm": "pre", "text.proj": True,
                 "text.proj_bias": False},
        "siglip": {"vision.stem": "patch", "vision.patch_bias": True, "vision.class_token": False, "vision.pre_norm": False,
                   "vision.pool": "map", "vision.proj": False, "text.causal": False, "text.pool": "end", "text.norm": "pre",
                   "text.proj": True, "text.proj_bias": True},
    }[kind]  # fmt: skip
    values = {f"{tower}.{k}": getattr(c, k) for tower, c in (("vision", v), ("text", t)) for k in vars(c)}
    found = [f"model.{k}={values[k]!r} (needs {w!r})" for k, w in want.items() if values[k] != w]
    if kind == "clip" and t.pool not in ("eos", "argmax"):
        found.append(f"model.text.pool={t.pool!r} (needs 'eos' or 'argmax')")
    if kind == "clip" and t.pool == "eos" and t.eos_token_id == 2:
        found.append("model.text.eos_token_id=2 with pool 'eos' (transformers reads eos id 2 as 'pool at the highest id')")
    for tower in (v, t):
        if tower.act not in HF_ACTIVATIONS:
            found.append(f"act={tower.act!r}")
    return found


def export_hf(model, out: str | Path) -> Path:
    """Write `model` as a Hugging Face CLIPModel / SiglipModel directory (config, weights, tokenizer, preprocessor)."""
    from vlfm.models.two_tower import TwoTowerModel

    if not isinstance(model, TwoTowerModel):
        raise CheckpointError(f"only two-tower models export to Hugging Face, not {type(model).__name__}")
    config, kind = model.config, model.config.kind
    found = _refusals(config, kind)
    if found:
        raise CheckpointError(f"this {kind} model cannot be expressed as a transformers {kind} model: " + "; ".join(found))
    v, t = config.vision, config.text
    vision = {"hidden_size": v.width, "intermediate_size": model.visual.transformer.blocks[0].mlp.fc1.out_features,
              "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "num_channels": 3, "image_size": v.image_size,
              "patch_size": v.patch_size, "hidden_act": HF_ACTIVATIONS[v.act], "layer_norm_eps": v.norm_eps}  # fmt: skip
    text = {"vocab_size": t.vocab_size, "hidden_size": t.width, "num_hidden_layers": t.layers,
            "intermediate_size": model.text.transformer.blocks[0].mlp.fc1.out_features, "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length, "hidden_act": HF_ACTIVATIONS[t.act], "layer_norm_eps": t.norm_eps,
            "pad_token_id": t.pad_token_id, "eos_token_id": 2 if t.pool == "argmax" else t.eos_token_id}  # fmt: skip
    if kind == "clip":
        vision.update(model_type="clip_vision_model", projection_dim=config.embed_dim)
        text.update(model_type="clip_text_model", projection_dim=config.embed_dim)
        meta = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.embed_dim,
                "logit_scale_init_value": float(model.logit_scale.detach()), "text_config": text, "vision_config": vision}  # fmt: skip
        rules, processor = hf_clip_map(config), "CLIPImageProcessor"
    else:
        vision.update(model_type="siglip_vision_model", vision_use_head=True)
        text.update(model_type="siglip_text_model", projection_size=config.embed_dim)
        meta = {"architectures": ["SiglipModel"], "model_type": "siglip", "text_config": text, "vision_config": vision}
        rules, processor = hf_siglip_map(config), "SiglipImageProcessor"
    meta["torch_dtype"] = "float32"
    p = model.preprocess_config
    shortest = p.resize_mode == "shortest"
    preprocessor = {
        "image_processor_type": processor, "do_resize": True, "do_center_crop": shortest, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(p.mean), "image_std": list(p.std),
        "do_convert_rgb": True, "resample": {name: code for code, name in RESAMPLE.items()}[p.interpolation],
        "size": {"shortest_edge": p.image_size} if shortest else {"height": p.image_size, "width": p.image_size},
        "crop_size": {"height": p.image_size, "width": p.image_size},
    }  # fmt: skip
    state = from_vlfm(model.state_dict(), rules)
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
        if model.tokenizer is not None:
            tok = model.tokenizer
            tok.backend.save(str(tmp / "tokenizer.json"))
            (tmp / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": tok.pad_token, "eos_token": tok.eos_token,
                "model_max_length": t.context_length,
            }, indent=2))  # fmt: skip
        else:
            log.warning("the model has no tokenizer: %s gets no tokenizer files", out)
    return Path(out)
