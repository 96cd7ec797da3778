"""Image <-> text retrieval recall@k, where a hit is any positive within the top k."""

from __future__ import annotations

import torch


def recall_at_k(similarity: torch.Tensor, positives: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """similarity, positives: (queries, candidates); fraction of queries with a positive in their top k."""
    ranking = similarity.topk(min(max(ks), similarity.shape[1]), dim=1).indices
    hits = positives.gather(1, ranking)  # (queries, k): is the candidate at rank r a positive?
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


@torch.no_grad()
def class_retrieval(model, images, targets: torch.Tensor, classnames: list[str], ks=(1, 10)) -> dict[str, float]:
    """Text -> image search over a labelled set: each class name is a query, the images of that class its
    positives; t2i_p{k} is the fraction of the top k that are positives, averaged over the classes."""
    model.eval()
    similarity = model.embed_texts(classnames) @ model.embed_images(images).T  # (C, N)
    positives = targets.to(similarity.device)[None, :] == torch.arange(len(classnames), device=similarity.device)[:, None]
    ranking = similarity.topk(min(max(ks), similarity.shape[1]), dim=1).indices
    hits = positives.gather(1, ranking).float()
    return {f"t2i_p{k}": hits[:, :k].mean().item() for k in ks}


@torch.no_grad()
def retrieval(model, images, texts: list[str], positives: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """positives: (texts, images) bool. Returns t2i_r{k} and i2t_r{k}."""
    model.eval()
    image_embeddings = model.embed_images(images)
    text_embeddings = model.embed_texts(texts)
    similarity = text_embeddings @ image_embeddings.T  # (T, I)
    positives = positives.to(similarity.device)
    out = {f"t2i_r{k}": v for k, v in recall_at_k(similarity, positives, ks).items()}
    out.update({f"i2t_r{k}": v for k, v in recall_at_k(similarity.T, positives.T, ks).items()})
    return out
