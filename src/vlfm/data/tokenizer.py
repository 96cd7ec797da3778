"""A tokenizer backed by the `tokenizers` library: train a byte-level BPE on captions, or load tokenizer.json
(or a Hugging Face directory's vocab.json + merges.txt / vocab.txt).

Every sequence is `<bos> tokens <eos>` (or the loaded tokenizer's own template, e.g. BERT's `[CLS] ... [SEP]`),
truncated so that the end token survives, and right-padded to the longest text or to the context length.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from vlfm.io import CheckpointError, read_json

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Typed text to the world's (lower-case, British): American spellings, and whitespace before punctuation, runs of
# spaces and repeated ? or ! as people type them. Each rule leaves the world's own text as it is.
TYPED = {r"\bcolor": "colour", r"\bgray": "grey", r"\bcenter\b": "centre", r"\bcenters\b": "centres",
         r"\bcentered\b": "centred",
         r"[ \t]+": " ", r"^ | $": "", r" (?=[?.!,:;])": "", r"\?+": "?", r"!+": "!"}  # fmt: skip


log = logging.getLogger("vlfm")


class Tokenizer:
    """`chat_template`: a Hugging Face tokenizer's or processor's Jinja chat template (data/chat.py renders it);
    `special_tokens`: its named special tokens (bos_token, ...), which templates read."""

    def __init__(self, backend: HFTokenizer, pad_token: str = "<pad>", eos_token: str | None = "<eos>",
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None):  # fmt: skip
        self.backend = backend
        backend.no_padding()  # padding and truncation are done here (a loaded tokenizer.json may carry its own)
        backend.no_truncation()
        self.pad_token, self.eos_token = pad_token, eos_token
        self.chat_template = chat_template
        self.special_tokens = {"pad_token": pad_token, "eos_token": eos_token, **(special_tokens or {})}
        self.pad_id = self.token_id(pad_token)
        self.eos_id = self.token_id(eos_token) if eos_token is not None else None

    def token_id(self, token: str) -> int:
        index = self.backend.token_to_id(token)
        if index is None:
            raise ValueError(f"the tokenizer has no {token!r} token")
        return index

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> Tokenizer:
        backend = HFTokenizer(models.BPE(unk_token="<unk>"))
        backend.normalizer = normalizer()
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        bos, eos = backend.token_to_id("<bos>"), backend.token_to_id("<eos>")
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
        )
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path, pad_token: str = "<pad>", eos_token: str | None = "<eos>") -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        return cls(HFTokenizer.from_file(str(path)), pad_token, eos_token)

    @classmethod
    def from_directory(cls, directory: str | Path) -> Tokenizer | None:
        """A Hugging Face / open_clip model directory's tokenizer: tokenizer.json, else CLIP's vocab.json +
        merges.txt, else SentencePiece's spiece.model (SigLIP, T5), else BERT's vocab.txt; special tokens from
        tokenizer_config.json / special_tokens_map.json.
        None (and a warning) when the directory has none of them."""
        from vlfm.data import hf_tokenizers

        directory = Path(directory)
        special = _special_tokens(directory)
        if (directory / "tokenizer.json").is_file():
            try:
                backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as error:  # the tokenizers library raises plain Exceptions for a file it cannot read
                raise CheckpointError(f"{directory / 'tokenizer.json'} is damaged: {error}") from None
            if backend.token_to_id("<pad>") is not None:  # one of vlfm's own
                special = {"pad_token": "<pad>", "eos_token": "<eos>", **special}
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            backend = hf_tokenizers.clip_bpe(directory / "vocab.json", directory / "merges.txt")
            special = {"pad_token": "<|endoftext|>", "eos_token": "<|endoftext|>", **special}
        elif (directory / "spiece.model").is_file():
            try:
                backend = hf_tokenizers.sentencepiece_unigram(directory / "spiece.model", _is_siglip(directory),
                                                              special.get("do_lower_case", True), special.get("eos_token", "</s>"))  # fmt: skip
            except ValueError as error:
                raise CheckpointError(str(error)) from None
            special = {"pad_token": "</s>", "eos_token": "</s>", **special}
        elif (directory / "vocab.txt").is_file():
            backend = hf_tokenizers.bert_wordpiece(directory / "vocab.txt", lowercase=special.get("do_lower_case", True))
            special = {"pad_token": "[PAD]", "eos_token": "[SEP]", **special}
        else:
            log.warning("%s has no tokenizer (tokenizer.json, vocab.json + merges.txt, spiece.model or vocab.txt): "
                        "images can be embedded, texts cannot until one is provided", directory)
            return None
        pad = special.get("pad_token") or special.get("eos_token")
        eos = special.get("eos_token") or special.get("sep_token")
        if pad is None:
            raise CheckpointError(f"{directory}: the tokenizer names no pad token (tokenizer_config.json 'pad_token')")
        names = {k: v for k, v in special.items() if k.endswith("_token") and isinstance(v, str)}
        try:
            return cls(backend, pad, eos, _chat_template(directory), names)
        except ValueError as error:  # a special token the vocabulary lacks
            raise CheckpointError(f"{directory}: {error}") from None

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))
        config = {**self.special_tokens, "pad_token": self.pad_token, "eos_token": self.eos_token}
        config.update({"chat_template": self.chat_template} if self.chat_template else {})
        Path(path).with_name("tokenizer_config.json").write_text(json.dumps(config, indent=2))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def __call__(
        self, texts: str | list[str], context_length: int, pad_to_context: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both (B, L) int64: L is the context length, or the longest text in
        the batch when pad_to_context is false."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.backend.encode_batch(list(texts))
        if not pad_to_context:
            context_length = min(context_length, max((len(e.ids) for e in encodings), default=1))
        ids = torch.full((len(encodings), context_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            tokens = encoding.ids
            if len(tokens) > context_length:  # keep the end-of-text token: pooling reads it
                tokens = tokens[: context_length - 1] + [tokens[-1]]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask

    def encode(self, text: str, special_tokens: bool = False) -> list[int]:
        """Token ids of a text alone, without the `<bos> ... <eos>` template: pieces to concatenate (chat); with
        `special_tokens`, inside the tokenizer's own template (a rendered chat template that lacks them)."""
        return self.backend.encode(text, add_special_tokens=special_tokens).ids

    @property
    def bos_id(self) -> int | None:
        """The token the tokenizer's own template puts before a text (vlfm's `<bos>`, Llama 3's
        `<|begin_of_text|>`), or None where it puts none (Qwen2)."""
        with_template, plain = self.backend.encode("a").ids, self.encode("a")
        return with_template[0] if with_template[: len(plain)] != plain else None

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=True).strip()


