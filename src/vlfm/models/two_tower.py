"""CLIP / SigLIP two-tower model: an image tower and a text tower projected into one embedding space.

`encode_image` / `encode_text` return unnormalised projected features (like Hugging Face's get_*_features);
`forward` returns normalised features with the logit scale (and bias). A loaded model carries its tokenizer
and preprocessing, so `model.classify(images, labels)` works from raw inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlfm.config import ModelConfig
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.transforms import Preprocess
from vlfm.models.base import SavedModel, register
from vlfm.models.text import TextEmbedding, TextTransformer
from vlfm.models.vit import VisionTransformer
from vlfm.nn import autocast


@register
class TwoTowerModel(SavedModel, TextEmbedding, nn.Module):
    ARCHITECTURE = "vlfm.TwoTowerModel"
    CONFIG = ModelConfig

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None, preprocess: Preprocess | None = None):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.vision, config.embed_dim)
        self.text = TextTransformer(config.text, config.embed_dim)
        if config.kind == "clip":
            scale = math.log(1 / 0.07) if config.logit_scale_init is None else config.logit_scale_init
            self.logit_scale = nn.Parameter(torch.tensor(float(scale)))
            self.logit_bias = None
        else:
            scale = math.log(10.0) if config.logit_scale_init is None else config.logit_scale_init
            bias = -10.0 if config.logit_bias_init is None else config.logit_bias_init
            self.logit_scale = nn.Parameter(torch.tensor(float(scale)))
            self.logit_bias = nn.Parameter(torch.tensor(float(bias)))
        self.tokenizer = tokenizer
        self.preprocess_config = preprocess or Preprocess(image_size=config.vision.image_size)

    # --- features -----------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Normalised image and text features (B, embed_dim) each, the logit scale exp(t') and the bias."""
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        return image, text, self.logit_scale.exp(), self.logit_bias

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enabled
        self.text.transformer.grad_checkpointing = enabled

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """CLIP clamps the learned temperature so logits never exceed 100x cosine (called after each step)."""
        self.logit_scale.clamp_(0, self.config.max_logit_scale)

    # --- raw inputs ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def preprocess(self, images: Image.Image | list[Image.Image]) -> torch.Tensor:
        return self.preprocess_config(images)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image] | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Normalised image embeddings (N, embed_dim) from PIL images or preprocessed pixels."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = chunk if isinstance(chunk, torch.Tensor) else self.preprocess(chunk)
            with autocast(self.device, self.precision):
                features = self.encode_image(pixels.to(self.device))
            out.append(F.normalize(features.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def label_embeddings(self, labels: list[str | list[str]], templates: list[str] | None = None) -> torch.Tensor:
        """One normalised embedding per label: the mean of its normalised prompt embeddings, renormalised.
        A label may be a list of synonyms ("7", "seven"): every name x template prompt joins the mean."""
        templates = templates or ["{}"]
        groups = [[label] if isinstance(label, str) else list(label) for label in labels]
        prompts = [template.format(name) for names in groups for name in names for template in templates]
        owner = torch.tensor([i for i, names in enumerate(groups) for _ in range(len(names) * len(templates))])
        embeddings = self.embed_texts(prompts)
        sums = torch.zeros(len(groups), embeddings.shape[1], device=embeddings.device)
        return F.normalize(sums.index_add_(0, owner.to(embeddings.device), embeddings), dim=-1)  # mean, renormalised

    def logits(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        logits = self.logit_scale.exp().float() * image_embeddings @ text_embeddings.T
        return logits + self.logit_bias.float() if self.logit_bias is not None else logits

    @torch.no_grad()
    def classify(self, images, labels: list[str], templates: list[str] | None = None) -> torch.Tensor:
        """Probabilities (images x labels): softmax over labels for CLIP, independent sigmoids for SigLIP."""
        was_training = self.training
        self.eval()
        logits = self.logits(self.embed_images(images), self.label_embeddings(labels, templates))
        self.train(was_training)
        return logits.softmax(dim=-1) if self.logit_bias is None else logits.sigmoid()
