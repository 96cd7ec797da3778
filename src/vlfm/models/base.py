"""What every saved model shares: its architecture name in one registry, and the checkpoint directory it is
saved to and loaded from (config.json + model.safetensors, with tokenizer.json and preprocess.json where the
model has them). Weights never go through pickle; a directory is written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from vlfm.config import from_dict, to_dict
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.transforms import Preprocess
from vlfm.io import (
    CheckpointError,
    atomic_directory,
    load_state_strict,
    load_weights,
    manifest_problems,
    read_json,
)

FORMAT_VERSION = 1
REGISTRY: dict[str, type[SavedModel]] = {}


def register(cls: type[SavedModel]) -> type[SavedModel]:
    """Class decorator: checkpoints whose config.json names `cls.ARCHITECTURE` load as `cls`."""
    REGISTRY[cls.ARCHITECTURE] = cls
    return cls


class SavedModel:
    """Mixin for a model with a checkpoint directory. A subclass sets ARCHITECTURE and CONFIG (its config
    dataclass) and, when its constructor differs from (config, tokenizer, preprocess), overrides `build`."""

    ARCHITECTURE: str
    CONFIG: type
    tokenizer: Tokenizer | None = None

    @classmethod
    def build(cls, config, tokenizer: Tokenizer | None, preprocess: Preprocess | None):
        return cls(config, tokenizer, preprocess)

    def write_files(self, directory: Path, state: dict | None = None) -> None:
        """The checkpoint's files, from `state` when given (a sharded model's gathered full state)."""
        meta = {"architecture": self.ARCHITECTURE, "format_version": FORMAT_VERSION, "model": to_dict(self.config)}
        (directory / "config.json").write_text(json.dumps(meta, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in (state or self.state_dict()).items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save(directory / "tokenizer.json")
        if getattr(self, "preprocess_config", None) is not None:
            self.preprocess_config.save(directory / "preprocess.json")

    def save(self, path: str | Path, state: dict | None = None) -> Path:
        """Written whole (with manifest.json) or not at all: a failed write (a full disk) is one CheckpointError
        saying how much space the checkpoint needs, and whatever was at `path` stays as it was."""
        path = Path(path)
        previous = f"the {path.name} already there" if path.exists() else None
        try:
            with atomic_directory(path, manifest=True) as tmp:
                self.write_files(tmp, state)
        except OSError as error:
            raise write_failed(path, error, tensor_bytes(state or self.state_dict()), previous) from None
        return path


def tensor_bytes(*states: dict) -> int:
    """What the tensors of state dicts take on disk (safetensors adds a small header)."""
    return sum(t.numel() * t.element_size() for state in states for t in state.values() if hasattr(t, "numel"))


def write_failed(path: Path, error: OSError, needed: int, previous: str | Path | None) -> CheckpointError:
    """One line for a checkpoint that could not be written (ENOSPC or any OSError)."""
    kept = f"; {previous} is intact" if previous else ""
    return CheckpointError(f"could not write {path}: {error.strerror or error} (the checkpoint needs about "
                           f"{needed / 2**20:.1f} MiB free on {path.parent}){kept}")  # fmt: skip


def check_manifest(directory: Path, checksums: bool = False) -> None:
    """Every file against the checkpoint's manifest.json (sizes; sha256 too with `checksums`), one CheckpointError
    naming each damaged file; nothing to check in a directory saved before manifests."""
    problems = manifest_problems(directory, checksums)
    if problems:
        raise CheckpointError("; ".join(problems.values()))


def from_directory(directory: str | Path):
    """The model saved in a vlfm checkpoint directory, of the class its config.json names, in eval mode."""
    directory = Path(directory)
    check_manifest(directory)
    meta = read_json(directory / "config.json")
    architecture = meta.get("architecture")
    if architecture not in REGISTRY:
        raise CheckpointError(f"{directory}/config.json: unknown architecture {architecture!r} (known: {', '.join(REGISTRY)})")
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no model.safetensors: the checkpoint has no weights")
    cls = REGISTRY[architecture]
    config = from_dict(cls.CONFIG, meta.get("model"), "model.")
    tokenizer = Tokenizer.from_directory(directory)
    preprocess = Preprocess.load(directory / "preprocess.json") if (directory / "preprocess.json").is_file() else None
    model = cls.build(config, tokenizer, preprocess)
    load_state_strict(model, load_weights(weights), str(weights))
    return model.eval()
