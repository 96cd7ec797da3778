"""A LLaVA-style assistant: vision tower -> projector -> language model.

The prompt carries one `<image>` placeholder per image, expanded to `image_tokens` copies when tokenized; the
LM's input embeddings at those positions are replaced by the projected image features (hidden states of an
inner vision block, class token dropped, as LLaVA does). Everything else is an ordinary causal LM, so
generation reuses `LanguageModel.generate` with the KV cache.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from vlfm.config import VLMConfig
from vlfm.data.chat import (
    TEMPLATES,
    Conversation,
    encode_prompt,
    encode_with_chat_template,
    expand_image_tokens,
)
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.transforms import Preprocess
from vlfm.io import CheckpointError, open_image
from vlfm.models.base import SavedModel, register
from vlfm.models.lm import LanguageModel
from vlfm.models.projector import Projector
from vlfm.models.vit import VisionTransformer


@register
class VisionLanguageModel(SavedModel, nn.Module):
    ARCHITECTURE = "vlfm.VisionLanguageModel"
    CONFIG = VLMConfig

    def __init__(self, config: VLMConfig, tokenizer: Tokenizer | None = None, preprocess: Preprocess | None = None):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)  # no output projection: the projector reads token states
        self.projector = Projector(config.projector, config.vision.width, config.lm.width, config.shuffle_factor)
        self.lm = LanguageModel(config.lm)
        tokens = self.projector.tokens_out(self.vision.grid**2)
        # Where each image token sits, added to its features: the LM's attention reads values, which RoPE does not
        # touch, so without this "left of" has to survive in the vision features. A 2-D sine code at the scale of
        # the projected features (RMS ~1, ten times the token embeddings'), learned from there.
        grid = int(tokens**0.5)
        self.image_pos = nn.Parameter(sincos_2d(grid, config.lm.width)) if config.image_pos_embed else None
        self.tokenizer = tokenizer
        self.preprocess_config = preprocess or Preprocess(image_size=config.vision.image_size)

    @property
    def image_tokens(self) -> int:
        """LM positions one image occupies."""
        return self.projector.tokens_out(self.vision.grid**2)

    @property
    def device(self) -> torch.device:
        return self.lm.embed_tokens.weight.device

    @property
    def template(self):
        return TEMPLATES[self.config.template]

    def train(self, mode: bool = True) -> VisionLanguageModel:
        """A frozen vision tower stays in eval mode: its BatchNorm statistics (conv stem) must not drift."""
        super().train(mode)
        if not any(p.requires_grad for p in self.vision.parameters()):
            self.vision.eval()
        return self

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.vision.transformer.grad_checkpointing = enabled
        self.lm.grad_checkpointing = enabled

    # --- tensors ------------------------------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, image_tokens, LM width)."""
        states = self.vision.hidden_states(pixels, self.config.feature_layer)
        if self.config.vision.class_token:
            states = states[:, 1:]
        features = self.projector(states)
        return features + self.image_pos.to(features.dtype) if self.image_pos is not None else features

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None,
              features: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """LM input embeddings with image features in place of the image tokens (image i fills the i-th run of
        placeholders in reading order). `features`: image_features(pixels) computed beforehand, instead of pixels."""
        embeds = self.lm.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        images = len(features) if features is not None else 0 if pixels is None else len(pixels)
        found, expected = int(is_image.sum()), images * self.image_tokens
        if found != expected:
            raise ValueError(f"the input holds {found} image-token positions but {images} image(s) x "
                             f"{self.image_tokens} tokens = {expected} are needed; put one "
                             f"{self.config.image_token} per image in the prompt")
        if not images:
            return embeds
        features = (self.image_features(pixels) if features is None else features).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.reshape(-1, features.shape[-1]))

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Next-token logits (B, L, vocab), or (N, vocab) at the `logits_at` positions (LanguageModel.forward)."""
        inputs_embeds = self.embed(input_ids, pixels, features)
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, logits_at=logits_at)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor | None = None,
                 **generation) -> list[list[int]]:  # fmt: skip
        """New token ids per row (left-padded prompts); `generation`: LanguageModel.generate's options."""
        generation.setdefault("stop_tokens", self.stop_tokens())
        return self.lm.generate(inputs_embeds=self.embed(input_ids, pixels), attention_mask=attention_mask, **generation)

    def stop_tokens(self) -> list[int]:
        t = self.tokenizer
        ids = [t.backend.token_to_id(self.template.end), t.eos_id] if t is not None else []  # eos: a chat template's end
        ids += [self.config.lm.eos_token_id]
        return [i for i in dict.fromkeys(ids) if i is not None]

    # --- raw inputs ---------------------------------------------------------------------------------
    def preprocess(self, images: Image.Image | list[Image.Image]) -> torch.Tensor:
        return self.preprocess_config(images)

    def prompt_ids(self, conversation: Conversation, images: int) -> list[int]:
        """Token ids of a conversation ending with a user turn, followed by the assistant's opening (the
        tokenizer's own chat template where it has one, else the model's), with the image placeholders expanded;
        `images` says how many images come with it."""
        if self.tokenizer is None:
            raise CheckpointError(
                "this assistant has no tokenizer, so it cannot read a prompt: its directory had no tokenizer.json; "
                "save the model with its tokenizer (copy tokenizer.json of the run that trained it beside the "
                "weights), or pass one: VisionLanguageModel(config, tokenizer)"
            )
        if self.tokenizer.chat_template:  # a Hugging Face checkpoint's own template, as transformers renders it
            ids = encode_with_chat_template(conversation, self.tokenizer)
        else:
            ids = encode_prompt(conversation, self.tokenizer, self.template)
        ids, _ = expand_image_tokens(ids, [-100] * len(ids), self.config.image_token_id, self.image_tokens, images)
        return ids

    def chat_prompt(self, question: str, history: Conversation | None = None) -> list[int]:
        """The prompt ids `chat` generates from: `history`, then `question` with the image placeholder before it
        unless an earlier turn holds it."""
        conversation = list(history or []) + [("user", question)]
        if not any(self.config.image_token in t for _, t in conversation):
            conversation[-1] = ("user", f"{self.config.image_token}\n{question}")
        return self.prompt_ids(conversation, images=1)

    @torch.inference_mode()
    def chat(self, image, question, history: Conversation | list[Conversation] | None = None,
             max_new_tokens: int = 64, **generation) -> str | list[str]:  # fmt: skip
        """Answer `question` about `image` (a PIL image or a path); lists of both answer a batch. `history`:
        earlier turns (the first user turn then holds the image placeholder). Greedy unless temperature > 0."""
        batch = isinstance(question, (list, tuple))
        images, questions = (list(image), list(question)) if batch else ([image], [question])
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        histories = list(history) if batch and history else [list(history or [])] * len(questions)
        rows = []
        for img, text, past in zip(images, questions, histories):
            if img is None:
                raise ValueError("this model answers questions about an image: pass one (image=...)")
            rows.append(self.chat_prompt(text, past))
        pixels = self.preprocess([open_image(i) for i in images]).to(self.device)
        ids, mask = left_pad(rows, self.tokenizer.pad_id)
        room = self.config.lm.max_positions - ids.shape[1]
        if room < 1:
            raise ValueError(f"the prompt is {ids.shape[1]} tokens (image included); the context holds "
                             f"max_positions={self.config.lm.max_positions}: shorten the question or the history")
        max_new_tokens = min(max_new_tokens, room)  # the answer may use what the context has left
        was_training = self.training
        self.eval()
        out = self.generate(ids.to(self.device), mask.to(self.device), pixels, max_new_tokens=max_new_tokens, **generation)
        self.train(was_training)
        answers = [self.tokenizer.decode(tokens) for tokens in out]
        return answers if batch else answers[0]


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(1, grid*grid, width): sin/cos of the row in the first half of the channels, of the column in the second."""
    quarter = width // 4
    frequencies = 1.0 / 100.0 ** (torch.arange(quarter) / max(1, quarter))
    steps = torch.arange(grid, dtype=torch.float32)[:, None] * frequencies  # (grid, quarter)
    code = torch.cat([steps.sin(), steps.cos()], dim=1)  # (grid, width // 2)
    rows, cols = code[:, None].expand(grid, grid, -1), code[None, :].expand(grid, grid, -1)
    out = torch.zeros(grid * grid, width)
    out[:, : 4 * quarter] = torch.cat([rows, cols], dim=2).reshape(grid * grid, -1)
    return out[None]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids, mask), both (B, longest), padded on the left so every prompt ends at the last column."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, longest - len(row):] = 1
    return ids, mask
