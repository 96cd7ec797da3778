"""LoRA, one way for every model: peft's low-rank layers injected in place into a module (a classifier's image
tower, an assistant's LM), so the model keeps its own class and interface; the adapter saved alone
(adapter.safetensors + adapter_config.json), put back onto its base model, or merged away."""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from vlfm.io import CheckpointError, atomic_directory, load_weights, read_json
from vlfm.models.base import check_manifest

WRAPPABLE = (nn.Linear, nn.Conv2d)  # the layer types peft's LoRA wraps here


def add_lora(module: nn.Module, rank: int, alpha: float, targets: str | list[str], trainable: list[str] | None = None) -> None:
    """Inject LoRA layers of `rank` into `module` and train only them (and parameters under the `trainable`
    name prefixes, e.g. a classifier's head). `targets`: module-name suffixes as peft takes them (["q_proj",
    ...]), or a regex that module names must match in full (only Linear and Conv2d layers are wrapped)."""
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(targets, str):
        pattern = re.compile(targets)
        targets = [name for name, m in module.named_modules() if pattern.fullmatch(name) and isinstance(m, WRAPPABLE)]
    trainable = list(trainable or [])
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), module)
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name or name.startswith(tuple(trainable)))
    module.lora = {"rank": rank, "alpha": alpha, "targets": list(targets), "trainable": trainable}


def adapter_state(module: nn.Module) -> dict:
    trainable = tuple(module.lora["trainable"])
    return {k: v for k, v in module.state_dict().items() if "lora_" in k or (trainable and k.startswith(trainable))}


def save_adapter(module: nn.Module, directory: Path) -> None:
    """The adapter alone: LoRA tensors and the other trained tensors (adapter.safetensors), and its settings
    (adapter_config.json), written atomically with manifest.json as checkpoints are (`vlfm verify` checks it)."""
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state(module).items()}
    with atomic_directory(directory, manifest=True) as tmp:
        save_file(state, str(tmp / "adapter.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(module.lora, indent=2))


def load_adapter(module: nn.Module, directory: str | Path, merge: bool = True) -> nn.Module:
    """Put a saved adapter onto its base module, merged into the weights by default."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file() or not (directory / "adapter.safetensors").is_file():
        raise CheckpointError(f"{directory} has no adapter_config.json + adapter.safetensors: not a vlfm LoRA adapter")
    check_manifest(directory)  # sizes first: a cut-short file is named as such
    settings = read_json(directory / "adapter_config.json")
    add_lora(module, settings["rank"], settings["alpha"], settings["targets"], settings.get("trainable"))
    state = load_weights(directory / "adapter.safetensors")
    expected = adapter_state(module)
    if set(state) != set(expected):
        missing, unexpected = len(set(expected) - set(state)), len(set(state) - set(expected))
        raise CheckpointError(f"{directory}: the adapter does not fit this model ({missing} tensors missing, {unexpected} unexpected)")
    module.load_state_dict(state, strict=False)
    return merge_lora(module) if merge else module


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base layer and put the plain layer back."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    module.__dict__.pop("lora", None)
    return module
