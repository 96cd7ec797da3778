"""open_clip ViT CLIP (and SigLIP-style) state dicts with open_clip's model config: key map, config translation,
loading."""

from __future__ import annotations

import logging
from pathlib import Path

from vlfm.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.transforms import Preprocess
from vlfm.interop import hub
from vlfm.interop.rules import (
    OPENAI_MEAN,
    OPENAI_STD,
    Rule,
    block_rules,
    square,
    to_vlfm,
    torch_weights,
    weight_bias,
)
from vlfm.io import CheckpointError, load_state_strict, read_json
from vlfm.models.two_tower import TwoTowerModel

log = logging.getLogger("vlfm")

DROPPED = [r"^attn_mask$", r"\.attn_mask$"]  # buffers, not weights

OPEN_CLIP_BLOCK = {"norm1": "ln_1", "attn.out_proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_map(config: ModelConfig) -> list[Rule]:
    rules = [
        ("visual.class_embed", "visual.class_embedding", "same"),
        ("visual.pos_embed", "visual.positional_embedding", "row"),
        ("visual.patch_embed.weight", "visual.conv1.weight", "same"),
        *weight_bias("visual.norm_pre", "visual.ln_pre"),
        *block_rules("visual.transformer.blocks", "visual.transformer.resblocks", config.vision.layers, OPEN_CLIP_BLOCK, "attn.in_proj"),
        *weight_bias("visual.norm", "visual.ln_post"),
        ("visual.proj.weight", "visual.proj", "t"),
        ("text.token_embed.weight", "token_embedding.weight", "same"),
        ("text.pos_embed", "positional_embedding", "row"),
        *block_rules("text.transformer.blocks", "transformer.resblocks", config.text.layers, OPEN_CLIP_BLOCK, "attn.in_proj"),
        *weight_bias("text.norm", "ln_final"),
        ("text.proj.weight", "text_projection", "t"),
        ("logit_scale", "logit_scale", "same"),
    ]
    return rules + ([("logit_bias", "logit_bias", "same")] if config.kind == "siglip" else [])


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


def load_open_clip(path: Path, config_path: str | Path | dict | None):
    """open_clip weights with their model config: `config_path` (a JSON file, or its contents), else
    open_clip_config.json beside the weights."""
    directory = path if path.is_dir() else path.parent
    if path.is_dir():
        candidates = [directory / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")]
        candidates += sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        weights = next((p for p in candidates if p.is_file()), None)
        if weights is None:
            raise CheckpointError(f"{directory} has no open_clip weights (.safetensors, .bin or .pt)")
    else:
        weights = path
    if isinstance(config_path, dict):
        meta, config_path = config_path, f"{weights} (open_clip's model config)"
    else:
        meta, config_path = None, Path(config_path) if config_path else directory / "open_clip_config.json"
    if meta is None and not config_path.is_file():
        raise CheckpointError(
            f"{weights} needs its open_clip model config (e.g. ViT-B-32.json): put open_clip_config.json beside it "
            "or pass config=PATH (vlfm convert ... --config PATH)"
        )
    meta = meta or read_json(config_path)
    try:
        config = open_clip_config(meta)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{config_path} cannot be translated: {error}") from None
    pre = meta.get("preprocess_cfg", {})
    preprocess = Preprocess(
        image_size=config.vision.image_size, mean=tuple(pre.get("mean", OPENAI_MEAN)), std=tuple(pre.get("std", OPENAI_STD)),
        interpolation=pre.get("interpolation", "bicubic"), resize_mode=pre.get("resize_mode", "shortest"),
    )  # fmt: skip
    if meta.get("tokenizer_repo"):  # an open_clip name: its tokenizer may live in another repository
        directory = hub.tokenizer_directory(directory, meta["tokenizer_repo"])
    model = TwoTowerModel(config, Tokenizer.from_directory(directory), preprocess)
    state = to_vlfm(torch_weights(weights), open_clip_map(config), DROPPED, model.state_dict(), str(weights))
    load_state_strict(model, state, str(weights))
    return model.eval()