def normalizer() -> normalizers.Normalizer:
    """A trained tokenizer's normaliser, saved in its tokenizer.json: NFKC, lower case, then TYPED. Tokenizers
    saved before TYPED keep their own (NFKC and lower case), so their ids never change."""
    rules = [normalizers.Replace(Regex(pattern), content) for pattern, content in TYPED.items()]
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), *rules])


def _chat_template(directory: Path) -> str | None:
    """The chat template beside a tokenizer: chat_template.jinja, else chat_template.json (a processor's, as
    LLaVA saves it), else tokenizer_config.json's `chat_template` (its default one where it names several)."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = read_json(directory / name).get("chat_template") if (directory / name).is_file() else None
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None


def _is_siglip(directory: Path) -> bool:
    """Whether spiece.model is read as SiglipTokenizer reads it (tokenizer_config.json's tokenizer_class, else
    config.json's model_type), rather than as plain SentencePiece (T5)."""
    for name, key in (("tokenizer_config.json", "tokenizer_class"), ("config.json", "model_type")):
        if (directory / name).is_file() and key in (meta := read_json(directory / name)):
            return str(meta[key]).lower().startswith("siglip")
    return False


def _special_tokens(directory: Path) -> dict:
    """Special-token names (and do_lower_case) from tokenizer_config.json, then special_tokens_map.json."""
    found: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            for key, value in read_json(path).items():
                if isinstance(value, dict) and "content" in value:
                    value = value["content"]
                if key.endswith("_token") and isinstance(value, str) or key == "do_lower_case":
                    found[key] = value
    return found
