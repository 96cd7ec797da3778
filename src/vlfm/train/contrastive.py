"""The two-tower task: data in memory (rendered world, a caption file, shards) or streamed from shards
(data.stream), tokenizer, model, loss, evaluation.

Under torchrun each rank takes its slice of every global batch (a stream: its own batches from its own shards)
and the loss spans the global batch (features gathered across ranks, caption ids, or for a stream a hash of the
caption text, as keys so repeated captions stay positives across ranks)."""

from __future__ import annotations

import dataclasses
import logging
import random

import torch
import torch.nn.functional as F
from PIL import Image

from vlfm import distributed
from vlfm.config import ConfigError, RunConfig
from vlfm.data.draw import render_many
from vlfm.data.shapes import ShapesWorld
from vlfm.data.shards import is_shard_source, load_shards
from vlfm.data.sources import ImageTextData, load_image_text, read_caption_file
from vlfm.data.stream import ShardBatches, tokenize_batch
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.transforms import Preprocess, to_uint8_tensor
from vlfm.data.world_text import captions
from vlfm.eval.world import WorldBenchmark
from vlfm.io import load_state_strict
from vlfm.losses import make_loss
from vlfm.models.two_tower import TwoTowerModel
from vlfm.nn import autocast
from vlfm.train.gradcache import gradcache_step
from vlfm.train.loop import EpochSampler, Task

log = logging.getLogger("vlfm")


def load_training_data(config: RunConfig, preprocess: Preprocess) -> ImageTextData:
    data = config.data
    if data.source == "shapes":
        if data.world.image_size != config.model.vision.image_size:
            raise ConfigError(f"data.world.image_size={data.world.image_size} differs from model.vision.image_size="
                              f"{config.model.vision.image_size}; set both to the same value")
        images, scenes = render_many(ShapesWorld(data.world), "train", data.train_size, workers=data.workers)
        return ImageTextData(torch.from_numpy(images), [captions(s) for s in scenes])
    if is_shard_source(data.source):
        return load_shards(data.source, preprocess, data.max_pixels)
    rows = read_caption_file(data.source, data.image_column, data.caption_column)
    return load_image_text(rows, preprocess, data.max_pixels)


