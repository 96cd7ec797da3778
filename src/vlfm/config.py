"""Every configuration is a dataclass; YAML presets fill them and `key=value` overrides change single fields.

Unknown keys are errors (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlfm.data.shapes import WorldConfig

if typing.TYPE_CHECKING:
    from vlfm.config_vlm import VLMRunConfig


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and what to fix."""


@dataclass
class VisionConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"  # gelu | quick_gelu | gelu_tanh
    norm_eps: float = 1e-5
    stem: str = "patch"  # patch: one strided conv | conv: a small conv stack down to the same token grid
    patch_bias: bool = True
    class_token: bool = False
    pre_norm: bool = False  # a LayerNorm before the blocks (CLIP's ln_pre)
    pool: str = "mean"  # cls | mean | map (attention pooling with a learned probe)
    proj: bool = True  # a Linear (no bias) from width to model.embed_dim; false: width is the embedding (SigLIP)

    def __post_init__(self):
        _check_choice("vision.pool", self.pool, ("cls", "mean", "map"))
        _check_choice("vision.stem", self.stem, ("patch", "conv"))
        _check_choice("vision.act", self.act, ACTIVATIONS)
        if self.pool == "cls" and not self.class_token:
            raise ConfigError("vision.pool=cls needs vision.class_token=true")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"vision.width {self.width} is not divisible by vision.heads {self.heads}")


@dataclass
class TextConfig:
    vocab_size: int = 1024
    context_length: int = 32
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    causal: bool = True  # CLIP: causal mask; SigLIP: bidirectional
    # eos: first end-of-text token | last: last non-padding token | mean | first |
    # argmax: the highest token id (OpenAI CLIP's end token has the highest id; open_clip and old HF configs) |
    # end: the final position of a sequence padded to the context length (SigLIP's rule, padding included)
    pool: str = "eos"
    eos_token_id: int = 2
    pad_token_id: int = 0
    norm: str = "pre"  # pre: pre-norm blocks + final LayerNorm (CLIP) | post: BERT's post-norm, embeddings normed
    proj: bool = True  # a Linear from width to model.embed_dim; false: width is the embedding
    proj_bias: bool = False  # SigLIP's text head has a bias

    def __post_init__(self):
        _check_choice("text.pool", self.pool, ("eos", "last", "mean", "first", "argmax", "end"))
        _check_choice("text.norm", self.norm, ("pre", "post"))
        _check_choice("text.act", self.act, ACTIVATIONS)
        if self.width % self.heads:
            raise ConfigError(f"text.width {self.width} is not divisible by text.heads {self.heads}")


@dataclass
class ModelConfig:
    kind: str = "clip"  # clip (softmax loss) | siglip (sigmoid loss)
    embed_dim: int = 128
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    logit_scale_init: float | None = None  # log of the temperature's inverse; None: the kind's default
    logit_bias_init: float | None = None  # SigLIP only; None: -10
    max_logit_scale: float = 4.6052  # ln(100), CLIP's clamp
    # A pretrained text tower to start from (any checkpoint vlfm.load reads: vlfm, HF CLIP/SigLIP/BERT, open_clip;
    # `python:PACKAGE/DIR` names a directory inside an installed package). Its text config and tokenizer replace
    # model.text and the trained tokenizer.
    text_init: str | None = None

    def __post_init__(self):
        _check_choice("model.kind", self.kind, ("clip", "siglip"))
        for name in ("vision", "text"):
            tower = getattr(self, name)
            if not tower.proj and tower.width != self.embed_dim:
                raise ConfigError(
                    f"model.{name}.proj=false needs model.{name}.width ({tower.width}) == model.embed_dim ({self.embed_dim})"
                )


@dataclass
class ClassifierConfig:
    """An image classifier made from a two-tower model's image tower (adapt/finetune.py)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)


@dataclass
class LMConfig:
    """A Llama-style decoder (models/lm.py): RMSNorm, RoPE, SwiGLU, grouped-query attention. The field names
    follow vlfm's towers; convert_lm.py translates Hugging Face Llama / Qwen2 / SmolLM configs."""

    vocab_size: int = 1024
    width: int = 256  # hidden size
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4  # < heads: grouped-query attention (heads must be a multiple)
    head_dim: int | None = None  # None: width // heads
    mlp_width: int = 688  # SwiGLU hidden size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_positions: int = 512  # the context length: longer prompts are refused
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    attn_bias: bool = False  # biases on q/k/v (Qwen2)
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ConfigError(f"lm.heads {self.heads} is not a multiple of lm.kv_heads {self.kv_heads}")
        if self.head_dim is None and self.width % self.heads:
            raise ConfigError(f"lm.width {self.width} is not divisible by lm.heads {self.heads}; set lm.head_dim")


