"""Evaluation tasks by name, over named or local datasets (CLIP_benchmark's task names), and a results table.

- zeroshot_classification: class names -> prompt templates -> text embeddings; the single-template score, the
  gain of the template ensemble and (where the dataset names synonyms) the synonym ensemble are reported;
- zeroshot_retrieval: a caption file's images and captions, recall@k both ways; or a named labelled set (shapes,
  shapes-ood, ...), each class name a text query over its images: precision@1 and @10 (`t2i_p1`, `t2i_p10`);
- linear_probe: logistic regression on frozen image features (adapt/linear_probe.py).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from vlfm.data.datasets import NAMED, load_dataset
from vlfm.data.sources import load_image_text, read_caption_file
from vlfm.eval.retrieval import class_retrieval, retrieval
from vlfm.eval.zeroshot import zeroshot_classification
from vlfm.io import MAX_PIXELS

CSV_COLUMNS = ["time", "model", "dataset", "task", "top1", "top5", "mean_per_class_recall", "top1_single_template",
               "ensemble_gain", "top1_synonyms", "zeroshot_top1", "t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5",
               "t2i_p1", "t2i_p10"]  # fmt: skip


def evaluate_task(model, task: str, dataset: str, features: str = "pooled", max_pixels: int = MAX_PIXELS) -> dict[str, float]:
    """`task` on `dataset`; images whose header claims more than `max_pixels` are skipped and counted."""
    if task == "zeroshot_retrieval" and dataset in NAMED:
        data = load_dataset(dataset)
        return {**class_retrieval(model, data.images, data.targets, data.classnames), "images": len(data)}
    if task == "zeroshot_retrieval":
        rows = read_caption_file(dataset)
        data = load_image_text(rows, model.preprocess_config, max_pixels)
        captions = [caps[0] for caps in data.captions]
        positives = torch.tensor([[a == b for b in captions] for a in captions])  # identical captions all count
        metrics = retrieval(model, model.preprocess_config.normalize(data.images), captions, positives)
        return {**metrics, "images": len(captions), "skipped": data.skipped}
    data = load_dataset(dataset, max_pixels)
    if task == "linear_probe":
        from vlfm.adapt.linear_probe import linear_probe

        return {**linear_probe(model, data, features), "features": features}
    if task == "zeroshot_classification":
        ensemble = zeroshot_classification(model, data.images, data.targets, data.classnames, data.templates)
        single = zeroshot_classification(model, data.images, data.targets, data.classnames, data.templates[:1])
        out = {**ensemble, "top1_single_template": single["top1"], "ensemble_gain": ensemble["top1"] - single["top1"],
               "images": len(data)}  # fmt: skip
        if data.synonyms:  # class names with their synonyms, all in one prompt ensemble
            out["top1_synonyms"] = zeroshot_classification(model, data.images, data.targets, data.synonyms, data.templates)["top1"]
        return out
    raise ValueError(f"unknown task {task!r}")


def append_csv(path: str | Path, model: str, dataset: str, task: str, metrics: dict) -> Path:
    """One row per evaluation, so runs compare in one table (columns a task does not have stay empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "model": model, "dataset": dataset, "task": task}
    row.update({k: f"{v:.4f}" for k, v in metrics.items() if k in CSV_COLUMNS and isinstance(v, float)})
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    return path
