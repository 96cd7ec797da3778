"""The two-tower task: data in memory (rendered world or a caption file), tokenizer, model, loss, evaluation."""

from __future__ import annotations

import dataclasses
import logging
import random

import torch
import torch.nn.functional as F
from PIL import Image

from vlfm.checkpoint import load_state_strict
from vlfm.config import ConfigError, RunConfig
from vlfm.data.shapes import ShapesWorld, captions, render_many
from vlfm.data.shards import is_shard_source, load_shards
from vlfm.data.sources import ImageTextData, load_image_text, read_caption_file
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.transforms import Preprocess, to_uint8_tensor
from vlfm.eval.world import WorldBenchmark
from vlfm.losses import clip_loss, siglip_loss
from vlfm.models.two_tower import TwoTowerModel
from vlfm.train.loop import EpochSampler

log = logging.getLogger("vlfm")


def load_training_data(config: RunConfig, preprocess: Preprocess) -> ImageTextData:
    data = config.data
    if data.source == "shapes":
        if data.world.image_size != config.model.vision.image_size:
            raise ConfigError(f"data.world.image_size={data.world.image_size} differs from model.vision.image_size="
                              f"{config.model.vision.image_size}; set both to the same value")
        images, scenes = render_many(ShapesWorld(data.world), "train", data.train_size, workers=data.workers)
        return ImageTextData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [captions(s) for s in scenes])
    if is_shard_source(data.source):
        return load_shards(data.source, preprocess)
    rows = read_caption_file(data.source, data.image_column, data.caption_column)
    return load_image_text(rows, preprocess)


