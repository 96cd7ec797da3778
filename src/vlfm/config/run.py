"""A contrastive run (`task: contrastive`, the default): its data, its training and its distribution over ranks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from vlfm.config.base import check_choice, check_name, check_ranges
from vlfm.config.model import ModelConfig
from vlfm.data.shapes import WorldConfig
from vlfm.io import MAX_PIXELS, ConfigError
from vlfm.nn import PRECISIONS


@dataclass
class DataConfig:
    # shapes | a caption file (.csv/.tsv/.jsonl with filepath + caption) | WebDataset shards (a .tar, a folder
    # of .tar files, or a brace pattern such as shards/shard-{000000..000009}.tar)
    source: str = "shapes"
    train_size: int = 20000  # scenes rendered for training (shapes)
    eval_size: int = 1000  # held-out scenes for retrieval
    classify_size: int = 500  # single-object scenes per zero-shot evaluation set
    ood_per_class: int = 0  # shapes-ood drawings (data/ood.py) per label in the world benchmark: out-of-domain
    world: WorldConfig = field(default_factory=WorldConfig)
    augment: bool = False  # random resized crop (+ flip when allowed); off for shapes: it breaks "left of"
    caption_column: str = "caption"
    image_column: str = "filepath"
    workers: int = 2  # processes that render the world, or that read and decode a stream's shards (0: in-process)
    # Shards only: stream them (data/stream.py) instead of decoding every sample into memory. Each rank and each
    # worker reads its own shards, forever, epoch after epoch; the position is part of the training checkpoint,
    # and --resume needs the same torchrun size, data.workers and train.batch_size.
    stream: bool = False
    shuffle_buffer: int = 1000  # stream: samples shuffled in a seeded buffer (per reader and epoch); <= 1: no shuffle
    max_pixels: int = MAX_PIXELS  # images whose header claims more pixels are skipped and counted (io.read_image)

    def __post_init__(self):
        check_ranges(self, "data.", {"train_size": ">= 1", "eval_size": ">= 0", "classify_size": ">= 0", "workers": ">= 0",
                                     "ood_per_class": ">= 0",
                                     "shuffle_buffer": ">= 0"})  # fmt: skip
        if self.stream and (self.source == "shapes" or Path(self.source).suffix in (".csv", ".tsv", ".jsonl", ".json")):
            raise ConfigError(f"data.stream=true reads WebDataset shards, but data.source={self.source!r} is not shards; "
                              "write some with `vlfm data shard` and point data.source at them, or set data.stream=false")


@dataclass
class TrainSettings:
    """How any run trains, whatever its length: optimiser, precision, logging, seed, device. A VLM run's `train`
    section is this; its steps, batch size and learning rates are per stage (config/vlm.py)."""

    grad_accum: int = 1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    clip_grad: float = 1.0
    # auto: bf16 where it is fast (a GPU, a CPU with AVX512-BF16 or AMX), else fp32 | fp32 | bf16 | fp16 (GPU only)
    precision: str = "auto"
    eval_every: int = 250
    save_every: int = 250
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, slower
    compile: bool = False  # torch.compile each transformer block: faster steps after a compile of a minute or more
    # a step whose loss or gradient norm is not finite is skipped; this many in a row stop the run (exit 3)
    max_bad_steps: int = 3

    RANGES: ClassVar[dict[str, str]] = {"grad_accum": ">= 1", "min_lr_ratio": "in [0, 1]", "weight_decay": ">= 0",
                                        "betas": "in [0, 1)", "eps": "> 0", "clip_grad": ">= 0", "eval_every": ">= 0",
                                        "save_every": ">= 0", "log_every": ">= 1", "seed": ">= 0", "threads": ">= 0",
                                        "max_bad_steps": ">= 1"}  # fmt: skip

    def __post_init__(self):
        check_choice("train.precision", self.precision, PRECISIONS)
        self.betas = tuple(self.betas)
        check_ranges(self, "train.", self.RANGES)


@dataclass
class TrainConfig(TrainSettings):
    """One run of the training loop (train/loop.py): the settings plus its length, batch and learning rate."""

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100

    RANGES: ClassVar[dict[str, str]] = {**TrainSettings.RANGES, "steps": ">= 1", "batch_size": ">= 1", "lr": ">= 0",
                                        "warmup_steps": ">= 0"}  # fmt: skip


@dataclass
class ContrastiveTrainConfig(TrainConfig):
    """A contrastive run's `train` section: the loop's fields and the contrastive loss's."""

    logit_lr_mult: float = 1.0  # learning-rate multiplier for logit_scale / logit_bias
    multi_positive: bool = True  # identical captions in a batch are positives of each other
    lock_text: bool = False  # LiT: the text tower (from model.text_init) stays frozen; only the image side learns
    loss_chunk: int = 0  # > 0: the contrastive loss over blocks of this many texts (O(B x chunk) memory); 0: full matrix
    gradcache: bool = False  # grad_accum micro-batches share one loss over the whole batch (GradCache)

    RANGES: ClassVar[dict[str, str]] = {**TrainConfig.RANGES, "logit_lr_mult": ">= 0", "loss_chunk": ">= 0"}

    def __post_init__(self):
        super().__post_init__()
        if self.gradcache and self.precision == "fp16":
            raise ConfigError("train.gradcache=true does not take fp16's grad scaler; use bf16 or fp32")


@dataclass
class DistributedConfig:
    """How a run launched with torchrun shares the work (ignored in a single process)."""

    strategy: str = "ddp"  # ddp: every rank holds the whole model | fsdp: FSDP2, parameters sharded over ranks
    local_loss: bool = False  # CLIP: each rank computes only its rows' loss against the global batch

    def __post_init__(self):
        check_choice("distributed.strategy", self.strategy, ("ddp", "fsdp"))


@dataclass
class RunConfig:
    task: str = "contrastive"  # contrastive (CLIP / SigLIP two towers) | vlm (VLMRunConfig)
    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: ContrastiveTrainConfig = field(default_factory=ContrastiveTrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        check_name("name", self.name)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
