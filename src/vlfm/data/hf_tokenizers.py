"""Build `tokenizers.Tokenizer` objects from the legacy ("slow") tokenizer files of Hugging Face models,
so that text is tokenized exactly as transformers does it, without importing transformers."""

from __future__ import annotations

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
