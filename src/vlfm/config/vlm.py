"""The configuration of a `task: vlm` run: its data, its stages and their checks (the model's own shape,
`VLMConfig`, lives in config/model.py with the other model sections, since checkpoints carry it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlfm.config.model import VLMConfig
from vlfm.config.run import TrainSettings
from vlfm.data.shapes import WorldConfig
from vlfm.data.world_text import KINDS
from vlfm.io import ConfigError


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
    # stage 2 on the world: [N1, N2, ...]: the first N1 steps ask only about scenes of one object, the next N2
    # about scenes of two, and so on; then the configured world. Reading where an object is is learnt on one
    # object; with 2-3 objects from the start the LM never learns it (position stays at chance).
    curriculum_steps: list[int] = field(default_factory=list)
    # stage 2 on the world: focus_steps steps from step focus_start (null: right after the curriculum) that ask
    # only questions of focus_kinds (as the VQA benchmark names them: relation, existence, ...), each alone; the
    # configured world's conversations before and after. Relations stay at chance among all the other questions
    # and are learnt in steps of their own, once the rest is (docs/experiments.md §10).
    focus_steps: int = 0
    focus_start: int | None = None
    focus_kinds: list[str] = field(default_factory=lambda: ["relation"])
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj",
                                                             "gate_proj", "up_proj", "down_proj"])

    @property
    def phase_windows(self) -> list[tuple[int, int]]:
        """[start, end) steps of the phases that are not the configured world: the curriculum's, one after the
        other from step 0, then the focus phase's."""
        out, step = [], 0
        for n in self.curriculum_steps:
            out.append((step, step + n))
            step += n
        if self.focus_steps:
            start = step if self.focus_start is None else self.focus_start
            out.append((start, start + self.focus_steps))
        return out


@dataclass
class VLMDataConfig:
    source: str = "shapes"  # shapes | a LLaVA JSON / JSONL file (images relative to image_root or the file)
    image_root: str | None = None
    train_size: int = 10000  # scenes rendered for training (shapes)
    eval_size: int = 300  # unseen scenes for the VQA evaluation
    text_size: int = 3000  # scenes whose conversations (~28 each) pretrain the LM in stage 0
    max_length: int = 128  # longest training sequence in tokens (image tokens included); longer ones are skipped
    max_turns: int = 3  # stage 2 on the world: the longest multi-turn conversation (questions per image pass)
    single_questions: bool = True  # stage 2 on the world: every question also alone, besides the multi-turn ones
    count_questions: int | None = 3  # the world (stages 0 and 2): "how many" questions per scene at most (null: all)
    # A batch's sequences sorted by length and run in this many pieces, each padded only to its own longest:
    # the same loss and gradients with less padding (docs/experiments.md §10).
    length_buckets: int = 1
    world: WorldConfig = field(default_factory=WorldConfig)
    workers: int = 2


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
        if self.data.count_questions is not None and self.data.count_questions < 0:
            raise ConfigError(f"data.count_questions must be >= 0 or null (all), got {self.data.count_questions}")
        if self.data.length_buckets < 1:
            raise ConfigError(f"data.length_buckets must be >= 1 (1: one padded batch), got {self.data.length_buckets}")
        for stage in (0, 1):
            if getattr(self, f"stage{stage}").phase_windows:
                raise ConfigError(f"stage{stage}: only stage 2 has a curriculum and a focus phase")
        s2 = self.stage2
        if s2.phase_windows and self.data.source != "shapes":
            raise ConfigError("stage2.curriculum_steps and focus_steps need the built-in world (data.source=shapes)")
        if any(n < 0 for n in s2.curriculum_steps + [s2.focus_steps]) or sum(s2.curriculum_steps) + s2.focus_steps >= max(1, s2.steps):
            raise ConfigError(f"stage2.curriculum_steps={s2.curriculum_steps} and focus_steps={s2.focus_steps} must be "
                              f">= 0 each and sum to below stage2.steps={s2.steps}")
        if s2.focus_steps and not sum(s2.curriculum_steps) <= s2.phase_windows[-1][0] < s2.phase_windows[-1][1] < s2.steps:
            raise ConfigError(f"stage2.focus_start={s2.focus_start}: the focus phase starts after the curriculum "
                              f"(step {sum(s2.curriculum_steps)}) and ends before stage2.steps={s2.steps}")
        unknown = sorted(set(self.stage2.focus_kinds) - {kind for kind, _ in KINDS})
        if unknown or not self.stage2.focus_kinds:
            raise ConfigError(f"stage2.focus_kinds={self.stage2.focus_kinds}: name one or more question kinds of "
                              f"{', '.join(kind for kind, _ in KINDS)}")
        steps = self.stage2.curriculum_steps
        if len(steps) > self.data.world.max_objects:
            raise ConfigError(f"stage2.curriculum_steps={steps}: phase k shows k objects, and the world has at most "
                              f"data.world.max_objects={self.data.world.max_objects}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
