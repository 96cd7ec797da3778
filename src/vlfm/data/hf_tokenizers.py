"""Build `tokenizers.Tokenizer` objects from the legacy ("slow") tokenizer files of Hugging Face models,
so that text is tokenized exactly as transformers does it, without importing transformers."""

from __future__ import annotations

import re
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_WORD_END = "</w>"
# Contractions, runs of letters, single digits, runs of anything else that is not whitespace.
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _require(vocab: dict[str, int], token: str, source: Path) -> int:
    """The id of a token the tokenizer cannot work without."""
    if token not in vocab:
        raise ValueError(f"{str(source)!r} has no {token!r} token")
    return vocab[token]


def clip_bpe(vocab_json: Path, merges_txt: Path) -> Tokenizer:
    """OpenAI CLIP's byte-level BPE: `<|startoftext|> tokens <|endoftext|>`, lower-cased text."""
    # merges.txt: one "left right" pair a line, in priority order, after a `#version` header.
    vocab, merges = models.BPE.read_file(str(vocab_json), str(merges_txt))
    bos_id = _require(vocab, CLIP_BOS, vocab_json)
    eos_id = _require(vocab, CLIP_EOS, vocab_json)

    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            end_of_word_suffix=CLIP_WORD_END,
            unk_token=CLIP_EOS,
            fuse_unk=False,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # Bytes back to text, then each end-of-word marker becomes a space, except a final one. (Not
    # decoders.Strip: it panics on an empty string in tokenizers 0.23.)
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace(CLIP_WORD_END, " "), decoders.Replace(Regex(" $"), "")]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        pair=f"{CLIP_BOS} $A {CLIP_EOS} {CLIP_EOS} $B {CLIP_EOS}",
        special_tokens=[(CLIP_BOS, bos_id), (CLIP_EOS, eos_id)],
    )
    tokenizer.add_special_tokens([CLIP_BOS, CLIP_EOS])
    return tokenizer


def bert_wordpiece(vocab_txt: Path, lowercase: bool = True) -> Tokenizer:
    """BERT's WordPiece: `[CLS] tokens [SEP]`; accents are stripped when (and only when) lower-casing."""
    # One token a line, its id the line number, trailing whitespace trimmed (as transformers 5 reads it).
    vocab: dict[str, int] = models.WordPiece.read_file(str(vocab_txt))
    cls_id = _require(vocab, "[CLS]", vocab_txt)
    sep_id = _require(vocab, "[SEP]", vocab_txt)
    _require(vocab, "[UNK]", vocab_txt)

    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.add_special_tokens([token for token in BERT_SPECIALS if token in vocab])
    return tokenizer


SPIECE_SPACE = "▁"  # SentencePiece's visible space: every word starts with it
UNIGRAM, UNKNOWN, CONTROL = 1, 2, 3  # ModelProto's model type and piece types


def sentencepiece_unigram(spiece_model: Path, siglip: bool = False, lowercase: bool = True, eos: str = "</s>") -> Tokenizer:
    """A SentencePiece unigram model (spiece.model: SigLIP, T5) as `tokens </s>`: its pieces and scores, its own
    normalizer (the precompiled character map) and its word split at every `▁`, read with the sentencepiece
    package's model description. `siglip`: SiglipTokenizer's text first: `▁` + the text lower-cased (`lowercase`),
    ASCII punctuation removed, whitespace runs collapsed, stripped; then no further dummy prefix."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(spiece_model).read_bytes())
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError: not a SentencePiece model
        raise ValueError(f"{str(spiece_model)!r} is not a SentencePiece model: {error}") from None
    if proto.trainer_spec.model_type != UNIGRAM:
        raise ValueError(f"{str(spiece_model)!r} is a SentencePiece model of type {proto.trainer_spec.model_type}; "
                         "vlfm reads unigram ones (SigLIP, T5)")  # fmt: skip
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    tokenizer = Tokenizer(models.Unigram(vocab, proto.trainer_spec.unk_id, proto.trainer_spec.byte_fallback))
    steps = []
    if siglip:
        steps += [normalizers.Replace(SPIECE_SPACE, " "), normalizers.Prepend(SPIECE_SPACE)]
        steps += [normalizers.Lowercase()] if lowercase else []
        steps += [normalizers.Replace(Regex(f"[{re.escape(string.punctuation)}]"), ""),
                  normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]  # fmt: skip
    spec = proto.normalizer_spec
    steps += [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # (SigLIP's leading `▁`, a space by now, stands after the text's start)
        edges = r" +\z" if siglip else r"\A +| +\z"
        steps += [normalizers.Replace(Regex(edges), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    tokenizer.normalizer = normalizers.Sequence(steps)
    prepend = "always" if spec.add_dummy_prefix and not siglip else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme=prepend, split=True)
    tokenizer.decoder = decoders.Metaspace(replacement=SPIECE_SPACE, prepend_scheme=prepend)
    eos_id = _require({piece: i for i, (piece, _) in enumerate(vocab)}, eos, spiece_model)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                             special_tokens=[(eos, eos_id)])  # fmt: skip
    tokenizer.add_special_tokens([piece.piece for piece in proto.pieces if piece.type in (UNKNOWN, CONTROL)])
    return tokenizer