class ContrastiveTask:
    def __init__(self, config: RunConfig, device: torch.device, tokenizer: Tokenizer | None = None):
        self.config = config
        self.device = device
        self.preprocess = Preprocess(image_size=config.model.vision.image_size)
        self.data = load_training_data(config, self.preprocess)
        log.info("training data: %d images (%d skipped as undecodable)", len(self.data), self.data.skipped)
        all_captions = [c for caps in self.data.captions for c in caps]
        pretrained = self._pretrained_text(config) if config.model.text_init else None
        if pretrained is not None:
            tokenizer = pretrained.tokenizer
        elif config.train.lock_text:
            raise ConfigError("train.lock_text=true needs model.text_init (the pretrained text tower to lock)")
        else:
            if tokenizer is None:
                tokenizer = Tokenizer.train(all_captions, vocab_size=config.model.text.vocab_size)
            if tokenizer.vocab_size > config.model.text.vocab_size:
                raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is "
                                  f"{config.model.text.vocab_size}; raise model.text.vocab_size")
            config.model.text.eos_token_id, config.model.text.pad_token_id = tokenizer.eos_id, tokenizer.pad_id
        self.model = TwoTowerModel(config.model, tokenizer, self.preprocess).to(device)
        if pretrained is not None:
            load_state_strict(self.model.text, pretrained.text.state_dict(), f"model.text_init={config.model.text_init}")
        self.model.set_grad_checkpointing(config.train.grad_checkpointing)

        # Tokenize each distinct caption once; a training step only indexes into these tensors.
        vocabulary = {c: i for i, c in enumerate(dict.fromkeys(all_captions))}
        text = config.model.text
        self.caption_ids, self.caption_mask = tokenizer(list(vocabulary), text.context_length, pad_to_context=text.pool == "end")
        self.text_features = None
        if config.train.lock_text:  # LiT: the text side never changes, so every caption is embedded once
            self.model.text.requires_grad_(False)
            self.text_features = self._embed_captions()
            log.info("locked text tower: %d distinct captions embedded once", len(self.text_features))
        flat = [vocabulary[c] for caps in self.data.captions for c in caps]
        counts = [len(caps) for caps in self.data.captions]
        self.flat_captions = torch.tensor(flat)
        self.caption_counts = torch.tensor(counts)
        self.caption_offsets = torch.cumsum(torch.tensor([0] + counts[:-1]), 0)
        self.sampler = EpochSampler(len(self.data), config.train)
        self.benchmark = None
        if config.data.source == "shapes" and (config.data.classify_size or config.data.eval_size):
            self.benchmark = WorldBenchmark(config.data.world, config.data.classify_size, config.data.eval_size,
                                            workers=config.data.workers)

    @staticmethod
    def _pretrained_text(config: RunConfig):
        """The text tower named by model.text_init; its config replaces model.text (recorded in the run's config)."""
        from vlfm.checkpoint import load

        pretrained = load(config.model.text_init)
        if pretrained.tokenizer is None:
            raise ConfigError(f"model.text_init={config.model.text_init} has no tokenizer; a text tower needs one")
        try:
            config.model = dataclasses.replace(config.model, text=dataclasses.replace(pretrained.text.config))
        except ConfigError as error:
            raise ConfigError(f"model.text_init={config.model.text_init}: {error}") from None
        log.info("text tower from %s: %s", config.model.text_init, config.model.text)
        return pretrained

    @torch.no_grad()
    def _embed_captions(self, batch_size: int = 512) -> torch.Tensor:
        """Normalised features of every distinct caption, in batches of similar length (little padding)."""
        lengths = self.caption_mask.sum(dim=1)
        order = lengths.argsort()
        out = torch.empty(len(order), self.model.config.embed_dim, device=self.device)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            length = int(lengths[rows].max())
            ids, mask = self.caption_ids[rows, :length].to(self.device), self.caption_mask[rows, :length].to(self.device)
            out[rows.to(self.device)] = F.normalize(self.model.encode_text(ids, mask).float(), dim=-1)
        return out

    def batch_size(self) -> int:
        return self.config.train.batch_size

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """The micro-batch at a data position: a pure function of (seed, step, micro), so resume is exact."""
        train = self.config.train
        indices = self.sampler(step, micro)
        generator = torch.Generator().manual_seed((train.seed * 1_000_003 + step) * 64 + micro)
        pick = (torch.rand(len(indices), generator=generator) * self.caption_counts[indices]).long()
        caption = self.flat_captions[self.caption_offsets[indices] + pick]
        images = self.data.images[indices]
        if self.config.data.augment:
            rng = random.Random(int(generator.initial_seed()))
            images = to_uint8_tensor([self.preprocess.random_resized_crop(_to_pil(img), rng) for img in images])
        mask = self.caption_mask[caption]
        length = int(mask.sum(dim=1).max())  # trim shared padding: text cost follows the longest caption
        return {"images": images, "input_ids": self.caption_ids[caption, :length], "attention_mask": mask[:, :length],
                "caption": caption}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.device
        pixels = self.preprocess.normalize(batch["images"].to(device, non_blocking=True))
        if self.text_features is not None:
            image = F.normalize(self.model.encode_image(pixels), dim=-1)
            text, scale, bias = self.text_features[batch["caption"].to(device)], self.model.logit_scale.exp(), self.model.logit_bias
        else:
            image, text, scale, bias = self.model(pixels, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        positives = None
        if self.config.train.multi_positive:
            caption = batch["caption"].to(device)
            positives = caption[:, None] == caption[None, :]
        image, text = image.float(), text.float()
        if bias is None:
            loss = clip_loss(image, text, scale.float(), positives)
            return loss, {"loss": loss.item(), "logit_scale": scale.item()}
        loss = siglip_loss(image, text, scale.float(), bias.float(), positives)
        return loss, {"loss": loss.item(), "logit_scale": scale.item(), "logit_bias": bias.item()}

    def after_step(self) -> None:
        if self.config.model.kind == "clip":
            self.model.clamp_logit_scale()

    def evaluate(self) -> dict[str, float]:
        return self.benchmark.evaluate(self.model) if self.benchmark else {}


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())
