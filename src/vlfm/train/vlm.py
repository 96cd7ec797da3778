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
from vlfm.config import ConfigError, StageConfig, TrainConfig, VLMRunConfig, to_dict
from vlfm.data import stage_data
from vlfm.data.chat import TEMPLATES, add_chat_tokens, world_text
from vlfm.data.stage_data import Encoder, Examples, text_scenes
from vlfm.data.tokenizer import Tokenizer
from vlfm.eval.vqa import VQASet, vqa_accuracy
from vlfm.io import load_state_strict
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
        tokenizer.chat_template = None  # the model learns model.template's turns: its prompts must be those
        model_config.lm = dataclasses.replace(lm.config)
        lm_state = lm.state_dict()
    else:
        scenes, avoid = text_scenes(config.data, config.data.text_size)
        texts = world_text(scenes, template, np.random.default_rng(config.train.seed), avoid,
                           config.data.count_questions, config.data.wordings)  # fmt: skip
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


# --- data -----------------------------------------------------------------------------------------------
def stage_examples(model: VisionLanguageModel, config: VLMRunConfig, stage: int) -> Examples:
    """The stage's sequences and data phases (data/stage_data.py), encoded with the model's text side."""
    data = config.data
    stage_config: StageConfig = getattr(config, f"stage{stage}")
    uses_world = stage > 0 and "shapes" in [data.source] + [p.source for p in stage_config.phases]
    if uses_world and data.world.image_size != model.config.vision.image_size:
        raise ConfigError(f"data.world.image_size={data.world.image_size} differs from the vision tower's "
                          f"image_size={model.config.vision.image_size}; set data.world.image_size")
    encoder = Encoder(model.tokenizer, model.template, model.config.image_token_id, model.image_tokens)
    return stage_data.stage_examples(stage, data, stage_config.phases, config.train.seed, encoder,
                                     model.preprocess_config)  # fmt: skip


# --- the task -------------------------------------------------------------------------------------------
class VLMTask(Task):
    def __init__(self, model: VisionLanguageModel, stage: int, examples: Examples, config: VLMRunConfig,
                 evaluate=None):  # fmt: skip
        self.model, self.stage, self.examples = model, stage, examples
        stage_config: StageConfig = getattr(config, f"stage{stage}")
        self.config = stage_train_config(config, stage)
        self.device = model.device
        # (first step, end step, first row, sampler, rows per batch) per phase; the stage's own data otherwise and
        # for the rest of a mixed phase's batches
        size = self.config.batch_size
        self.pools = [(p.start, p.end, p.rows.start, EpochSampler(len(p.rows), dataclasses.replace(self.config,
                       batch_size=round(p.mix * size))), round(p.mix * size)) for p in examples.phases]  # fmt: skip
        self.main = (examples.main.start, EpochSampler(len(examples.main), self.config))
        self.buckets = config.data.length_buckets
        self.lr_mults = set_trainable(model, stage, stage_config)
        self._evaluate = evaluate

    def batch_size(self) -> int:
        return self.config.batch_size

    def batch(self, step: int, micro: int) -> list[dict[str, torch.Tensor]]:
        """The step's sequences as `data.length_buckets` pieces of similar length, each padded to its longest."""
        rows = self.rows(step, micro)
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

    def rows(self, step: int, micro: int) -> list[int]:
        """The step's rows of `examples`: a phase's in its window (its `mix`, then the stage's own), else the
        stage's own data."""
        first, sampler = self.main
        for start, end, row, pool, k in self.pools:
            if start <= step < end:
                rows = pool(step, micro) + row
                if k < self.config.batch_size:
                    rows = torch.cat([rows, sampler(step, micro)[: self.config.batch_size - k] + first])
                return rows.tolist()
        return (sampler(step, micro) + first).tolist()

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
    if config.data.max_length > model.lm.config.max_positions:  # a longer sequence would fail mid-stage
        raise ConfigError(f"data.max_length={config.data.max_length} exceeds the LM's context length max_positions="
                          f"{model.lm.config.max_positions}: lower data.max_length or raise model.lm.max_positions "
                          "(a new LM only)")
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
    ours, theirs = flat_dict(to_dict(config.model)), flat_dict(to_dict(model.config))
    # set when the model is built: from the parts it starts from (vision_init, lm_init) and the tokenizer
    derived = ("vision_init", "lm_init", "image_token_id", "lm.vocab_size", "lm.bos_token_id", "lm.eos_token_id",
               "lm.pad_token_id", *(["vision."] if config.model.vision_init else []), *(["lm."] if config.model.lm_init else []))
    diff = [f"model.{k}={ours[k]!r} (it has {theirs.get(k)!r})" for k in ours
            if ours[k] != theirs.get(k) and not k.startswith(tuple(derived))]  # fmt: skip
    if diff:
        raise ConfigError(f"{source} was built with other model settings than this run: {', '.join(diff)}; "
                          "train from stage 0 under a new name to change them")
    return model


def flat_dict(tree: dict, prefix: str = "") -> dict:
    """{"lm": {"width": 1}} -> {"lm.width": 1}."""
    out = {}
    for key, value in tree.items():
        out.update(flat_dict(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# The VQA sets evaluate_vlm reports: prefix -> (world split, wordings, renderer).
VQA_SETS = {"vqa": ("val", "one", "world"), "vqa_heldout": ("heldout", "one", "world"),
            "vqa_wordings": ("val", "heldout", "world"), "vqa_ood": ("val", "one", "ood")}  # fmt: skip


def evaluate_vlm(model: VisionLanguageModel, config: VLMRunConfig) -> dict:
    """VQA exact match on unseen scenes (`vqa_*`), on scenes of the held-out colour-shape pairs (`vqa_heldout_*`),
    on the unseen scenes' questions in wordings training never asks (`vqa_wordings_*`) and on the unseen scenes
    drawn by the independent renderer (`vqa_ood_*`)."""
    if config.data.source != "shapes":
        return {}
    metrics = {}
    for prefix, (split, wordings, renderer) in VQA_SETS.items():
        data = VQASet(config.data.world, split, config.data.eval_size, config.data.workers, wordings, renderer)
        metrics.update(vqa_accuracy(model, data, prefix=prefix))
    return metrics
