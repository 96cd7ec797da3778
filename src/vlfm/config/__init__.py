"""Every configuration is a dataclass; YAML presets fill them and `-o key=value` overrides change single fields.

model.py holds the sections a checkpoint carries (the model's shape); run.py and vlm.py the sections of a run
(data, training, stages), which a checkpoint does not need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlfm.config.base import apply_overrides, check_choice, from_dict, parse_yaml, to_dict
from vlfm.config.model import (
    ACTIVATIONS,
    ClassifierConfig,
    LMConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
    VLMConfig,
)
from vlfm.config.run import (
    ContrastiveTrainConfig,
    DataConfig,
    DistributedConfig,
    RunConfig,
    TrainConfig,
    TrainSettings,
)
from vlfm.config.vlm import PhaseConfig, StageConfig, VLMDataConfig, VLMRunConfig
from vlfm.io import ConfigError

__all__ = [
    "ACTIVATIONS", "ClassifierConfig", "ConfigError", "ContrastiveTrainConfig", "DataConfig", "DistributedConfig", "LMConfig", "ModelConfig", "PhaseConfig",
    "RunConfig", "StageConfig", "TextConfig", "TrainConfig", "TrainSettings", "VLMConfig", "VLMDataConfig", "VLMRunConfig",
    "VisionConfig", "apply_overrides", "from_dict", "load_config", "to_dict",
]  # fmt: skip


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig | VLMRunConfig:
    """A run's config from a YAML preset (or none: the defaults) and `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (presets live in configs/)")
        data = parse_yaml(path.read_text(errors="replace"), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a YAML mapping")
        data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides or [])
    task = data.get("task", "contrastive")
    check_choice("task", task, ("contrastive", "vlm"))
    return from_dict(VLMRunConfig if task == "vlm" else RunConfig, data)
