"""PNG plots for a run directory: loss/accuracy curves and an image x text similarity matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_curves(history: dict, path: Path) -> None:
    train, evals = history["train"], history["eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    keys = [k for k in ("zeroshot_top1", "zeroshot_seen_top1", "t2i_r1", "i2t_r1") if evals and k in evals[-1]]
    for key in keys:
        axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key)
    axes[1].set(title="evaluation", xlabel="step", ylim=(0, 1))
    if keys:
        axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_similarity(model, images: torch.Tensor, texts: list[str], path: Path) -> None:
    """Cosine similarity of a few images (uint8 (N, 3, H, W), shown along the top) against their captions."""
    model.eval()
    similarity = (model.embed_images(model.preprocess_config.normalize(images)) @ model.embed_texts(texts).T).T.cpu()
    n = len(texts)
    fig = plt.figure(figsize=(2 + 0.9 * n, 1.6 + 0.55 * n))
    grid = fig.add_gridspec(2, n, height_ratios=[1, n * 0.6], hspace=0.05, wspace=0.05)
    for i in range(n):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(images[i].permute(1, 2, 0).numpy())
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    ax.imshow(similarity.numpy(), cmap="viridis", aspect="auto")
    for (r, c), value in zip(torch.cartesian_prod(torch.arange(n), torch.arange(n)).tolist(), similarity.flatten().tolist()):
        ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < similarity.max() * 0.8 else "black")
    ax.set_yticks(range(n), texts, fontsize=7)
    ax.set_xticks([])
    ax.set_title("image x text cosine similarity", fontsize=9, y=-0.08)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_mixing(curve: list[dict], path: Path) -> Path:
    """WiSE-FT: accuracy over the mixing coefficient, in-domain and under shift."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    alphas = [row["alpha"] for row in curve]
    ax.plot(alphas, [row["test_top1"] for row in curve], "o-", label="test split")
    ax.plot(alphas, [row["shifted_top1"] for row in curve], "s--", label="shifted (inverted colours)")
    ax.set_xlabel("alpha (0: zero-shot, 1: fine-tuned)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
