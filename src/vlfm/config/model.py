"""The shape of a model: every section a checkpoint's config.json carries (a run's other sections: run.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from vlfm.config.base import check_choice, check_ranges
from vlfm.io import ConfigError

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh", "relu", "silu")

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

    RANGES: ClassVar[dict[str, str]] = {"image_size": ">= 1", "patch_size": ">= 1", "width": ">= 1", "layers": ">= 1",
                                        "heads": ">= 1", "mlp_ratio": "> 0", "norm_eps": "> 0"}  # fmt: skip

    def __post_init__(self):
        check_ranges(self, "model.vision.", self.RANGES)
        check_choice("vision.pool", self.pool, ("cls", "mean", "map"))
        check_choice("vision.stem", self.stem, ("patch", "conv"))
        check_choice("vision.act", self.act, ACTIVATIONS)
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

    RANGES: ClassVar[dict[str, str]] = {"vocab_size": ">= 1", "context_length": ">= 1", "width": ">= 1", "layers": ">= 1",
                                        "heads": ">= 1", "mlp_ratio": "> 0", "norm_eps": "> 0", "eos_token_id": ">= 0",
                                        "pad_token_id": ">= 0"}  # fmt: skip

    def __post_init__(self):
        check_ranges(self, "model.text.", self.RANGES)
        check_choice("text.pool", self.pool, ("eos", "last", "mean", "first", "argmax", "end"))
        check_choice("text.norm", self.norm, ("pre", "post"))
        check_choice("text.act", self.act, ACTIVATIONS)
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
        check_choice("model.kind", self.kind, ("clip", "siglip"))
        check_ranges(self, "model.", {"embed_dim": ">= 1", "max_logit_scale": ">= 0"})
        for name in ("vision", "text"):
            tower = getattr(self, name)
            if not tower.proj and tower.width != self.embed_dim:
                raise ConfigError(
                    f"model.{name}.proj=false needs model.{name}.width ({tower.width}) == model.embed_dim ({self.embed_dim})"
                )


@dataclass
class ClassifierConfig:
    """An image classifier made from a two-tower model's image tower (models/classifier.py)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)


@dataclass
class LMConfig:
    """A Llama-style decoder (models/lm.py): RMSNorm, RoPE, SwiGLU, grouped-query attention. The field names
    follow vlfm's towers; interop/hf_lm.py translates Hugging Face Llama / Qwen2 / SmolLM configs."""

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

    RANGES: ClassVar[dict[str, str]] = {"vocab_size": ">= 1", "width": ">= 1", "layers": ">= 1", "heads": ">= 1",
                                        "kv_heads": ">= 1", "head_dim": ">= 1", "mlp_width": ">= 1", "norm_eps": "> 0",
                                        "rope_theta": "> 0", "max_positions": ">= 1", "bos_token_id": ">= 0",
                                        "eos_token_id": ">= 0", "pad_token_id": ">= 0"}  # fmt: skip

    def __post_init__(self):
        check_ranges(self, "model.lm.", self.RANGES)
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
        check_choice("model.projector", self.projector, ("linear", "mlp2x_gelu", "pixel_shuffle"))
        check_ranges(self, "model.", {"shuffle_factor": ">= 1", "image_token_id": ">= 0"})
        if self.feature_layer == 0 or abs(self.feature_layer) > self.vision.layers:
            raise ConfigError(f"model.feature_layer={self.feature_layer} must name one of the "
                              f"{self.vision.layers} vision blocks (1..{self.vision.layers} or -1..-{self.vision.layers})")
        if self.projector == "pixel_shuffle":
            grid = self.vision.image_size // self.vision.patch_size
            if grid % self.shuffle_factor:
                raise ConfigError(f"model.shuffle_factor={self.shuffle_factor} does not divide the {grid}x{grid} token grid")
