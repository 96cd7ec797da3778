"""The configuration of a `task: vlm` run: its data, its stages and their checks (the model's own shape,
`VLMConfig`, lives in config/model.py with the other model sections, since checkpoints carry it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from vlfm.config.base import check_name, check_ranges
from vlfm.config.model import VLMConfig
from vlfm.config.run import TrainSettings
from vlfm.data.shapes import WorldConfig
from vlfm.data.stage_data import phase_windows
from vlfm.data.world_text import KINDS
from vlfm.io import MAX_PIXELS, ConfigError


@dataclass
class PhaseConfig:
    """A window of a stage's steps with data of its own (data/stage_data.py builds it). Its data: `source` (null:
    the stage's data.source; or another LLaVA JSON file, or shapes), narrowed by `objects` (the built-in world
    only: scenes of exactly this many objects, rendered for the phase) and `kinds` (only questions of these
    kinds, as world_text.question_kind names them, each alone: on a LLaVA file the matching (question, answer)
    turns as single-turn conversations with their image). `mix` of each batch comes from the phase, the rest
    from the stage's own data."""

    steps: int = 0
    start: int | None = None  # null: right after the previous phase (the first: step 0)
    source: str | None = None
    objects: int | None = None
    kinds: list[str] | None = None
    mix: float = 1.0


@dataclass
class StageConfig:
    """One stage of VLM training (train/vlm.py); the run's `train` section supplies everything else."""

    steps: int = 0  # 0 skips the stage
    batch_size: int = 32
    lr: float = 1e-3  # the projector's learning rate (stage 0: the LM's)
    lm_lr: float | None = None  # stage 2: the LM's learning rate (None: lr)
    vision_lr: float = 0.0  # stage 2: > 0 trains the vision tower too, at this rate
    warmup_steps: int = 50
    lora_rank: int = 0  # stage 2: > 0 tunes the LM with LoRA adapters of this rank instead of all its weights
    # stage 2: data phases, in order, e.g. a curriculum (`objects: 1`, then 2, ...: where an object is, is learnt
    # on one object) and a focus window (`kinds: [relation]`: relations stay at chance among all the other
    # questions and are learnt in steps of their own; docs/experiments.md §10). Other steps: the stage's data.
    phases: list[PhaseConfig] = field(default_factory=list)

    @staticmethod
    def upgrade(data: dict) -> dict:
        """An earlier version's curriculum_steps and focus_* (config.yaml of older runs) as phases."""
        old = {key: data.pop(key) for key in ("curriculum_steps", "focus_steps", "focus_start", "focus_kinds") if key in data}
        if old:
            phases = [{"steps": n, "objects": k + 1} for k, n in enumerate(old.get("curriculum_steps") or []) if n]
            if old.get("focus_steps"):
                phases.append({"start": old.get("focus_start"), "steps": old["focus_steps"],
                               "kinds": old.get("focus_kinds") or ["relation"]})  # fmt: skip
            data.setdefault("phases", phases)
        return data
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj",
                                                             "gate_proj", "up_proj", "down_proj"])

    RANGES: ClassVar[dict[str, str]] = {"steps": ">= 0", "batch_size": ">= 1", "lr": ">= 0", "lm_lr": ">= 0",
                                        "vision_lr": ">= 0", "warmup_steps": ">= 0", "lora_rank": ">= 0",
                                        "lora_alpha": "> 0"}  # fmt: skip

    @property
    def phase_windows(self) -> list[tuple[int, int]]:
        """[start, end) steps of each phase."""
        return phase_windows(self.phases)


