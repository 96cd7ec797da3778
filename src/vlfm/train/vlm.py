"""VLM training in stages, each a task on the one training loop (train/loop.py).

stage 0  the LM alone on the world's text, only when no pretrained LM is given (model.lm_init): it learns the
         language and the chat template
stage 1  vision tower and LM frozen; the projector learns to put image features into the LM's input space,
         on captions ("describe the image")
stage 2  projector + LM (all weights, or LoRA adapters), vision frozen unless stage2.vision_lr > 0, on the
         instructions (captions, colour/shape/count/position/existence questions, multi-turn)
Each stage starts from the previous stage's model and writes run_dir/stageN/ (checkpoints, metrics.jsonl,
model/); run_dir/model/ is the finished assistant and run_dir/eval.json its VQA accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import torch
import torch.nn.functional as F

from vlfm.adapt.lora import add_lora, merge_lora, save_adapter
from vlfm.checkpoint import latest_checkpoint
from vlfm.config import ConfigError, StageConfig, TrainConfig, VLMRunConfig
from vlfm.data.chat import (
    CAPTION_REQUESTS,
    IMAGE_TOKEN,
    TEMPLATES,
    add_chat_tokens,
    encode_conversation,
    expand_image_tokens,
    read_llava_json,
    world_conversations,
    world_text,
)
from vlfm.data.shapes import ShapesWorld, WorldConfig, render_many
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.transforms import Preprocess, to_uint8_tensor
from vlfm.data.world_text import captions
from vlfm.eval.vqa import VQASet, vqa_accuracy
from vlfm.io import decode_image, load_state_strict
from vlfm.models.vlm import VisionLanguageModel
from vlfm.train.loop import EpochSampler, Task

log = logging.getLogger("vlfm")
IGNORE = -100


# --- building the model ---------------------------------------------------------------------------------
def build_model(config: VLMRunConfig) -> VisionLanguageModel:
    """A fresh VLM from the configured parts: the vision tower of model.vision_init, the LM of model.lm_init
    (else a new LM with a tokenizer trained on the world's text), chat markers and the image token added."""
    import vlfm

    model_config, preprocess, vision_state = config.model, None, None
    if model_config.vision_init:
        tower = vlfm.load(model_config.vision_init)
        if not hasattr(tower, "visual"):
            raise ConfigError(f"model.vision_init={model_config.vision_init} is a {type(tower).__name__}, not an "
                              "image-text model: give a CLIP / SigLIP checkpoint (vlfm, Hugging Face or open_clip)")
        model_config.vision = dataclasses.replace(tower.config.vision)
        preprocess = tower.preprocess_config
        vision_state = {k: v for k, v in tower.visual.state_dict().items() if not k.startswith("proj.")}
    else:
        log.warning("model.vision_init is not set: the vision tower starts random (train it with stage2.vision_lr > 0)")
    template = TEMPLATES[model_config.template]
    lm_state = None
    if model_config.lm_init:
        lm = vlfm.load(model_config.lm_init)
        if type(lm).__name__ != "LanguageModel" or lm.tokenizer is None:
            raise ConfigError(f"model.lm_init={model_config.lm_init} is not a language model with a tokenizer (give a "
                              "Hugging Face Llama / Qwen2 / SmolLM directory or a saved vlfm LanguageModel)")
        tokenizer = lm.tokenizer
        model_config.lm = dataclasses.replace(lm.config)
        lm_state = lm.state_dict()
    else:
        texts = world_text(world_scenes(config, config.data.text_size), template, np.random.default_rng(config.train.seed),
                           config.data.world.held_out, config.data.count_questions)
        tokenizer = Tokenizer.train(texts, vocab_size=model_config.lm.vocab_size)
    add_chat_tokens(tokenizer, template, model_config.image_token)
    model_config.image_token_id = tokenizer.backend.token_to_id(model_config.image_token)
    if lm_state is None:
        lm = model_config.lm
        lm.vocab_size, lm.pad_token_id, lm.eos_token_id = tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id
        lm.bos_token_id = tokenizer.backend.token_to_id("<bos>")
    model = VisionLanguageModel(model_config, tokenizer, preprocess)
    if lm_state is not None:
        load_state_strict(model.lm, lm_state, str(model_config.lm_init))
    if tokenizer.vocab_size > model.lm.config.vocab_size:  # the template markers and the image token are new
        model.lm.resize_token_embeddings(tokenizer.vocab_size)
    if vision_state is not None:
        load_state_strict(model.vision, vision_state, str(model_config.vision_init))
    return model


def world_scenes(config: VLMRunConfig, n: int, split: str = "train"):
    world = ShapesWorld(config.data.world)
    return [world.scene(split, i) for i in range(n)]


# --- data -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Examples:
    """Token sequences (labels -100 where no loss is taken) and, per sequence, its image row (-1: none)."""

    ids: list[list[int]]
    labels: list[list[int]]
    image: list[int]
    pixels: torch.Tensor  # uint8 (N, 3, H, W)
    skipped: int = 0
    phases: list[int] = dataclasses.field(default_factory=list)  # sequences in each curriculum / focus phase; those rows come first, in phase order


def stage_examples(model: VisionLanguageModel, config: VLMRunConfig, stage: int) -> Examples:
    data, rng = config.data, np.random.default_rng([config.train.seed, stage])
    avoid = data.world.held_out
    tokenizer, template = model.tokenizer, model.template
    if stage == 0:  # text only: every token is a target, except the image placeholder (no image to predict)
        texts = world_text(world_scenes(config, data.text_size), template, rng, avoid, data.count_questions)
        ids = [tokenizer.encode(t)[: data.max_length] for t in texts]
        labels = [[IGNORE if i == model.config.image_token_id else i for i in row] for row in ids]
        return Examples(ids, labels, [-1] * len(ids), torch.empty(0, 3, 1, 1, dtype=torch.uint8))
    curriculum = config.stage2.curriculum_steps if stage == 2 else []
    focus = config.stage2.focus_steps if stage == 2 else 0
    if data.source == "shapes":
        if data.world.image_size != model.config.vision.image_size:
            raise ConfigError(f"data.world.image_size={data.world.image_size} differs from the vision tower's "
                              f"image_size={model.config.vision.image_size}; set data.world.image_size")
        pixels, scenes = render_world(data.world, data.train_size, data.workers)
        pairs = scene_pairs(scenes, stage, rng, config)
        front = []  # the curriculum's phases, in order: phase k asks about scenes of exactly k + 1 objects
        for k, steps in enumerate(curriculum):
            if steps:
                world = dataclasses.replace(data.world, min_objects=k + 1, max_objects=k + 1, object_weights=None)
                more_pixels, more_scenes = render_world(world, max(1, data.train_size // 2), data.workers)
                more = scene_pairs(more_scenes, stage, rng, config)
                front += [(len(pixels) + i, c, k) for i, c in more]
                pixels = torch.cat([pixels, more_pixels])
        if focus:  # then the focus phase: only its kinds of question, about the first half of the training scenes
            more = scene_pairs(scenes[: max(1, data.train_size // 2)], stage, rng, config, config.stage2.focus_kinds)
            front += [(i, c, len(curriculum)) for i, c in more]  # rows of the main render: nothing rendered twice
        triples = front + [(i, c, -1) for i, c in pairs]
    else:
        pixels, pairs = llava_pairs(data.source, data.image_root, model.preprocess_config)
        triples = [(i, c, -1) for i, c in pairs]
    out = Examples([], [], [], pixels, phases=[0] * (len(curriculum) + bool(focus)))
    for image, conversation, phase in triples:
        ids, labels = encode_conversation(conversation, tokenizer, template)
        ids, labels = expand_image_tokens(ids, labels, model.config.image_token_id, model.image_tokens, int(image >= 0))
        if len(ids) > data.max_length:
            out.skipped += 1
            continue
        out.ids.append(ids), out.labels.append(labels), out.image.append(image)
        if phase >= 0:
            out.phases[phase] += 1
    if out.skipped:
        log.info("stage %d: %d sequences longer than data.max_length=%d skipped", stage, out.skipped, data.max_length)
    if not out.ids:
        raise ConfigError(f"stage {stage} has no training sequences (data.source={data.source})")
    if focus and not out.phases[-1]:
        raise ConfigError(f"stage2.focus_kinds={config.stage2.focus_kinds}: the world's scenes ask no such question "
                          f"(data.world: {data.world.min_objects}-{data.world.max_objects} objects)")
    return out


def render_world(world: WorldConfig, n: int, workers: int) -> tuple[torch.Tensor, list]:
    """uint8 [n, 3, H, W] pixels of the world's first `n` training scenes, and the scenes."""
    images, scenes = render_many(ShapesWorld(world), "train", n, workers=workers)
    return torch.from_numpy(images), scenes


def scene_pairs(scenes: list, stage: int, rng: np.random.Generator, config: VLMRunConfig,
                kinds: list[str] | None = None):  # fmt: skip
    """(image row, conversation) pairs of rendered scenes: stage 1 every caption under a random request, stage 2
    the instruction conversations (`kinds`: only those questions, each alone)."""
    data = config.data
    if stage == 1:
        return [(i, [("user", f"{IMAGE_TOKEN}\n{CAPTION_REQUESTS[rng.integers(len(CAPTION_REQUESTS))]}"),
                     ("assistant", text)]) for i, scene in enumerate(scenes) for text in captions(scene)]  # fmt: skip
    return [(i, c) for i, scene in enumerate(scenes)
            for c in world_conversations(scene, rng, data.world.held_out, data.max_turns, data.single_questions,
                                         data.count_questions, kinds)]  # fmt: skip


def llava_pairs(path: str, image_root: str | None, preprocess: Preprocess):
    """(image row, conversation) pairs from a LLaVA JSON file; undecodable images are skipped and counted."""
    try:
        records, skipped = read_llava_json(path, image_root)
    except (ValueError, FileNotFoundError) as error:  # an unknown role, a file that is not JSON, no records
        raise ConfigError(f"data.source={path}: {error}") from None
    images, pairs, rows = [], [], {}
    for record in records:
        row = -1
        if record.image is not None:
            if record.image not in rows:
                image = decode_image(record.image)
                if image is None:
                    skipped += 1
                    continue
                rows[record.image] = len(images)
                images.append(preprocess.resize_crop(image))
            row = rows[record.image]
        pairs.append((row, record.conversation))
    log.info("%s: %d conversations, %d images, %d records skipped", path, len(pairs), len(images), skipped)
    pixels = to_uint8_tensor(images) if images else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return pixels, pairs


# --- the task -------------------------------------------------------------------------------------------
class VLMTask(Task):
    def __init__(self, model: VisionLanguageModel, stage: int, examples: Examples, config: VLMRunConfig,
                 evaluate=None):  # fmt: skip
        self.model, self.stage, self.examples = model, stage, examples
        stage_config: StageConfig = getattr(config, f"stage{stage}")
        self.config = stage_train_config(config, stage)
        self.device = model.device
        # (first step, end step, first row, sampler) per phase: the curriculum's and the focus phase's rows serve
        # their own steps; the configured world's rows (after theirs) every other step
        self.pools, row = [], 0
        for (start, end), rows in zip(stage_config.phase_windows, examples.phases):
            if end > start and rows:
                self.pools.append((start, end, row, EpochSampler(rows, self.config)))
            row += rows
        self.world = (row, EpochSampler(len(examples.ids) - row, self.config))
        self.buckets = config.data.length_buckets
        self.lr_mults = set_trainable(model, stage, stage_config)
        self._evaluate = evaluate

    def batch_size(self) -> int:
        return self.config.batch_size

    def batch(self, step: int, micro: int) -> list[dict[str, torch.Tensor]]:
        """The step's sequences as `data.length_buckets` pieces of similar length, each padded to its longest."""
        first, sampler = next(((row, sampler) for start, end, row, sampler in self.pools if start <= step < end), self.world)
        rows = (sampler(step, micro) + first).tolist()
        ex = self.examples
        if self.buckets > 1:
            rows.sort(key=lambda r: len(ex.ids[r]))
        pieces = []
        for part in np.array_split(np.asarray(rows), min(self.buckets, len(rows))):
            longest = max(len(ex.ids[r]) for r in part)
            ids = torch.full((len(part), longest), self.model.tokenizer.pad_id, dtype=torch.long)
            labels = torch.full_like(ids, IGNORE)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(part):
                n = len(ex.ids[r])
                ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(ex.ids[r]), torch.tensor(ex.labels[r]), 1
            images = [ex.image[r] for r in part if ex.image[r] >= 0]
            pieces.append({"ids": ids, "labels": labels, "mask": mask, "pixels": ex.pixels[images] if images else None})
        return pieces

    def loss(self, batch: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over every labelled token of the step, whichever piece it is in: the pieces change the padding,
        not the loss. The vision tower sees all the step's images at once (BatchNorm statistics included)."""
        pixels = [piece["pixels"] for piece in batch if piece["pixels"] is not None]
        features = None
        if pixels and self.stage > 0:
            features = self.model.image_features(self.model.preprocess_config.normalize(torch.cat(pixels).to(self.device)))
        total, targets, used = 0.0, 0, 0
        for piece in batch:
            images = 0 if piece["pixels"] is None else len(piece["pixels"])
            ids, mask, labels = (piece[k].to(self.device) for k in ("ids", "mask", "labels"))
            piece_features = features[used : used + images] if images and features is not None else None
            total = total + next_token_loss(self.model, ids, labels, mask, text_only=self.stage == 0, reduction="sum",
                                            features=piece_features)  # fmt: skip
            targets, used = targets + int((labels[:, 1:] != IGNORE).sum()), used + images
        loss = total / max(1, targets)
        return loss, {"loss": loss.item()}

    def after_step(self) -> None:
        pass

    def evaluate(self) -> dict[str, float]:
        return self._evaluate(self.model) if self._evaluate else {}


def next_token_loss(model: VisionLanguageModel, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    pixels: torch.Tensor | None = None, text_only: bool = False, reduction: str = "mean",
                    features: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of token t + 1 predicted at position t, over the labelled targets (mean, or `reduction`
    "sum"). Logits are computed only at those positions (with a 32k vocabulary they are the largest tensor of a
    step). `text_only`: the LM alone; a literal, unexpanded image placeholder is then just a token (stage 0).
    `features`: the images' projected features, computed beforehand, instead of `pixels`."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    where = targets != IGNORE
    if text_only:
        logits = model.lm(input_ids=ids, attention_mask=mask, logits_at=where)
    else:
        logits = model(ids, pixels, mask, logits_at=where, features=features)
    return F.cross_entropy(logits.float(), targets[where], reduction=reduction)


def stage_train_config(config: VLMRunConfig, stage: int):
    s: StageConfig = getattr(config, f"stage{stage}")
    return TrainConfig(**vars(config.train), steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup_steps=s.warmup_steps)


def set_trainable(model: VisionLanguageModel, stage: int, s: StageConfig) -> dict[str, float]:
    """Freeze what the stage does not train; returns the learning-rate multipliers by module."""
    model.requires_grad_(False)
    if stage == 0:
        model.lm.requires_grad_(True)
        return {}
    model.projector.requires_grad_(True)
    if model.image_pos is not None:
        model.image_pos.requires_grad_(True)
    if stage == 2:
        if s.lora_rank:
            add_lora(model.lm, s.lora_rank, s.lora_alpha, s.lora_targets)
        else:
            model.lm.requires_grad_(True)
        if s.vision_lr > 0:
            model.vision.requires_grad_(True)
    return {"lm.": (s.lm_lr or s.lr) / s.lr, "vision.": s.vision_lr / s.lr}


# --- the run --------------------------------------------------------------------------------------------
def run_vlm(config: VLMRunConfig, device: torch.device, resume: bool = False, stage: int | None = None,
            stop_after: int | None = None) -> dict:  # fmt: skip
    """Run the stages (all, or only `stage`) into config.run_dir; returns the final evaluation."""
    import vlfm
    from vlfm.train.loop import train

    run_dir = config.run_dir
    stages = [stage] if stage is not None else [0, 1, 2]
    first = stages[0]
    previous = next((run_dir / f"stage{s}" / "model" for s in range(first - 1, -1, -1)
                     if (run_dir / f"stage{s}" / "model").is_dir()), None)  # fmt: skip
    if first > 0 and previous is not None:
        model = check_continues(vlfm.load(previous), config, previous)
    elif first > 0 and stage is not None:
        raise ConfigError(f"--stage {stage} continues the model of an earlier stage, but {run_dir} has none; "
                          "run the earlier stages first")
    else:
        model = build_model(config)
    model = model.to(device)
    model.set_grad_checkpointing(config.train.grad_checkpointing)
    val = VQASet(config.data.world, "val", config.data.eval_size, config.data.workers) if config.data.source == "shapes" else None
    quick = (lambda m: vqa_accuracy(m, val, limit=256)) if val is not None else None  # noqa: E731
    for s in stages:
        stage_config: StageConfig = getattr(config, f"stage{s}")
        if stage_config.steps == 0 or (s == 0 and config.model.lm_init):
            log.info("stage %d skipped (%s)", s, "a pretrained LM is given" if stage_config.steps else f"stage{s}.steps=0")
            continue
        stage_dir = run_dir / f"stage{s}"
        if not resume and latest_checkpoint(stage_dir) is not None:
            raise ConfigError(f"{stage_dir} already holds stage {s}; pass --resume to continue it")
        if resume and (stage_dir / "model").is_dir():  # finished before the interruption
            model = check_continues(vlfm.load(stage_dir / "model"), config, stage_dir / "model").to(device)
            continue
        examples = stage_examples(model, config, s)
        log.info("stage %d: %d sequences, %d steps of %d", s, len(examples.ids), stage_config.steps, stage_config.batch_size)
        task = VLMTask(model, s, examples, config, evaluate=quick if s > 0 else None)
        result = train(task, task.config, stage_dir, resume=resume, stop_after=stop_after)
        if result["step"] < stage_config.steps:
            return {}
        if getattr(model.lm, "lora", None):
            save_adapter(model.lm, stage_dir / "adapter")
            merge_lora(model.lm)
            model.save(stage_dir / "model")
    model.requires_grad_(False)
    model.save(run_dir / "model")
    metrics = evaluate_vlm(model, config)
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def check_continues(model: VisionLanguageModel, config: VLMRunConfig, source) -> VisionLanguageModel:
    """A stage that goes on from an earlier stage's saved model takes that model's settings, not the run's:
    refuse a run whose model section says otherwise (e.g. another feature_layer), rather than ignore it."""
    names = ("projector", "shuffle_factor", "feature_layer", "image_pos_embed", "image_token", "template")
    diff = [f"model.{n}={getattr(config.model, n)!r} (it has {getattr(model.config, n)!r})"
            for n in names if getattr(config.model, n) != getattr(model.config, n)]  # fmt: skip
    if diff:
        raise ConfigError(f"{source} was built with other model settings than this run: {', '.join(diff)}; "
                          "train from stage 0 under a new name to change them")
    return model


def evaluate_vlm(model: VisionLanguageModel, config: VLMRunConfig) -> dict:
    """VQA exact match on unseen scenes (`vqa_*`) and on scenes of the held-out colour-shape pairs."""
    if config.data.source != "shapes":
        return {}
    metrics = vqa_accuracy(model, VQASet(config.data.world, "val", config.data.eval_size, config.data.workers))
    heldout = VQASet(config.data.world, "heldout", config.data.eval_size, config.data.workers)
    metrics.update(vqa_accuracy(model, heldout, prefix="vqa_heldout"))
    return metrics
