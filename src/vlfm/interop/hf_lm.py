"""Key maps and config translation between Hugging Face causal language models and vlfm's LanguageModel, and
between Hugging Face LLaVA and vlfm's VisionLanguageModel.

In:  `LlamaForCausalLM` (Llama, SmolLM) and `Qwen2ForCausalLM` directories (config.json + weights);
     `LlavaForConditionalGeneration` directories with a CLIP or SigLIP vision tower and a Llama / Qwen2 LM.
Out: a directory `transformers.LlamaForCausalLM` (or `Qwen2ForCausalLM` when q/k/v have biases) loads.

Rules use interop/rules.py's format `(vlfm key, their key, how)`; every key of theirs is mapped or deliberately dropped.
The map takes their prefixes as parameters because LLaVA nests the same model: transformers 5 holds it in memory
under `model.language_model.` with the head at `lm_head.`, and its files under `language_model.model.` and
`language_model.lm_head.`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from safetensors.torch import save_file

from vlfm.config import ConfigError, LMConfig, ModelConfig, VLMConfig
from vlfm.data.chat import IMAGE_TOKEN, TEMPLATES
from vlfm.data.tokenizer import Tokenizer
from vlfm.interop.hf_clip import (
    CLIP_VISION,
    DROPPED,
    SIGLIP_VISION,
    hf_clip_map,
    hf_siglip_map,
    hf_vision_config,
)
from vlfm.interop.rules import (
    Rule,
    from_vlfm,
    hf_preprocess,
    read_weights,
    to_vlfm,
)
from vlfm.io import CheckpointError, atomic_directory, load_state_strict
from vlfm.models.lm import LanguageModel
from vlfm.models.vlm import VisionLanguageModel

log = logging.getLogger("vlfm")

HF_LM_BLOCK = {
    "norm1": "input_layernorm", "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj", "attn.out_proj": "self_attn.o_proj", "norm2": "post_attention_layernorm",
    "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj",
}  # fmt: skip


BIASED = ("attn.q_proj", "attn.k_proj", "attn.v_proj")  # Qwen2: biases on q/k/v, none on the output projection


# What transformers assumes when config.json leaves a key out.
HF_LM_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
              "attention_bias": False, "mlp_bias": False},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
              "use_sliding_window": False},
}  # fmt: skip


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _hf_block(i: int, layers: str, config: LMConfig) -> list[Rule]:
    """Block i of ours <-> `{layers}{i}.` of theirs (layers: e.g. 'model.layers.')."""
    rules: list[Rule] = [(f"blocks.{i}.{our}.weight", f"{layers}{i}.{their}.weight", "same") for our, their in HF_LM_BLOCK.items()]
    if config.attn_bias:
        rules += [(f"blocks.{i}.{our}.bias", f"{layers}{i}.{HF_LM_BLOCK[our]}.bias", "same") for our in BIASED]
    return rules


def hf_llama_map(config: LMConfig, prefix: str = "model.", head: str = "lm_head.") -> list[Rule]:
    """LanguageModel <-> LlamaForCausalLM / Qwen2ForCausalLM keys; `prefix`: their decoder, `head`: their output head."""
    rules: list[Rule] = [("embed_tokens.weight", f"{prefix}embed_tokens.weight", "same")]
    for i in range(config.layers):
        rules += _hf_block(i, f"{prefix}layers.", config)
    rules.append(("norm.weight", f"{prefix}norm.weight", "same"))
    if not config.tie_embeddings:
        rules.append(("lm_head.weight", f"{head}weight", "same"))
    return rules


def hf_lm_dropped(config: LMConfig, head: str = "lm_head.") -> list[str]:
    """Their keys that are deliberately not used: RoPE frequency buffers (older files store them; we recompute
    them) and, when tied, a stored copy of the head (transformers ties it to the embedding and ignores it too)."""
    dropped = [r"rotary_emb\.inv_freq$"]
    return dropped + ([f"^{re.escape(head)}weight$"] if config.tie_embeddings else [])


def hf_lm_config(meta: dict) -> LMConfig:
    """A Llama / Qwen2 config.json (or a LLaVA text_config) -> LMConfig; what vlfm cannot express is refused."""
    kind = meta.get("model_type", "llama")
    if kind not in HF_LM_DEFAULTS:
        raise CheckpointError(f"model_type={kind!r}: vlfm loads llama (Llama, SmolLM) and qwen2 language models")
    c = {**HF_LM_DEFAULTS[kind], **meta}
    if c["hidden_act"] not in ("silu", "swish"):
        raise CheckpointError(f"hidden_act={c['hidden_act']!r} is not supported: vlfm's SwiGLU MLP uses silu")
    # transformers 5 writes rope_parameters; older files write rope_theta + rope_scaling (type or rope_type).
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"rope scaling {rope_type!r} (rope_scaling / rope_parameters) is not supported: "
                              "vlfm implements plain RoPE only")
    refused = {key: c.get(key) for key in ("attention_bias", "mlp_bias", "use_sliding_window") if c.get(key)}
    if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        refused["partial_rotary_factor"] = rope.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if refused:
        raise CheckpointError("settings vlfm's LanguageModel cannot express: " + ", ".join(f"{k}={v!r}" for k, v in refused.items()))
    eos = c["eos_token_id"]
    if isinstance(eos, list):  # e.g. Llama 3: several end tokens; generate(stop_tokens=...) takes them all
        log.info("config.json lists eos_token_id=%s: %s is the default stop token", eos, eos[0])
        eos = eos[0] if eos else None
    heads = c["num_attention_heads"]
    try:
        return LMConfig(
            vocab_size=c["vocab_size"], width=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim"), mlp_width=c["intermediate_size"],
            norm_eps=c["rms_norm_eps"], rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            max_positions=c["max_position_embeddings"], tie_embeddings=bool(c["tie_word_embeddings"]),
            attn_bias=kind == "qwen2", bos_token_id=c["bos_token_id"], eos_token_id=eos, pad_token_id=c["pad_token_id"],
        )  # fmt: skip
    except ConfigError as error:
        raise CheckpointError(f"config.json cannot be translated: {error}") from None


def _read_config(directory: Path) -> dict:
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{directory}/config.json is not valid JSON: {error}") from None


def load_hf_lm(directory: str | Path) -> LanguageModel:
    """A Hugging Face Llama / Qwen2 / SmolLM directory as a LanguageModel (fp32, eval mode), with its tokenizer
    when the directory has one."""
    directory = Path(directory)
    meta = _read_config(directory)
    config = hf_lm_config(meta)
    model = LanguageModel(config, Tokenizer.from_directory(directory))
    state = to_vlfm(read_weights(directory), hf_llama_map(config), hf_lm_dropped(config), model.state_dict(), str(directory))
    load_state_strict(model, state, str(directory))
    log.info("loaded %s language model %s", meta.get("model_type", "llama"), directory)
    return model.eval()


def export_hf_lm(model: LanguageModel, out: str | Path) -> Path:
    """Write config.json + model.safetensors for transformers: LlamaForCausalLM, or Qwen2ForCausalLM when q/k/v
    have biases (Llama's attention_bias would add one to the output projection too)."""
    c = model.config
    kind = "qwen2" if c.attn_bias else "llama"
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    meta = {
        "architectures": [ARCHITECTURES[kind]], "model_type": kind, "vocab_size": c.vocab_size, "hidden_size": c.width,
        "intermediate_size": c.mlp_width, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim or c.width // c.heads, "hidden_act": "silu",
        "max_position_embeddings": c.max_positions, "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        # rope_theta for transformers 4, rope_parameters for 5
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "torch_dtype": dtype,
    }  # fmt: skip
    meta.update({"attention_bias": False, "mlp_bias": False} if kind == "llama" else {"use_sliding_window": False})
    state = from_vlfm(model.state_dict(), hf_llama_map(c))
    with atomic_directory(out, manifest=True) as tmp:  # vlfm verify checks it; loading checks the sizes
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(out)


# What transformers assumes when a LLaVA config.json leaves a key out (LlavaConfig, and its default vision tower).
HF_LLAVA_DEFAULTS = {"projector_hidden_act": "gelu", "vision_feature_select_strategy": "default",
                     "vision_feature_layer": -2, "multimodal_projector_bias": True, "tie_word_embeddings": False}  # fmt: skip


HF_LLAVA_VISION = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                   "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14}  # fmt: skip


VISION_KINDS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


def hf_llava_config(meta: dict, tokenizer: Tokenizer | None = None) -> VLMConfig:
    """A LLaVA config.json -> VLMConfig. VisionLanguageModel feeds the projector one layer's patch tokens (never
    a class token) through a biased Linear-GELU-Linear; a config that asks for anything else is refused, naming
    the key. The chat template is chatml when the tokenizer has its markers (LLaVA-Interleave / OneVision on
    Qwen2), else vlfm's: LLaVA-1.5's `USER: ... ASSISTANT:` is plain text, which a ChatTemplate (special-token
    markers) cannot express, so such models take prompt ids built by the caller (`model.generate`)."""
    c = {**HF_LLAVA_DEFAULTS, **meta}
    v = c.get("vision_config") or HF_LLAVA_VISION
    kind = VISION_KINDS.get(v.get("model_type", "clip_vision_model"))
    if kind == "clip":
        vision = hf_vision_config({**CLIP_VISION, **v}, "vision_config", patch_bias=False, class_token=True, pre_norm=True, pool="cls")
    elif kind == "siglip":
        v = {**SIGLIP_VISION, **v}
        vision = hf_vision_config(v, "vision_config", patch_bias=True, pool="map" if v["vision_use_head"] else "mean", proj=False)
    else:
        raise CheckpointError(f"vision_config.model_type={v['model_type']!r}: vlfm loads LLaVA with a "
                              f"{' or '.join(VISION_KINDS)} vision tower")  # fmt: skip
    strategy, wanted = c["vision_feature_select_strategy"], "default" if vision.class_token else "full"
    if strategy != wanted:
        raise CheckpointError(f"vision_feature_select_strategy={strategy!r} is not supported with a {kind} vision tower: "
                              f"vlfm feeds the projector every patch token and no class token ({wanted!r} here)")
    layer, n = c["vision_feature_layer"], vision.layers
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise CheckpointError(f"vision_feature_layer={layer!r}: vlfm reads one layer, not several concatenated")
    if layer == 0 or abs(layer) > n:
        raise CheckpointError(f"vision_feature_layer={layer}: vlfm reads the output of one of the {n} vision blocks "
                              f"(1..{n} or -1..-{n}), not the embeddings before them")  # fmt: skip
    if c["projector_hidden_act"] != "gelu" or not c["multimodal_projector_bias"]:
        raise CheckpointError(f"projector_hidden_act={c['projector_hidden_act']!r}, multimodal_projector_bias="
                              f"{c['multimodal_projector_bias']}: vlfm's projector is Linear-GELU-Linear with biases")
    text = c.get("text_config") or {}
    tied = bool(c["tie_word_embeddings"] or text.get("tie_word_embeddings"))  # LlavaConfig ties if either says so
    try:
        lm = hf_lm_config({**text, "tie_word_embeddings": tied})
    except CheckpointError as error:
        raise CheckpointError(f"text_config: {error}") from None
    image_token_id = meta.get("image_token_index", meta.get("image_token_id", 32000))
    if not 0 <= image_token_id < lm.vocab_size:
        raise CheckpointError(f"image_token_index={image_token_id} is outside the vocabulary (text_config.vocab_size={lm.vocab_size})")
    template = "vlfm"
    if tokenizer is not None:
        found = tokenizer.backend.token_to_id(IMAGE_TOKEN)
        if found is not None and found != image_token_id:
            raise CheckpointError(f"the tokenizer's {IMAGE_TOKEN} is token {found} but config.json says image_token_index="
                                  f"{image_token_id}: the prompt's image positions would not be found")
        if found is None:
            log.warning("the tokenizer has no %s token: prompts must carry image_token_index=%d themselves",
                        IMAGE_TOKEN, image_token_id)
        if all(tokenizer.backend.token_to_id(m) is not None for m in TEMPLATES["chatml"].markers):
            template = "chatml"
    return VLMConfig(vision=vision, lm=lm, projector="mlp2x_gelu", feature_layer=layer, image_token=IMAGE_TOKEN,
                     image_token_id=image_token_id, template=template)  # fmt: skip


def llava_layout(keys) -> dict[str, str]:
    """Where LLaVA's parts live in its weights: files (`language_model.model.`; transformers 5 writes the vision
    tower without CLIP's own `vision_model.` level, older files with it) or a state dict taken from the model in
    memory (`model.language_model.`, head at `lm_head.`)."""
    keys = list(keys)
    root = "model." if any(k.startswith("model.language_model.") for k in keys) else ""
    vision = f"{root}vision_tower."
    if any(k.startswith(f"{vision}vision_model.") for k in keys):
        vision += "vision_model."
    lm, head = ("model.language_model.", "lm_head.") if root else ("language_model.model.", "language_model.lm_head.")
    return {"vision": vision, "projector": f"{root}multi_modal_projector.", "lm": lm, "head": head}


def hf_llava_map(config: VLMConfig, layout: dict[str, str]) -> list[Rule]:
    """VisionLanguageModel <-> LLaVA keys. The vision tower is the vision half of hf_clip.py's CLIP / SigLIP map,
    all of it: blocks after the feature layer and the final norm are loaded too, as our tower keeps them."""
    v = config.vision
    two_tower = ModelConfig(kind="clip" if v.class_token else "siglip", embed_dim=v.width, vision=v)
    two_tower_rules = hf_clip_map(two_tower) if v.class_token else hf_siglip_map(two_tower)

    def rename(key):  # ours: visual.* -> vision.* (a q/k/v rule names a tuple of keys)
        return tuple(rename(k) for k in key) if isinstance(key, tuple) else "vision." + key.removeprefix("visual.")

    rules: list[Rule] = [(rename(our), layout["vision"] + their.removeprefix("vision_model."), how)
                         for our, their, how in two_tower_rules
                         if their.startswith("vision_model.") and (v.pool == "map" or ".head." not in their)]  # fmt: skip
    for our, their in (("fc1", "linear_1"), ("fc2", "linear_2")):
        rules += [(f"projector.{our}.{p}", f"{layout['projector']}{their}.{p}", "same") for p in ("weight", "bias")]
    return rules + [(f"lm.{our}", their, how) for our, their, how in hf_llama_map(config.lm, layout["lm"], layout["head"])]


def load_hf_llava(directory: str | Path) -> VisionLanguageModel:
    """A Hugging Face LlavaForConditionalGeneration directory as a VisionLanguageModel (fp32, eval mode), with its
    tokenizer and preprocessor_config.json's preprocessing. Prompts hold image_tokens copies of the image token per
    image, as transformers 5 expects them."""
    directory = Path(directory)
    meta = _read_config(directory)
    tokenizer = Tokenizer.from_directory(directory)
    try:
        config = hf_llava_config(meta, tokenizer)
    except (ConfigError, KeyError, TypeError) as error:
        raise CheckpointError(f"{directory}/config.json cannot be translated: {error}") from None
    kind = "clip" if config.vision.class_token else "siglip"
    model = VisionLanguageModel(config, tokenizer, hf_preprocess(directory, kind, config.vision.image_size))
    theirs = read_weights(directory)
    layout = llava_layout(theirs)
    dropped = DROPPED[kind] + hf_lm_dropped(config.lm, layout["head"])
    state = to_vlfm(theirs, hf_llava_map(config, layout), dropped, model.state_dict(), str(directory))
    load_state_strict(model, state, str(directory))
    log.info("loaded LLaVA (%s vision, %s) %s", kind, (meta.get("text_config") or {}).get("model_type", "llama"), directory)
    return model.eval()
