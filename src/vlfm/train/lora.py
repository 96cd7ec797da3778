"""LoRA for the assistant's LM: peft layers injected in place (the VLM keeps its own interface), the adapter
saved alone (adapter.safetensors + adapter_config.json), reloaded onto its base model, or merged away."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from vlfm.config import StageConfig
from vlfm.io import CheckpointError
from vlfm.models.vlm import VisionLanguageModel


def add_lora(model: VisionLanguageModel, s: StageConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha, target_modules=list(s.lora_targets))
    inject_adapter_in_model(config, model.lm)
    for name, param in model.lm.named_parameters():
        param.requires_grad_("lora_" in name)
    model.lora = {"rank": s.lora_rank, "alpha": s.lora_alpha, "targets": list(s.lora_targets)}


def save_adapter(model: VisionLanguageModel, directory: Path) -> None:
    """The LoRA weights alone (adapter.safetensors) and their settings (adapter_config.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.lm.state_dict().items() if "lora_" in k}
    save_file(state, str(directory / "adapter.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(model.lora, indent=2))


def load_adapter(model: VisionLanguageModel, directory: str | Path, merge: bool = True) -> VisionLanguageModel:
    """Put a saved LoRA adapter onto its base model (the stage-1 model), merged into the weights by default."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise CheckpointError(f"{directory} has no adapter_config.json: not a vlfm LoRA adapter")
    settings = json.loads((directory / "adapter_config.json").read_text())
    add_lora(model, StageConfig(lora_rank=settings["rank"], lora_alpha=settings["alpha"], lora_targets=settings["targets"]))
    state = load_file(str(directory / "adapter.safetensors"))
    missing = sorted(k for k in model.lm.state_dict() if "lora_" in k and k not in state)
    if missing or set(state) - set(model.lm.state_dict()):
        raise CheckpointError(f"{directory}: the adapter does not fit this model ({len(missing)} LoRA tensors missing)")
    model.lm.load_state_dict(state, strict=False)
    return merge_lora(model) if merge else model


def merge_lora(model: VisionLanguageModel) -> VisionLanguageModel:
    """Fold every LoRA update into its base Linear and put the plain Linear back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.lm.get_submodule(parent) if parent else model.lm, child, module.get_base_layer())
    model.__dict__.pop("lora", None)
    return model