class ContrastiveTask(Task):
    def __init__(self, config: RunConfig, device: torch.device, tokenizer: Tokenizer | None = None):
        check_parallel_config(config)
        self.config = config
        self.device = device
        self.local_rows = distributed.local_batch_size(config.train.batch_size)
        self.preprocess = Preprocess(image_size=config.model.vision.image_size)
        self.stream = None
        if config.data.stream:  # batches come from the stream in order; a new tokenizer learns its first captions
            data, train = config.data, config.train
            self.stream = ShardBatches(data.source, self.preprocess, self.local_rows, train.seed, data.workers,
                                       data.shuffle_buffer, data.augment, max_pixels=data.max_pixels)  # fmt: skip
            needed = tokenizer is None and not config.model.text_init
            all_captions = self.stream.first_captions() if needed else []
            log.info("streaming %d shard(s) from %s", len(self.stream.urls), data.source)
        else:
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
        self.tokenizer = tokenizer
        self.model = TwoTowerModel(config.model, tokenizer, self.preprocess).to(device)
        if pretrained is not None:
            load_state_strict(self.model.text, pretrained.text.state_dict(), f"model.text_init={config.model.text_init}")
        self.model.set_grad_checkpointing(config.train.grad_checkpointing)
        self.train_model = self.model  # the loop replaces it with the DDP wrapper or the sharded model
        self.lr_mults = {"logit_": config.train.logit_lr_mult}  # the temperature (and bias) may learn faster
        train = config.train
        self.loss_fn = make_loss(config.model.kind, train.multi_positive, train.loss_chunk,
                                 config.distributed.local_loss)  # fmt: skip
        self.text_features: torch.Tensor | None = None  # LiT: every caption's features, embedded once
        self.benchmark = None
        if config.data.source == "shapes" and (config.data.classify_size or config.data.eval_size):
            self.benchmark = WorldBenchmark(config.data.world, config.data.classify_size, config.data.eval_size,
                                            workers=config.data.workers, ood_per_class=config.data.ood_per_class)
        if self.stream is None:
            self._index_captions(all_captions)

    def _index_captions(self, all_captions: list[str]) -> None:
        """In-memory data: tokenize each distinct caption once; a training step only indexes these tensors."""
        config, tokenizer = self.config, self.tokenizer
        vocabulary = {c: i for i, c in enumerate(dict.fromkeys(all_captions))}
        text = config.model.text
        self.caption_ids, self.caption_mask = tokenizer(list(vocabulary), text.context_length, pad_to_context=text.pool == "end")
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
            length = self._text_length(lengths[rows].max())
            ids, mask = self.caption_ids[rows, :length].to(self.device), self.caption_mask[rows, :length].to(self.device)
            out[rows.to(self.device)] = F.normalize(self.model.encode_text(ids, mask).float(), dim=-1)
        return out

    def batch_size(self) -> int:
        return self.config.train.batch_size

    def _text_length(self, longest: torch.Tensor) -> int:
        """Positions a text batch keeps: up to its longest caption (shared padding trimmed, so text cost follows
        the captions), or the whole context for a tower pooled at the end, which reads the padding as inference does."""
        text = self.config.model.text
        return text.context_length if text.pool == "end" else int(longest)

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This rank's slice of the micro-batch at a data position: a pure function of (seed, position), so resume
        is exact and the global batch is the same whatever the world size or micro-batch split. A stream gives
        its next batch (resume restores its position: data_state)."""
        train, me = self.config.train, distributed.rank()
        if self.stream is not None:
            text = self.config.model.text
            batch = self.stream.next(step * train.grad_accum + micro)
            return tokenize_batch(batch, self.tokenizer, text.context_length, pad_to_context=text.pool == "end")
        mine = slice(me * self.local_rows, (me + 1) * self.local_rows)
        positions = self.sampler.positions(step, micro)[mine]
        indices = self.sampler.indices(positions)
        # The step's caption draws come from one generator, so they do not depend on how the step is cut.
        generator = torch.Generator().manual_seed((train.seed * 1_000_003 + step) * 64)
        draws = torch.rand(train.grad_accum, train.batch_size, generator=generator)[micro, mine]
        pick = (draws * self.caption_counts[indices]).long()
        caption = self.flat_captions[self.caption_offsets[indices] + pick]
        images = self.data.images[indices]
        if self.config.data.augment:  # a crop per sample position: every rank and every sample draws its own
            crop = self.preprocess.random_resized_crop
            images = to_uint8_tensor([crop(_to_pil(img), random.Random(f"{train.seed}/{p}")) for img, p in zip(images, positions.tolist())])
        out = {"images": images, "caption": caption}
        mask = self.caption_mask[caption]
        length = self._text_length(mask.sum(dim=1).max())
        out["input_ids"], out["attention_mask"] = self.caption_ids[caption, :length], mask[:, :length]
        return out

    def data_state(self) -> dict | None:
        """The stream's position for the training checkpoint (None: in-memory data, whose position is the step)."""
        return self.stream.state() if self.stream is not None else None

    def load_data_state(self, state: dict | None) -> None:
        if (state is None) != (self.stream is None):
            raise ConfigError(f"the checkpoint was trained with data.stream={str(state is not None).lower()}; resume "
                              "with the same data.stream setting")  # fmt: skip
        if self.stream is not None:
            self.stream.load_state(state)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.text_features is not None:
            image, text = self._encode_image(batch), self._encode_text(batch)
            scale, bias = self.model.logit_scale.exp(), self.model.logit_bias
        else:
            pixels = self.preprocess.normalize(batch["images"].to(self.device, non_blocking=True))
            image, text, scale, bias = self.train_model(pixels, batch["input_ids"].to(self.device),
                                                        batch["attention_mask"].to(self.device))
        loss = self.contrastive_loss(image, text, scale, bias, self._keys([batch]))
        return loss, self._info(loss, scale, bias)

    def backward(self, step: int, config, device: torch.device, scaler) -> dict[str, float]:
        if not self.config.train.gradcache:
            return super().backward(step, config, device, scaler)
        return self.gradcache_backward(step)

    def gradcache_backward(self, step: int) -> dict[str, float]:
        """One optimizer step's gradients over all grad_accum micro-batches as one batch (GradCache): the loss
        sees every negative of the step, activations are held one micro-batch at a time."""
        batches = [self.batch(step, micro) for micro in range(self.config.train.grad_accum)]
        keys = self._keys(batches)

        def loss_fn(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            return self.contrastive_loss(image, text, self.model.logit_scale.exp(), self.model.logit_bias, keys)

        loss = gradcache_step(self._encode_image, self._encode_text, batches, batches, loss_fn)
        if distributed.world_size() > 1:  # the encoders ran outside DDP's forward: average as DDP would
            distributed.average_gradients(self.model)
        return self._info(loss, self.model.logit_scale.exp(), self.model.logit_bias)

    def _encode_image(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels = self.preprocess.normalize(batch["images"].to(self.device, non_blocking=True))
        with autocast(self.device, self.config.train.precision):
            return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def _encode_text(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features of the batch's captions."""
        if self.text_features is not None:
            return self.text_features[batch["caption"].to(self.device)]
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        with autocast(self.device, self.config.train.precision):
            return F.normalize(self.model.encode_text(ids, mask).float(), dim=-1)

    def _keys(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Caption ids: equal ids are positives of each other (with train.multi_positive: see make_loss)."""
        return torch.cat([b["caption"] for b in batches]).to(self.device)

    def contrastive_loss(self, image, text, scale, bias, keys) -> torch.Tensor:
        """The run's loss (make_loss: full, chunked or across ranks) in fp32 whatever the autocast."""
        return self.loss_fn(image.float(), text.float(), scale.float(), None if bias is None else bias.float(), keys)

    def _info(self, loss: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> dict[str, float]:
        """Logged values; the loss averaged over ranks (a rank's part of a local or ring loss is not the whole),
        and with a stream the images skipped so far, summed over ranks."""
        skipped = float(self.stream.skipped()) if self.stream is not None else 0.0
        values = torch.tensor([loss.item(), skipped], dtype=torch.float64, device=loss.device)  # counts stay exact
        if distributed.world_size() > 1:
            gathered = distributed.all_gather(values.reshape(1, 2))
            values = torch.stack([gathered[:, 0].mean(), gathered[:, 1].sum()])
        info = {"loss": values[0].item(), "logit_scale": scale.item()}
        if self.stream is not None:
            info["skipped"] = int(values[1].item())
        if bias is not None:
            info["logit_bias"] = bias.item()
        return info

    def after_step(self) -> None:
        if self.config.model.kind == "clip":
            self.model.clamp_logit_scale()

    def evaluate(self) -> dict[str, float]:
        return self.benchmark.evaluate(self.model) if self.benchmark else {}


def check_parallel_config(config: RunConfig) -> None:
    """Refuse combinations that the task (or its distributed paths) does not take, before any data is built."""
    train, parallel = config.train, config.distributed
    if parallel.local_loss and train.loss_chunk:
        raise ConfigError("distributed.local_loss already holds only local x global logits; set train.loss_chunk=0")
    if distributed.world_size() > 1:
        if train.lock_text and not train.gradcache:
            raise ConfigError("train.lock_text under torchrun needs train.gradcache=true (its step syncs gradients itself)")
        if train.gradcache and parallel.strategy == "fsdp":
            raise ConfigError("train.gradcache=true runs with distributed.strategy=ddp, not fsdp")
    if train.lock_text and config.data.stream:
        raise ConfigError("train.lock_text embeds every caption once before training; it does not take "
                          "data.stream=true (set data.stream=false to load the shards into memory)")


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())