@dataclass
class VLMDataConfig:
    source: str = "shapes"  # shapes | a LLaVA JSON / JSONL file (images relative to image_root or the file)
    image_root: str | None = None
    train_size: int = 10000  # scenes rendered for training (shapes)
    eval_size: int = 300  # unseen scenes for the VQA evaluation
    text_size: int = 3000  # scenes whose conversations (~28 each) pretrain the LM in stage 0
    # The world's text (tokenizer, stage 0, the replay) over every colour+shape pair, the held-out ones too; their
    # images stay held out (data/stage_data.py text_scenes).
    text_all_pairs: bool = False
    text_replay: float = 0.0  # stage 2 on the world: text-only conversations of this x train_size scenes join its data
    max_length: int = 128  # longest training sequence in tokens (image tokens included); longer ones are skipped; at most the LM's max_positions
    max_turns: int = 3  # stage 2 on the world: the longest multi-turn conversation (questions per image pass)
    single_questions: bool = True  # stage 2 on the world: every question also alone, besides the multi-turn ones
    count_questions: int | None = 3  # the world (stages 0 and 2): "how many" questions per scene at most (null: all)
    # A batch's sequences sorted by length and run in this many pieces, each padded only to its own longest:
    # the same loss and gradients with less padding (docs/experiments.md §10).
    length_buckets: int = 1
    # The world (stages 0 and 2): each question in one of several training wordings (varied, world_text.WORDINGS),
    # or in its one form (one); VQA's vqa_wordings_* ask the held-out wordings either way.
    wordings: str = "varied"
    world: WorldConfig = field(default_factory=WorldConfig)
    workers: int = 2
    max_pixels: int = MAX_PIXELS  # LLaVA images whose header claims more pixels are skipped and counted

    def __post_init__(self):
        check_ranges(self, "data.", {"train_size": ">= 1", "eval_size": ">= 1", "text_size": ">= 1", "max_length": ">= 1",
                                     "text_replay": ">= 0",
                                     "max_turns": ">= 1", "count_questions": ">= 0", "length_buckets": ">= 1",
                                     "workers": ">= 0"})  # fmt: skip
        if self.text_replay and self.source != "shapes":
            raise ConfigError(f"data.text_replay={self.text_replay} replays the built-in world's text; data.source="
                              f"{self.source} is a file: put its text-only conversations in the file instead")
        if self.wordings not in ("one", "varied"):
            raise ConfigError(f"data.wordings={self.wordings!r} must be one or varied (held-out wordings are VQA's alone)")


@dataclass
class VLMRunConfig:
    """A `task: vlm` run: stage 0 (LM on the world's text, only without model.lm_init), stage 1 (projector
    on captions), stage 2 (projector + LM on instructions)."""

    task: str = "vlm"
    name: str = "vlm"
    output_dir: str = "runs"
    model: VLMConfig = field(default_factory=VLMConfig)
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    stage0: StageConfig = field(default_factory=lambda: StageConfig(steps=1000, lr=1e-3))
    stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=300, lr=1e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(steps=1000, lr=2e-4))

    def __post_init__(self):
        check_name("name", self.name)
        for stage in (0, 1, 2):
            check_ranges(getattr(self, f"stage{stage}"), f"stage{stage}.", StageConfig.RANGES)
        for stage in (0, 1):
            if getattr(self, f"stage{stage}").phases:
                raise ConfigError(f"stage{stage}.phases: only stage 2 has data phases")
        check_phases("stage2", self.stage2, self.data)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def check_phases(name: str, stage: StageConfig, data: VLMDataConfig) -> None:
    """Each phase inside the stage's steps, after the previous one, with data it can have."""
    previous_end = 0
    for i, (phase, (start, end)) in enumerate(zip(stage.phases, stage.phase_windows)):
        key = f"{name}.phases[{i}]"
        if phase.steps < 1 or start < 0:
            raise ConfigError(f"{key}: steps must be >= 1 and start >= 0, got steps={phase.steps}, start={start}")
        if start < previous_end or end > stage.steps:
            raise ConfigError(f"{key}: steps {start}-{end} must lie inside {name}.steps={stage.steps}, after the "
                              f"previous phase (which ends at step {previous_end}): phases may not overlap")
        previous_end = end
        if not 0 < phase.mix <= 1 or round(phase.mix * stage.batch_size) < 1:
            raise ConfigError(f"{key}.mix={phase.mix}: the fraction of each batch drawn from the phase must be in "
                              f"(0, 1] and give at least one of {name}.batch_size={stage.batch_size}")
        source = phase.source or data.source
        if phase.objects is not None and source != "shapes":
            raise ConfigError(f"{key}.objects needs the built-in world (source shapes), not {source}")
        if phase.objects is not None and not 1 <= phase.objects <= data.world.max_objects:
            raise ConfigError(f"{key}.objects={phase.objects}: scenes show 1 to data.world.max_objects="
                              f"{data.world.max_objects} objects")
        known = [kind for kind, _ in KINDS]
        if phase.kinds is not None and (not phase.kinds or set(phase.kinds) - set(known)):
            raise ConfigError(f"{key}.kinds={phase.kinds}: name one or more question kinds of {', '.join(known)}")