@dataclass
class VLMConfig:
    """Vision tower + projector + language model (models/vlm.py), LLaVA's shape."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    projector: str = "mlp2x_gelu"  # linear | mlp2x_gelu (LLaVA-1.5) | pixel_shuffle (fewer image tokens)
    shuffle_factor: int = 2  # pixel_shuffle: merge factor x factor neighbouring tokens into one
    feature_layer: int = -2  # which block's output feeds the projector (-1: the last; LLaVA uses -2)
    # A position code per image token (a 2-D sine code at the projected features' scale, learned from there),
    # added after the projector (LLaVA has none); the world's position questions need it.
    image_pos_embed: bool = False
    image_token: str = "<image>"
    image_token_id: int | None = None  # set when the tokenizer gets the image token
    template: str = "vlfm"  # the chat template (data/chat.py): vlfm | chatml
    # Where the parts come from (any checkpoint vlfm.load reads; `python:PKG/DIR` works too). Their configs
    # replace model.vision / model.lm when given.
    vision_init: str | None = None
    lm_init: str | None = None

    def __post_init__(self):
        _check_choice("model.projector", self.projector, ("linear", "mlp2x_gelu", "pixel_shuffle"))
        if self.feature_layer == 0 or abs(self.feature_layer) > self.vision.layers:
            raise ConfigError(f"model.feature_layer={self.feature_layer} must name one of the "
                              f"{self.vision.layers} vision blocks (1..{self.vision.layers} or -1..-{self.vision.layers})")
        if self.projector == "pixel_shuffle":
            grid = self.vision.image_size // self.vision.patch_size
            if grid % self.shuffle_factor:
                raise ConfigError(f"model.shuffle_factor={self.shuffle_factor} does not divide the {grid}x{grid} token grid")


@dataclass
class DataConfig:
    # shapes | a caption file (.csv/.tsv/.jsonl with filepath + caption) | WebDataset shards (a .tar, a folder
    # of .tar files, or a brace pattern such as shards/shard-{000000..000009}.tar)
    source: str = "shapes"
    train_size: int = 20000  # scenes rendered for training (shapes)
    eval_size: int = 1000  # held-out scenes for retrieval
    classify_size: int = 500  # single-object scenes per zero-shot evaluation set
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

    def __post_init__(self):
        if self.stream and (self.source == "shapes" or Path(self.source).suffix in (".csv", ".tsv", ".jsonl", ".json")):
            raise ConfigError(f"data.stream=true reads WebDataset shards, but data.source={self.source!r} is not shards; "
                              "write some with `vlfm data shard` and point data.source at them, or set data.stream=false")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    clip_grad: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses a grad scaler; GPU only)
    logit_lr_mult: float = 1.0  # learning-rate multiplier for logit_scale / logit_bias
    eval_every: int = 250
    save_every: int = 250
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default
    multi_positive: bool = True  # identical captions in a batch are positives of each other
    caption_positives: bool = False  # in-memory data: a caption is a positive of every image in the batch that has it among its captions
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% slower
    lock_text: bool = False  # LiT: the text tower (from model.text_init) stays frozen; only the image side learns
    loss_chunk: int = 0  # > 0: the contrastive loss over blocks of this many texts (O(B x chunk) memory); 0: full matrix
    gradcache: bool = False  # contrastive: grad_accum micro-batches share one loss over the whole batch (GradCache)
    hard_negatives: bool = False  # built-in world: each image also ranks against its caption with one detail changed

    def __post_init__(self):
        _check_choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        if self.gradcache and self.precision == "fp16":
            raise ConfigError("train.gradcache=true does not take fp16's grad scaler; use bf16 or fp32")
        self.betas = tuple(self.betas)


@dataclass
class DistributedConfig:
    """How a run launched with torchrun shares the work (ignored in a single process)."""

    strategy: str = "ddp"  # ddp: every rank holds the whole model | fsdp: FSDP2, parameters sharded over ranks
    local_loss: bool = False  # CLIP: each rank computes only its rows' loss against the global batch

    def __post_init__(self):
        _check_choice("distributed.strategy", self.strategy, ("ddp", "fsdp"))


@dataclass
class RunConfig:
    task: str = "contrastive"  # contrastive (CLIP / SigLIP two towers) | vlm (VLMRunConfig)
    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh", "relu", "silu")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def from_dict(cls, data: dict[str, Any] | None, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys raise ConfigError naming them."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys under {prefix.rstrip('.') or 'the top level'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping, got {value!r}")
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as error:
        raise ConfigError(f"{prefix or 'config'}: {error}") from None
    except ValueError as error:  # a section's own check (WorldConfig's ranges, ...): its message names the key
        raise ConfigError(str(error)) from None


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items})


def _coerce(value, hint, key: str):
    """Check a YAML/JSON value against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _coerce(value, hint, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    if origin in (list, tuple) and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig | VLMRunConfig:
    from vlfm.config_vlm import VLMRunConfig  # it builds on this module's sections

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (presets live in configs/)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a YAML mapping")
        data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides or [])
    task = data.get("task", "contrastive")
    _check_choice("task", task, ("contrastive", "vlm"))
    return from_dict(VLMRunConfig if task == "vlm" else RunConfig, data)
