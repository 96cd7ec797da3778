"""Every key map between vlfm and other checkpoint layouts, in one place (reading their files: foreign.py).

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
from safetensors.torch import save_file

from vlfm.checkpoint import CheckpointError, atomic_directory, raise_mismatch
from vlfm.config import ModelConfig, TextConfig, VisionConfig

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


def _act(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise CheckpointError(f"{where}: activation {name!r} is not supported (vlfm has {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def square(value, key: str) -> int:
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
        image_size=square(c["image_size"], f"{where}.image_size"), patch_size=square(c["patch_size"], f"{where}.patch_size"),
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
        image_size=square(v.get("image_size", 224), "vision_cfg.image_size"),
        patch_size=square(v.get("patch_size", 16), "vision_cfg.patch_size"), width=vision_width,
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
