"""Hugging Face CLIPModel, SiglipModel and BertModel directories: key maps, config translation (theirs -> ours)
and export (ours -> a directory transformers loads)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.torch import save_file

from vlfm.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from vlfm.data.tokenizer import Tokenizer
from vlfm.interop.rules import (
    HF_ACTIVATIONS,
    QKV,
    RESAMPLE,
    Rule,
    activation,
    block_rules,
    from_vlfm,
    hf_preprocess,
    read_weights,
    square,
    to_vlfm,
    weight_bias,
)
from vlfm.io import CheckpointError, atomic_directory, load_state_strict, read_json
from vlfm.models.text import TextEncoder
from vlfm.models.two_tower import TwoTowerModel

log = logging.getLogger("vlfm")

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


# Keys that exist in their checkpoints and are deliberately not used.
DROPPED = {
    "clip": [r"position_ids$"],
    "siglip": [r"position_ids$"],
    # BERT's pooler and MLM heads are not used; token type 0 is folded into the position embeddings.
    "bert": [r"position_ids$", r"token_type_ids$", r"^pooler\.", r"^cls\.", r"^embeddings\.token_type_embeddings\.weight$"],
}


def hf_clip_map(config: ModelConfig) -> list[Rule]:
    v, t = "vision_model.", "text_model."
    return [
        ("visual.class_embed", v + "embeddings.class_embedding", "same"),
        ("visual.patch_embed.weight", v + "embeddings.patch_embedding.weight", "same"),
        ("visual.pos_embed", v + "embeddings.position_embedding.weight", "row"),
        *weight_bias("visual.norm_pre", v + "pre_layrnorm"),  # sic: transformers spells it so
        *block_rules("visual.transformer.blocks", v + "encoder.layers", config.vision.layers, HF_CLIP_BLOCK),
        *weight_bias("visual.norm", v + "post_layernorm"),
        ("visual.proj.weight", "visual_projection.weight", "same"),
        ("text.token_embed.weight", t + "embeddings.token_embedding.weight", "same"),
        ("text.pos_embed", t + "embeddings.position_embedding.weight", "row"),
        *block_rules("text.transformer.blocks", t + "encoder.layers", config.text.layers, HF_CLIP_BLOCK),
        *weight_bias("text.norm", t + "final_layer_norm"),
        ("text.proj.weight", "text_projection.weight", "same"),
        ("logit_scale", "logit_scale", "same"),
    ]


def hf_siglip_map(config: ModelConfig) -> list[Rule]:
    v, t = "vision_model.", "text_model."
    return [
        *weight_bias("visual.patch_embed", v + "embeddings.patch_embedding"),
        ("visual.pos_embed", v + "embeddings.position_embedding.weight", "row"),
        *block_rules("visual.transformer.blocks", v + "encoder.layers", config.vision.layers, HF_CLIP_BLOCK),
        *weight_bias("visual.norm", v + "post_layernorm"),
        ("visual.head.probe", v + "head.probe", "same"),
        (tuple(f"visual.head.{q}.weight" for q in QKV), v + "head.attention.in_proj_weight", "qkv"),
        (tuple(f"visual.head.{q}.bias" for q in QKV), v + "head.attention.in_proj_bias", "qkv"),
        *weight_bias("visual.head.attn.out_proj", v + "head.attention.out_proj"),
        *weight_bias("visual.head.norm", v + "head.layernorm"),
        *weight_bias("visual.head.mlp.fc1", v + "head.mlp.fc1"),
        *weight_bias("visual.head.mlp.fc2", v + "head.mlp.fc2"),
        ("text.token_embed.weight", t + "embeddings.token_embedding.weight", "same"),
        ("text.pos_embed", t + "embeddings.position_embedding.weight", "row"),
        *block_rules("text.transformer.blocks", t + "encoder.layers", config.text.layers, HF_CLIP_BLOCK),
        *weight_bias("text.norm", t + "final_layer_norm"),
        *weight_bias("text.proj", t + "head"),
        ("logit_scale", "logit_scale", "scalar"),
        ("logit_bias", "logit_bias", "scalar"),
    ]


def bert_map(config: TextConfig) -> list[Rule]:
    # token_type_embeddings[0] is added to every token (token types are all 0 for one sentence): it is folded
    # into the position embeddings when loading (see _fold_token_type).
    return [
        ("text.token_embed.weight", "embeddings.word_embeddings.weight", "same"),
        ("text.pos_embed", "embeddings.position_embeddings.weight", "row"),
        *weight_bias("text.norm_embed", "embeddings.LayerNorm"),
        *block_rules("text.transformer.blocks", "encoder.layer", config.layers, BERT_BLOCK),
    ]


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


def hf_vision_config(c: dict, where: str, **layout) -> VisionConfig:
    return VisionConfig(
        image_size=square(c["image_size"], f"{where}.image_size"), patch_size=square(c["patch_size"], f"{where}.patch_size"),
        width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
        mlp_ratio=c["intermediate_size"] / c["hidden_size"], act=activation(c["hidden_act"], where), norm_eps=c["layer_norm_eps"],
        **layout,
    )  # fmt: skip


def hf_text_config(c: dict, where: str, **layout) -> TextConfig:
    return TextConfig(
        vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"], width=c["hidden_size"],
        layers=c["num_hidden_layers"], heads=c["num_attention_heads"], mlp_ratio=c["intermediate_size"] / c["hidden_size"],
        act=activation(c["hidden_act"], where), norm_eps=c["layer_norm_eps"], pad_token_id=c.get("pad_token_id") or 0, **layout,
    )  # fmt: skip


def hf_clip_config(meta: dict) -> ModelConfig:
    t = {**CLIP_TEXT, **meta.get("text_config", {})}
    v = {**CLIP_VISION, **meta.get("vision_config", {})}
    eos = t["eos_token_id"]
    # transformers keeps a legacy rule: eos_token_id 2 means "pool at the highest token id" (old CLIP configs).
    pool = {"pool": "argmax"} if eos == 2 else {"pool": "eos", "eos_token_id": int(eos)}
    vision = hf_vision_config(v, "vision_config", patch_bias=False, class_token=True, pre_norm=True, pool="cls")
    text = hf_text_config(t, "text_config", causal=True, **pool)
    return ModelConfig(kind="clip", embed_dim=meta.get("projection_dim", 512), vision=vision, text=text)


def hf_siglip_config(meta: dict) -> ModelConfig:
    t = {**SIGLIP_TEXT, **meta.get("text_config", {})}
    v = {**SIGLIP_VISION, **meta.get("vision_config", {})}
    if not v["vision_use_head"]:
        raise CheckpointError("vision_config.vision_use_head=false (no attention-pooling head) is not supported")
    if (t["projection_size"] or t["hidden_size"]) != v["hidden_size"]:
        raise CheckpointError("text_config.projection_size must equal vision_config.hidden_size (the shared embedding)")
    vision = hf_vision_config(v, "vision_config", patch_bias=True, pool="map", proj=False)
    text = hf_text_config(t, "text_config", causal=False, pool="end", eos_token_id=int(t["eos_token_id"]), proj_bias=True)
    return ModelConfig(kind="siglip", embed_dim=v["hidden_size"], vision=vision, text=text)


def bert_config(meta: dict) -> TextConfig:
    c = {**BERT, **meta}
    if c["position_embedding_type"] != "absolute":
        raise CheckpointError(f"position_embedding_type={c['position_embedding_type']!r}: only 'absolute' is supported")
    return hf_text_config(c, "config.json", causal=False, pool="mean", norm="post", proj=False)


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
    with atomic_directory(out, manifest=True) as tmp:  # vlfm verify checks it; loading checks the sizes
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
def load_hf(path: Path, kind: str):
    """A Hugging Face CLIPModel / SiglipModel directory as a TwoTowerModel, a BertModel one as a TextEncoder."""
    meta = read_json(path / "config.json")
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
