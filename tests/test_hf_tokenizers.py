"""Parity of vlfm.data.hf_tokenizers with transformers' own tokenizers, on tiny vocabularies written here."""

import json

import pytest
import transformers
from tokenizers import Tokenizer

from conftest import write_clip_files
from vlfm.data.hf_tokenizers import bert_wordpiece, clip_bpe

CLIP_TEXTS = [
    "a photo of a cat",
    "A Photo Of The RED Circle!",
    "  a   dog\tand\n\na cat  ",
    "it's a cat's photo, isn't it?? we'll see; they'd've gone.",
    "photo 2024: 3 cats & 12 dogs...",
    "café naïve RÉSUMÉ",
    "cafe\u0301 (decomposed accent)",
    "猫 and 🐱 emoji",
    "a cat<|endoftext|>a dog",
    "",
]
BERT_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    ".", ",", "!", "?", "'", "-", "s", "t", "猫",
    "a", "the", "photo", "of", "cat", "dog", "red", "circle", "it", "cafe", "play",
    "##s", "##ing", "##ed", "##ly",
    "A", "Photo", "Cat", "RED",
]  # fmt: skip
BERT_TEXTS = [
    "a photo of the cat",
    "A Photo of the RED Circle!",
    "Playing cats, played dogs.",
    "Café CAFÉ cafe\u0301",
    "it's a zebra-crossing",
    "猫猫 cat",
    "  multiple   spaces\tand\nnewlines ",
    "a [MASK] cat",
    "",
]


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    vocab_json, merges_txt = write_clip_files(directory)
    # transformers 5's CLIPTokenizer(vocab_file=..., merges_file=...) silently ignores the files and builds
    # a 3-token placeholder vocabulary; from_pretrained on the local directory reads them.
    reference = transformers.CLIPTokenizer.from_pretrained(str(directory))
    assert len(reference) == len(json.loads(vocab_json.read_text()))
    return clip_bpe(vocab_json, merges_txt), reference


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    (directory / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    return directory


@pytest.mark.parametrize("text", CLIP_TEXTS)
def test_clip_ids_match_transformers(clip_pair, text):
    ours, reference = clip_pair
    assert ours.encode(text).ids == reference(text)["input_ids"]


def test_clip_tokens_are_merged_words(clip_pair):
    ours, _ = clip_pair
    tokens = ours.encode("A  Photo of the RED cat's").tokens
    assert tokens == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "the</w>", "red</w>", "cat</w>", "'", "s</w>",
        "<|endoftext|>",
    ]  # fmt: skip
    assert ours.encode("").tokens == ["<|startoftext|>", "<|endoftext|>"]


def test_clip_pairs_and_decoding_match_transformers(clip_pair):
    ours, reference = clip_pair
    assert ours.encode("a cat", "a dog").ids == reference("a cat", "a dog")["input_ids"]
    for text in CLIP_TEXTS:
        ids = ours.encode(text).ids
        for skip in (True, False):
            expected = reference.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected


@pytest.mark.parametrize("text", ["a photo of a cat", "  The RED   circle\tAND a dog ", "zebra Crossing", ""])
def test_clip_round_trip(clip_pair, text):
    ours, _ = clip_pair
    assert ours.decode(ours.encode(text).ids) == " ".join(text.lower().split())


@pytest.mark.parametrize("text", BERT_TEXTS)
def test_bert_ids_match_transformers(bert_dir, text):
    ours = bert_wordpiece(bert_dir / "vocab.txt")
    reference = transformers.BertTokenizer.from_pretrained(str(bert_dir))
    expected = reference(text)["input_ids"]
    assert ours.encode(text).ids == expected
    # The pure-Python tokenizer agrees too, so the check does not rest on transformers using `tokenizers`.
    legacy = transformers.BertTokenizerLegacy(vocab_file=str(bert_dir / "vocab.txt"))
    assert legacy(text)["input_ids"] == expected


def test_bert_specifics(bert_dir):
    ours = bert_wordpiece(bert_dir / "vocab.txt")
    vocab = {token: i for i, token in enumerate(BERT_VOCAB)}
    encoding = ours.encode("Playing a zebra, Café!")
    assert encoding.tokens == ["[CLS]", "play", "##ing", "a", "[UNK]", ",", "cafe", "!", "[SEP]"]
    assert encoding.ids[0] == vocab["[CLS]"] and encoding.ids[-1] == vocab["[SEP]"]
    assert ours.decode(encoding.ids, skip_special_tokens=False) == "[CLS] playing a [UNK], cafe! [SEP]"
    assert ours.decode(encoding.ids) == "playing a, cafe!"  # [UNK] is a special token too
    pair = transformers.BertTokenizer.from_pretrained(str(bert_dir))("a cat", "the dog")
    assert ours.encode("a cat", "the dog").ids == pair["input_ids"]
    assert ours.encode("a cat", "the dog").type_ids == pair["token_type_ids"]


def test_bert_cased(bert_dir):
    ours = bert_wordpiece(bert_dir / "vocab.txt", lowercase=False)
    legacy = transformers.BertTokenizerLegacy(vocab_file=str(bert_dir / "vocab.txt"), do_lower_case=False)
    for text in ["A Photo of the RED Cat!", "a photo", "Café cafe"]:
        assert ours.encode(text).ids == legacy(text)["input_ids"]
    assert ours.encode("A Photo").tokens == ["[CLS]", "A", "Photo", "[SEP]"]


def test_saved_tokenizers_load_back(clip_pair, bert_dir, tmp_path):
    for ours, texts in [(clip_pair[0], CLIP_TEXTS), (bert_wordpiece(bert_dir / "vocab.txt"), BERT_TEXTS)]:
        ours.save(str(tmp_path / "tokenizer.json"))
        again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
        for text in texts:
            ids = ours.encode(text).ids
            assert again.encode(text).ids == ids and again.decode(ids) == ours.decode(ids)
