"""vlfm's own model classes. Importing the package registers every architecture (models/base.py's REGISTRY)."""

from vlfm.models.classifier import ImageClassifier
from vlfm.models.lm import LanguageModel
from vlfm.models.text import TextEncoder
from vlfm.models.two_tower import TwoTowerModel
from vlfm.models.vlm import VisionLanguageModel

__all__ = ["ImageClassifier", "LanguageModel", "TextEncoder", "TwoTowerModel", "VisionLanguageModel"]
