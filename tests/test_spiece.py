"""SentencePiece tokenizers (spiece.model, as SigLIP and T5 checkpoints ship them): a tiny unigram model trained here
with sentencepiece's own trainer, read by vlfm, the same ids as transformers' SiglipTokenizer (and as
SentencePieceProcessor for plain T5-style models); a SigLIP with only spiece.model classifies as transformers does."""

import io
import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from PIL import Image
from test_convert import hf_siglip

import vlfm
from vlfm.data.tokenizer import Tokenizer
from vlfm.io import CheckpointError

CORPUS = [
    "a photo of a red circle", "a blue square on a green background", "The dog sleeps on the sofa.",
    "two cats and one bird", "Café au lait, s'il vous plaît!", "naïve résumé über straße", "what colour is it?",
    "a small yellow triangle next to a large purple star", "Tokyo 東京 タワー", "numbers 123 and 4567",
    "an old black-and-white photograph", "HELLO WORLD", "ünïcödé accents everywhere", "emoji 🙂 and symbols ©®",
] * 20
CONTEXT = 16

STRINGS = [
    "a photo of a red circle", "A PHOTO OF A RED CIRCLE", "a Photo Of a rEd CiRcLe", "hello, world!", "what's this?",
    "(parentheses) [brackets] {braces}", "dots... and -- dashes", "  leading and trailing spaces  ",
    "tabs\tand\nnewlines", "many     inner     spaces", "Café au lait", "naïve résumé", "über straße", "東京 タワー",
    "emoji 🙂 here", "©®™ symbols", "ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ", "ﬁ ligature", "numbers 123 4567 89", "", "!!!", "a",
    "x" * 200, " ".join(["a small yellow triangle next to a large purple star"] * 6), "mixed 東京 and cats",
    "under_score and hyphen-ated", "quotes \"double\" and 'single'", "the ▁ meta symbol", "UPPER lower MiXeD",
    "an old black-and-white photograph", "two cats and one bird.", "e-mail: someone@example.com",
]  # fmt: skip


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A directory with only spiece.model and SigLIP's tokenizer_config.json, and the model file's path."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, model_type="unigram",
                                   vocab_size=120, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   character_coverage=0.9995, minloglevel=2)  # fmt: skip
    directory = tmp_path_factory.mktemp("spiece")
    (directory / "spiece.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "SiglipTokenizer", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
              "model_max_length": CONTEXT, "do_lower_case": True}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_ids_equal_siglip_tokenizer(spiece):
    ours = Tokenizer.from_directory(spiece)
    theirs = transformers.SiglipTokenizer(vocab_file=str(spiece / "spiece.model"), model_max_length=CONTEXT)
    assert len(STRINGS) >= 30
    want = theirs(STRINGS, padding="max_length", truncation=True, max_length=CONTEXT).input_ids
    ids, mask = ours(STRINGS, CONTEXT)
    assert ids.tolist() == want
    assert ours.pad_id == ours.eos_id == theirs.eos_token_id == 1
    assert mask.sum(1).tolist() == [min(len(theirs(s).input_ids), CONTEXT) for s in STRINGS]
    assert len(theirs(STRINGS[22]).input_ids) > CONTEXT and ids[22, -1] == 1  # truncated, the end token kept


def test_plain_sentencepiece_models_encode_as_sentencepiece(spiece, tmp_path):
    """Without SigLIP's tokenizer_class (T5-style): the model's own normalizer and dummy prefix, then </s>."""
    (tmp_path / "spiece.model").write_bytes((spiece / "spiece.model").read_bytes())
    ours = Tokenizer.from_directory(tmp_path)
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    for text in STRINGS:
        assert ours.backend.encode(text).ids == processor.encode(text) + [1], text
    assert ours.decode(ours.backend.encode("a photo of a red circle").ids) == "a photo of a red circle"


def test_a_damaged_spiece_model_is_one_checkpoint_error(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x00not a model")
    with pytest.raises(CheckpointError, match="is not a SentencePiece model"):
        Tokenizer.from_directory(tmp_path)


def test_siglip_with_only_spiece_model_classifies_like_transformers(spiece, tmp_path):
    vocab = spm.SentencePieceProcessor(model_file=str(spiece / "spiece.model")).get_piece_size()
    reference, path = hf_siglip(tmp_path, dict(image=16, patch=4, act="gelu", inter=64))
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(vocab_size=vocab, max_position_embeddings=CONTEXT, pad_token_id=1, eos_token_id=1)
    (path / "config.json").write_text(json.dumps(config))
    reference = hf_siglip_from(path)
    for name in ("spiece.model", "tokenizer_config.json"):
        (path / name).write_bytes((spiece / name).read_bytes())
    assert not (path / "tokenizer.json").exists()
    processor = transformers.SiglipImageProcessor(size={"height": 16, "width": 16})
    processor.save_pretrained(path)
    tokenizer = transformers.SiglipTokenizer(vocab_file=str(path / "spiece.model"), model_max_length=CONTEXT)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(20, 31), (16, 16)]]
    labels = ["a photo of a red circle", "Two cats, one bird!", "東京 タワー"]
    with torch.no_grad():
        inputs = tokenizer(labels, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")
        out = reference(input_ids=inputs.input_ids, **processor(images=images, return_tensors="pt"))
    model = vlfm.load(path, precision="fp32")
    assert model.tokenizer(labels, CONTEXT)[0].tolist() == inputs.input_ids.tolist()
    assert (model.classify(images, labels) - out.logits_per_image.sigmoid()).abs().max() <= 1e-5
    model.save(tmp_path / "saved")  # as tokenizer.json, the same ids
    assert vlfm.load(tmp_path / "saved").tokenizer(labels, CONTEXT)[0].tolist() == inputs.input_ids.tolist()


def hf_siglip_from(path):
    from test_convert import randomize

    model = randomize(transformers.SiglipModel(transformers.SiglipConfig.from_pretrained(path)), seed=1)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.0)
    model.save_pretrained(path)
    return model
