import pytest
import torch

from vlfm.eval.retrieval import recall_at_k
from vlfm.eval.zeroshot import classification_metrics


def test_recall_counts_any_positive():
    similarity = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.1], [0.0, 0.5, 0.4]])
    positives = torch.tensor([[False, True, False], [True, False, False], [False, False, True]])
    r = recall_at_k(similarity, positives, ks=(1, 2, 3))
    # query 0: positive at rank 2; query 1: rank 2; query 2: rank 2
    assert r == {1: 0.0, 2: 1.0, 3: 1.0}
    positives[1, 1] = True  # a second positive for query 1 is at rank 1
    assert recall_at_k(similarity, positives, ks=(1,))[1] == pytest.approx(1 / 3)


def test_classification_metrics():
    logits = torch.tensor([[3.0, 1, 0, 0, 0, 0], [0, 3.0, 1, 0, 0, 0], [1, 0, 3.0, 0, 0, 0], [3.0, 0, 1, 0, 0, 0]])
    targets = torch.tensor([0, 1, 0, 2])  # rows 0,1 right; rows 2,3 wrong (target 2nd best)
    m = classification_metrics(logits, targets, 6)
    assert m["top1"] == 0.5 and m["top5"] == 1.0
    # class 0: 1 of 2, class 1: 1 of 1, class 2: 0 of 1
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 0) / 3)


class _FactorModel:
    """Embeds a label by its words (a colour axis plus a shape axis); image rows are set by the test."""

    preprocess_config = type("P", (), {"normalize": staticmethod(lambda x: x)})()

    def __init__(self, rows):
        self.rows = rows

    def eval(self):
        return self

    def _axes(self, text):
        from vlfm.data.shapes import COLOURS, SHAPES

        words, e = text.split(), torch.zeros(len(COLOURS) + len(SHAPES))
        for i, w in enumerate(list(COLOURS) + list(SHAPES)):
            e[i] = float(w in words)
        return e

    def label_embeddings(self, classnames, templates):
        return torch.stack([self._axes(name) for name in classnames])

    def embed_images(self, pixels):
        return self.rows


def test_factor_metrics_name_the_factor_a_heldout_miss_gets_wrong():
    from vlfm.data.shapes import ALL_LABELS, SHAPES, WorldConfig
    from vlfm.eval.world import WorldBenchmark

    bench = WorldBenchmark(WorldConfig(), classify_size=10, retrieval_size=0, workers=1)
    pixels, targets = bench.sets["heldout"]
    # every image reads its colour; the first half read a shape that is one further along SHAPES
    rows = []
    for k, t in enumerate(targets.tolist()):
        colour, shape = ALL_LABELS[t].split()
        if k < 5:
            shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        rows.append(_FactorModel(None)._axes(f"{colour} {shape}"))
    metrics = bench.factors(_FactorModel(torch.stack(rows)), pixels, targets, ["{}"])
    assert metrics == {"zeroshot_colour_only_top1": 1.0, "zeroshot_shape_only_top1": 0.5}
