"""An image classifier: the image tower and a linear head over its normalised features. Made from a two-tower
model's zero-shot classifier (`from_zeroshot`: same logits) and fine-tuned by adapt/finetune.py."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vlfm.config import ClassifierConfig
from vlfm.data.transforms import Preprocess
from vlfm.models.base import SavedModel, register
from vlfm.models.vit import VisionTransformer


@register
class ImageClassifier(SavedModel, nn.Module):
    """The image tower and a linear head over its normalised features: logits = head(normalize(f(x)))."""

    ARCHITECTURE = "vlfm.ImageClassifier"
    CONFIG = ClassifierConfig

    @classmethod
    def build(cls, config, tokenizer, preprocess):
        return cls(config, preprocess)

    def __init__(self, config: ClassifierConfig, preprocess: Preprocess | None = None):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.model.vision, config.model.embed_dim)
        self.head = nn.Linear(config.model.embed_dim, len(config.classnames))
        self.preprocess_config = preprocess or Preprocess(image_size=config.model.vision.image_size)

    @classmethod
    def from_zeroshot(cls, model, classnames: list[str], templates: list[str]) -> ImageClassifier:
        """The zero-shot classifier of a two-tower model as an ordinary classifier (same logits)."""
        config = ClassifierConfig(copy.deepcopy(model.config), list(classnames), list(templates))
        classifier = cls(config, copy.deepcopy(model.preprocess_config)).to(model.device)
        classifier.visual.load_state_dict(model.visual.state_dict())
        with torch.no_grad():
            classifier.head.weight.copy_(model.label_embeddings(classnames, templates) * model.logit_scale.exp())
            classifier.head.bias.fill_(float(model.logit_bias) if model.logit_bias is not None else 0.0)
        return classifier.eval()

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(pixels), dim=-1))

    @torch.no_grad()
    def logits(self, images, batch_size: int = 256) -> torch.Tensor:
        """Logits for PIL images or uint8 pixels (N, 3, H, W)."""
        self.eval()
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            if isinstance(chunk, torch.Tensor):
                pixels = self.preprocess_config.normalize(chunk.to(self.device))
            else:
                pixels = self.preprocess_config(chunk).to(self.device)
            out.append(self(pixels).float())
        return torch.cat(out)
