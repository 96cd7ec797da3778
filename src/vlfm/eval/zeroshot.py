"""Zero-shot classification: class names -> prompts -> text embeddings (ensembled over templates) -> argmax."""

from __future__ import annotations

import torch


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    """top-1, top-5 and mean per-class recall (the CLIP_benchmark metrics) from (N, C) logits."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = top[:, 0] == targets
    recalls = [top1[targets == c].float().mean() for c in range(num_classes) if (targets == c).any()]
    return {
        "top1": top1.float().mean().item(),
        "top5": (top == targets[:, None]).any(dim=1).float().mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


@torch.no_grad()
def zeroshot_classification(
    model, images, targets: torch.Tensor, classnames: list[str], templates: list[str] | None = None
) -> dict[str, float]:
    """Classify `images` (PIL list or preprocessed pixels) among `classnames`; targets index classnames."""
    model.eval()
    classifier = model.label_embeddings(classnames, templates)  # (C, D)
    logits = model.embed_images(images) @ classifier.T  # (N, C); scale and bias do not change the ranking
    return classification_metrics(logits, targets.to(logits.device), len(classnames))
