"""Other projects' checkpoint layouts, one module each, on the key-map machinery of rules.py:

  hf_clip    Hugging Face CLIPModel, SiglipModel and BertModel directories (in and out)
  open_clip  open_clip ViT CLIP weights with their model config (in)
  hub        checkpoints by hub name through huggingface_hub's cache (ORG/NAME, open_clip MODEL/TAG)
  hf_lm      Hugging Face Llama / Qwen2 (in and out) and LLaVA (in)

`detect` names a directory's layout, `load_foreign` reads it as a vlfm model, `export_hf` writes a vlfm model
in the layout transformers loads.
"""

from __future__ import annotations

from pathlib import Path

from vlfm.interop import hf_clip, hf_lm, open_clip
from vlfm.io import CheckpointError, read_json
from vlfm.models.lm import LanguageModel
from vlfm.models.two_tower import TwoTowerModel


def detect(path: str | Path) -> str | None:
    """The layout of a directory: vlfm | clip | siglip | bert | llava | causal_lm (Llama / Qwen2) | open_clip, or
    None if it is none of them."""
    path = Path(path)
    if path.is_file() or (path / "open_clip_config.json").is_file():
        return "open_clip"
    if not (path / "config.json").is_file():
        return None
    meta = read_json(path / "config.json")
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


def load_foreign(path: str | Path, config_path: str | Path | dict | None = None):
    """A Hugging Face or open_clip checkpoint as a vlfm model: TwoTowerModel, TextEncoder (BERT),
    VisionLanguageModel (LLaVA) or LanguageModel (Llama / Qwen2)."""
    path = Path(path)
    kind = detect(path)
    if kind == "open_clip":
        return open_clip.load_open_clip(path, config_path)
    if kind == "llava":
        return hf_lm.load_hf_llava(path)
    if kind == "causal_lm":
        return hf_lm.load_hf_lm(path)
    if kind in ("clip", "siglip", "bert"):
        return hf_clip.load_hf(path, kind)
    raise CheckpointError(f"{path} has no config.json: not a Hugging Face or vlfm model directory")


def export_hf(model, out: str | Path) -> Path:
    """Write a vlfm model as the directory transformers loads: a two-tower model as CLIPModel / SiglipModel, a
    language model as LlamaForCausalLM / Qwen2ForCausalLM."""
    if isinstance(model, TwoTowerModel):
        return hf_clip.export_hf(model, out)
    if isinstance(model, LanguageModel):
        return hf_lm.export_hf_lm(model, out)
    raise CheckpointError(f"{type(model).__name__} has no Hugging Face export: two-tower models (CLIP / SigLIP) and "
                          "language models (Llama / Qwen2) do")
