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
