"""A tokenizer backed by the `tokenizers` library: train a byte-level BPE on captions, or load tokenizer.json.

Every sequence is `<bos> tokens <eos>`, truncated so that <eos> survives, and right-padded with <pad> to the
context length; the model pools at <eos> (CLIP) or at the last real token (SigLIP).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


class Tokenizer:
    def __init__(self, backend: HFTokenizer, pad_token: str = "<pad>", eos_token: str = "<eos>"):
        self.backend = backend
        self.pad_token, self.eos_token = pad_token, eos_token
        self.pad_id = self._id(pad_token)
        self.eos_id = self._id(eos_token)

    def _id(self, token: str) -> int:
        index = self.backend.token_to_id(token)
        if index is None:
            raise ValueError(f"the tokenizer has no {token!r} token")
        return index

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> Tokenizer:
        backend = HFTokenizer(models.BPE(unk_token="<unk>"))
        backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
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
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def __call__(self, texts: str | list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both (B, context_length) int64."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.backend.encode_batch(list(texts))
        ids = torch.full((len(encodings), context_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            tokens = encoding.ids
            if len(tokens) > context_length:  # keep the end-of-text token: pooling reads it
                tokens = tokens[: context_length - 1] + [tokens[-1]]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=True).strip()
