"""Fine-tuning the image tower on a labelled set, fully or with LoRA, and weight-space ensembling (WiSE-FT).

The classifier starts as the zero-shot classifier: its head is the class names' text embeddings (prompt
ensemble) times the logit scale over normalised image features, so step 0 scores exactly zero-shot accuracy.
Training uses the one training loop (train/loop.py) through `FineTuneTask`. LoRA (peft) wraps the attention
and MLP Linears of the image tower; the head stays fully trainable; the adapter is saved alone and can be
loaded onto its base or merged. `mix(zeroshot, finetuned, alpha)` interpolates the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlfm.adapt.lora import add_lora, merge_lora, save_adapter
from vlfm.config import TrainConfig
from vlfm.data.datasets import LabelledImages
from vlfm.data.transforms import to_uint8_tensor
from vlfm.eval.zeroshot import classification_metrics
from vlfm.models.classifier import ImageClassifier
from vlfm.train.loop import EpochSampler, Task

log = logging.getLogger("vlfm")
# Every Linear of the blocks and the attention-pooling head, and the convolutions of the patch embedding (a
# regex over module names, as peft takes it): on a new domain the stem matters as much as the blocks.
LORA_TARGETS = r".*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$|.*patch_embed(\.layers\.\d+)?$"


def accuracy(classifier: ImageClassifier, images, targets: torch.Tensor) -> dict[str, float]:
    return classification_metrics(classifier.logits(images).cpu(), targets, len(classifier.config.classnames))


class FineTuneTask(Task):
    """Cross-entropy on the train split, deterministic batches (a function of the step), val accuracy."""

    def __init__(self, model: nn.Module, data: LabelledImages, split: dict[str, torch.Tensor], config: TrainConfig):
        self.model, self.config = model, config
        preprocess = model.preprocess_config
        self.pixels = to_uint8_tensor([preprocess.resize_crop(data.images[i]) for i in split["train"].tolist()])
        self.targets = data.targets[split["train"]]
        self.val_pixels = to_uint8_tensor([preprocess.resize_crop(data.images[i]) for i in split["val"].tolist()])
        self.val_targets = data.targets[split["val"]]
        self.device = next(model.parameters()).device
        self.sampler = EpochSampler(len(self.targets), config)

    def batch_size(self) -> int:
        return self.config.batch_size

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        indices = self.sampler(step, micro)
        return {"pixels": self.pixels[indices], "targets": self.targets[indices]}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        pixels = self.model.preprocess_config.normalize(batch["pixels"].to(self.device))
        loss = F.cross_entropy(self.model(pixels).float(), batch["targets"].to(self.device))
        return loss, {"loss": loss.item()}

    def after_step(self) -> None:
        pass

    def evaluate(self) -> dict[str, float]:
        logits = self.model.logits(self.val_pixels).cpu()  # a PeftModel passes this through to the classifier
        return {"val_top1": classification_metrics(logits, self.val_targets, logits.shape[1])["top1"]}


def trainable_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / total


def mix(zeroshot: ImageClassifier, finetuned: ImageClassifier, alpha: float) -> ImageClassifier:
    """WiSE-FT: (1 - alpha) * zero-shot weights + alpha * fine-tuned weights (integer buffers from fine-tuned)."""
    mixed = copy.deepcopy(finetuned)
    zs = zeroshot.state_dict()
    state = {k: (1 - alpha) * zs[k] + alpha * v if v.is_floating_point() else v for k, v in finetuned.state_dict().items()}
    mixed.load_state_dict(state)
    return mixed


def shifted(images: list) -> list:
    """The distribution shift WiSE-FT is measured on: the same images with inverted colours."""
    from PIL import ImageOps

    return [ImageOps.invert(image.convert("RGB")) for image in images]


def finetune(model, data: LabelledImages, run_dir: str | Path, train: TrainConfig, lora_rank: int = 0,
             lora_alpha: int = 16, seed: int = 0, alphas: list[float] | None = None) -> dict:  # fmt: skip
    """Fine-tune `model` (a two-tower model) on `data`; writes run_dir/{zeroshot,model[,adapter]}/ and
    results.json: zero-shot and fine-tuned test accuracy, and with `alphas` the WiSE-FT curve (mix.png) on
    the test split and on its shifted (colour-inverted) copy."""
    from vlfm.train.loop import train as train_loop

    run_dir = Path(run_dir)
    split = data.split(seed)
    zeroshot = ImageClassifier.from_zeroshot(model, data.classnames, data.templates)
    test_images = [data.images[i] for i in split["test"].tolist()]
    test_targets = data.targets[split["test"]]
    results = {"zeroshot": accuracy(zeroshot, test_images, test_targets)}
    zeroshot.save(run_dir / "zeroshot")
    trainee = copy.deepcopy(zeroshot)
    if lora_rank:
        add_lora(trainee, lora_rank, lora_alpha, LORA_TARGETS, trainable=["head."])
    results["trainable_fraction"] = trainable_fraction(trainee)
    log.info("fine-tuning %.2f%% of %d parameters", 100 * results["trainable_fraction"], sum(p.numel() for p in trainee.parameters()))
    task = FineTuneTask(trainee, data, split, dataclasses.replace(train, save_every=0))
    train_loop(task, task.config, run_dir)
    if lora_rank:
        save_adapter(trainee, run_dir / "adapter")  # the adapter alone (+ the trained head)
        merge_lora(trainee)
    trainee.save(run_dir / "model")
    results["finetuned"] = accuracy(trainee, test_images, test_targets)
    if alphas:
        from vlfm.train.plots import plot_mixing

        shifted_images = shifted(test_images)
        results["mix"] = [{"alpha": a, "test_top1": accuracy(mixed, test_images, test_targets)["top1"],
                           "shifted_top1": accuracy(mixed, shifted_images, test_targets)["top1"]}
                          for a in alphas for mixed in [mix(zeroshot, trainee, a)]]  # fmt: skip
        plot_mixing(results["mix"], run_dir / "mix.png")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results
