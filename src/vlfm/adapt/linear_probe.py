"""Linear probe: multinomial logistic regression on frozen image features.

Features are computed once; the weight decay is chosen from a grid on the validation split, then the probe is
refit on train + val and scored on the test split (the protocol of CLIP's linear-probe evaluation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlfm.data.datasets import LabelledImages
from vlfm.eval.zeroshot import classification_metrics

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# embedding: the projected features zero-shot uses | pooled: before the projection (CLIP's probe protocol) |
# tokens: every token state after the final norm, flattened (richer; size grows with the token grid)
FEATURES = ("embedding", "pooled", "tokens")


@torch.no_grad()
def image_features(model, images, features: str = "pooled", batch_size: int = 256) -> torch.Tensor:
    """Frozen image features (N, D) in fp32, from PIL images, in batches."""
    if features not in FEATURES:
        raise ValueError(f"features {features!r} is not one of {', '.join(FEATURES)}")
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        pixels = model.preprocess(images[start : start + batch_size]).to(model.device)
        if features == "embedding":
            x = model.encode_image(pixels)
        else:
            tokens = model.visual.forward_tokens(pixels)
            x = model.visual.pool(tokens) if features == "pooled" else tokens.flatten(1)
        out.append(x.float().cpu())
    return torch.cat(out)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 300):
    """Full-batch L-BFGS on cross-entropy + weight_decay/2 * |W|^2; returns (weight, bias)."""
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(model, data: LabelledImages, features: str = "pooled", seed: int = 0, weight_decays=WEIGHT_DECAYS) -> dict[str, float]:
    split = data.split(seed)
    features = image_features(model, data.images, features)
    train = split["train"]
    mean, std = features[train].mean(0), features[train].std(0).clamp(min=1e-6)
    x, y, classes = (features - mean) / std, data.targets, len(data.classnames)

    def accuracy(fit_on: torch.Tensor, score_on: torch.Tensor, wd: float) -> dict[str, float]:
        weight, bias = fit_logistic(x[fit_on], y[fit_on], classes, wd)
        return classification_metrics(x[score_on] @ weight.T + bias, y[score_on], classes)

    val = {wd: accuracy(train, split["val"], wd)["top1"] for wd in weight_decays}
    best = max(weight_decays, key=lambda wd: (val[wd], wd))  # ties go to the stronger regulariser
    test = accuracy(torch.cat([train, split["val"]]), split["test"], best)
    return {**test, "val_top1": val[best], "weight_decay": best, "train_size": len(train) + len(split["val"]),
            "test_size": len(split["test"])}  # fmt: skip
