"""One training loop for every task: AdamW, warmup + cosine, clipping, autocast, gradient accumulation,
periodic evaluation and checkpoints, resume, a progress bar and metrics.jsonl.

A task supplies the model, the micro-batch for a given (step, micro-step) — deterministic, so the data
position is just the step — the loss, and an evaluation. Because batches derive from the step, a run killed
and resumed sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from vlfm.checkpoint import latest_checkpoint, load_training_checkpoint, save_model, save_training_checkpoint
from vlfm.config import ConfigError, TrainConfig

log = logging.getLogger("vlfm")


class Task(Protocol):
    model: nn.Module

    def batch(self, step: int, micro: int) -> Any: ...

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def after_step(self) -> None: ...

    def evaluate(self) -> dict[str, float]: ...

    def batch_size(self) -> int: ...


class EpochSampler:
    """Dataset indices of the micro-batch at (step, micro): each epoch is a permutation seeded by (seed, epoch),
    so a batch is a pure function of the step and resuming needs no data state."""

    def __init__(self, n: int, config: TrainConfig):
        self.n, self.config = n, config
        self._cached: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.n, generator=generator))
        return self._cached[1]

    def __call__(self, step: int, micro: int) -> torch.Tensor:
        size = self.config.batch_size
        start = (step * self.config.grad_accum + micro) * size
        positions = torch.arange(start, start + size)
        epochs = positions // self.n
        return torch.cat([self.permutation(int(e))[positions[epochs == e] % self.n] for e in torch.unique(epochs)])


def pick_device(config: TrainConfig) -> torch.device:
    """The training device, checked against the precision before any data is built."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={config.device} but no CUDA device is available (install a CUDA build of torch)")
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU (its grad scaler is CUDA-only here); use bf16 or fp32")
    return device


NO_DECAY_NAMES = ("embed", "logit_", "probe", "norm", "bn", "bias")


def parameter_groups(model: nn.Module, config: TrainConfig, lr_mults: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases, embeddings, or the logit scale/bias, which also
    get their own learning-rate multiplier (small batches need the temperature to move faster).
    `lr_mults`: name prefix -> learning-rate multiplier (a VLM's LM and vision tower learn slower than its
    projector); the first matching prefix wins."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("logit_"):
            key = (0.0, config.logit_lr_mult)
        else:
            mult = next((m for prefix, m in (lr_mults or {}).items() if name.startswith(prefix)), 1.0)
            no_decay = param.dim() < 2 or any(part in name for part in NO_DECAY_NAMES)
            key = (0.0 if no_decay else config.weight_decay, mult)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "weight_decay": decay, "lr_mult": mult} for (decay, mult), params in groups.items()]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def train(task: Task, config: TrainConfig, run_dir: Path, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run (or continue) training; returns the last evaluation. `stop_after` ends early (tests, resume)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(task.model.parameters()).device
    groups = parameter_groups(task.model, config, getattr(task, "lr_mults", None))
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    step, history = 0, {"train": [], "eval": []}
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            log.info("no checkpoint in %s: starting from scratch", run_dir)
        else:
            state = load_training_checkpoint(task.model, checkpoint, optimizer)
            step, history = state["step"], state["history"]
            log.info("resumed from %s at step %d", checkpoint, step)
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    last_eval: dict = history["eval"][-1] if history["eval"] else {}
    task.model.train()
    bar = tqdm(total=config.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0)
    tick, samples = time.perf_counter(), 0
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    while step < end:
        factor = lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor * group["lr_mult"]
        optimizer.zero_grad(set_to_none=True)
        info: dict[str, float] = {}
        for micro in range(config.grad_accum):
            batch = task.batch(step, micro)
            with autocast_context(device, config.precision):
                loss, info = task.loss(batch)
            loss = loss / config.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            samples += task.batch_size()
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(task.model.parameters(), config.clip_grad or float("inf"))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        task.after_step()
        step += 1
        if step % config.log_every == 0 or step == end:
            elapsed = time.perf_counter() - tick
            record = {"step": step, "lr": config.lr * factor, "grad_norm": float(grad_norm),
                      "samples_per_s": samples / max(elapsed, 1e-9), **info}
            tick, samples = time.perf_counter(), 0
            history["train"].append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}", sps=f"{record['samples_per_s']:.0f}")
        bar.update(1)
        is_last = step == config.steps
        if (config.eval_every and step % config.eval_every == 0) or is_last:
            metrics = task.evaluate()
            task.model.train()
            if metrics:
                last_eval = {"step": step, **metrics}
                history["eval"].append(last_eval)
                metrics_file.write(json.dumps(last_eval) + "\n")
                metrics_file.flush()
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last_eval.items()))
            tick = time.perf_counter()  # evaluation time is not training throughput
        if (config.save_every and step % config.save_every == 0) or step == end:
            save_training_checkpoint(task.model, run_dir / "checkpoints" / f"step_{step:08d}", optimizer,
                                     {"step": step, "samples_seen": step * config.grad_accum * task.batch_size(),
                                      "history": history})
            prune_checkpoints(run_dir / "checkpoints", keep=2)
    bar.close()
    metrics_file.close()
    if step == config.steps:
        save_model(task.model, run_dir / "model")
    return {"history": history, "last_eval": last_eval, "step": step}


def prune_checkpoints(directory: Path, keep: int) -> None:
    for old in sorted(directory.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
