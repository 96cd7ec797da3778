"""Key maps and config translation between Hugging Face causal language models and vlfm's LanguageModel.

In:  `LlamaForCausalLM` (Llama, SmolLM) and `Qwen2ForCausalLM` directories (config.json + weights).
Out: a directory `transformers.LlamaForCausalLM` (or `Qwen2ForCausalLM` when q/k/v have biases) loads.

Rules use convert.py's format `(vlfm key, their key, how)`; every key of theirs is mapped or deliberately dropped.
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

from vlfm.checkpoint import CheckpointError, atomic_directory, load_state_strict
from vlfm.config import ConfigError, LMConfig
from vlfm.convert import Rule, from_vlfm, to_vlfm
from vlfm.foreign import read_weights
from vlfm.models.lm import LanguageModel

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


def load_hf_lm(directory: str | Path) -> LanguageModel:
    """A Hugging Face Llama / Qwen2 / SmolLM directory as a LanguageModel (fp32, eval mode)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        meta = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{directory}/config.json is not valid JSON: {error}") from None
    config = hf_lm_config(meta)
    model = LanguageModel(config)
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
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(out)
