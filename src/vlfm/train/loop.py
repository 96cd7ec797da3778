"""One training loop for every task: AdamW, warmup + cosine, clipping, autocast, gradient accumulation,
periodic evaluation and checkpoints, resume, a progress bar and metrics.jsonl.

A task supplies the model, the micro-batch for a given (step, micro-step) — deterministic, so the data
position is just the step — the loss, and an evaluation. Because batches derive from the step, a run killed
and resumed sees exactly the batches an uninterrupted run sees. A task whose data has a position of its own (a
stream) adds `data_state()` / `load_data_state(state)`: the checkpoint's train_state.json carries it as "data".

Under torchrun the same loop runs on every rank (DDP or FSDP2): checkpoints are gathered into the single-process
format, so a run resumes with any number of processes.
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
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from vlfm import distributed
from vlfm.checkpoint import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from vlfm.config import DistributedConfig, TrainConfig
from vlfm.io import ConfigError, load_state_strict

log = logging.getLogger("vlfm")


class Task(Protocol):
    """What the loop trains. Optional: `lr_mults` (see parameter_groups), `train_model` (set by the loop: the
    module a step runs, DDP's wrapper under torchrun) and `step_backward(step) -> info`, which a task that runs
    its own backward for a whole step (GradCache) defines instead of the loop's per-micro-batch loss/backward.
    `data_state() -> dict | None` (called on every rank at each checkpoint; rank 0's answer is saved) and
    `load_data_state(state | None)` (on resume, every rank) carry a data position that is not the step."""

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

    def positions(self, step: int, micro: int) -> torch.Tensor:
        """Positions in the stream of samples (epoch after epoch) of the micro-batch (step, micro)."""
        size = self.config.batch_size
        start = (step * self.config.grad_accum + micro) * size
        return torch.arange(start, start + size)

    def __call__(self, step: int, micro: int) -> torch.Tensor:
        return self.indices(self.positions(step, micro))

    def indices(self, positions: torch.Tensor) -> torch.Tensor:
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


def train(task: Task, config: TrainConfig, run_dir: Path, resume: bool = False, stop_after: int | None = None,
          parallel: DistributedConfig | None = None) -> dict:
    """Run (or continue) training; returns the last evaluation. `stop_after` ends early (tests, resume).

    Under torchrun (`parallel` names the strategy) every rank runs this loop on its share of each batch; rank 0
    alone writes metrics, checkpoints and the model. The task trains `task.train_model` (DDP's wrapper, or the
    FSDP-sharded model) and saves `task.model`."""
    strategy = parallel.strategy if parallel is not None and distributed.is_distributed() else None
    run_dir.mkdir(parents=True, exist_ok=True)
    main = distributed.rank() == 0
    device = next(task.model.parameters()).device
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        log.info("no checkpoint in %s: starting from scratch", run_dir)
    if checkpoint is not None and strategy == "fsdp":  # full weights go in before sharding; the optimizer after
        load_state_strict(task.model, load_file(str(checkpoint / "model.safetensors")), str(checkpoint))
    task.train_model = distributed.wrap_model(task.model, strategy, config.precision)
    groups = parameter_groups(task.model, config, getattr(task, "lr_mults", None))
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    step, history = 0, {"train": [], "eval": []}
    if checkpoint is not None:
        state = load_checkpoint(task.model, checkpoint, optimizer, sharded=strategy == "fsdp")
        step, history = state["step"], state["history"]
        if hasattr(task, "load_data_state"):
            task.load_data_state(state.get("data"))
        log.info("resumed from %s at step %d", checkpoint, step)
    metrics_file = (run_dir / "metrics.jsonl").open("a") if main else None
    last_eval: dict = history["eval"][-1] if history["eval"] else {}
    task.model.train()
    bar = tqdm(total=config.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0, disable=not main)
    tick, samples = time.perf_counter(), 0
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    step_backward = getattr(task, "step_backward", None)  # a task that runs its own backward (GradCache)
    while step < end:
        factor = lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor * group["lr_mult"]
        optimizer.zero_grad(set_to_none=True)
        if step_backward is not None:
            info = step_backward(step)
        else:
            info = accumulate_gradients(task, step, config, device, scaler)
        if strategy == "fsdp":
            distributed.average_gradients(task.model, replicated_only=True)
        samples += config.grad_accum * task.batch_size()
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
        if main and (step % config.log_every == 0 or step == end):
            elapsed = time.perf_counter() - tick
            record = {"step": step, "samples_seen": step * config.grad_accum * task.batch_size(), "lr": config.lr * factor, "grad_norm": float(_full(grad_norm)),
                      "samples_per_s": samples / max(elapsed, 1e-9), **info}
            tick, samples = time.perf_counter(), 0
            history["train"].append(record)
            write_record(metrics_file, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}", sps=f"{record['samples_per_s']:.0f}")
        bar.update(1)
        is_last = step == config.steps
        # Sharded parameters need every rank in the evaluation's forward passes; whole replicas need only rank 0.
        if ((config.eval_every and step % config.eval_every == 0) or is_last) and (main or strategy == "fsdp"):
            metrics = task.evaluate()
            task.model.train()
            if metrics and main:
                last_eval = {"step": step, **metrics}
                history["eval"].append(last_eval)
                write_record(metrics_file, last_eval)
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last_eval.items()))
            tick = time.perf_counter()  # evaluation time is not training throughput
        if (config.save_every and step % config.save_every == 0) or step == end:
            model, optimizer_state = distributed.full_state(task.model, optimizer, sharded=strategy == "fsdp")
            data = task.data_state() if hasattr(task, "data_state") else None  # every rank: a stream gathers
            if main:
                save_training_checkpoint(model, run_dir / "checkpoints" / f"step_{step:08d}", optimizer_state,
                                         {"step": step, "samples_seen": step * config.grad_accum * task.batch_size(),
                                          "history": history, **({"data": data} if data is not None else {})})
                prune_checkpoints(run_dir / "checkpoints", keep=2)
            if strategy is not None:
                dist.barrier()  # no rank reads or resumes a checkpoint before rank 0 has renamed it into place
    bar.close()
    if metrics_file is not None:
        metrics_file.close()
    if step == config.steps:
        model, _ = distributed.full_state(task.model, None, sharded=strategy == "fsdp")
        if main:
            model.save(run_dir / "model")
        if strategy is not None:
            dist.barrier()
    return {"history": history, "last_eval": last_eval, "step": step}


def accumulate_gradients(task: Task, step: int, config: TrainConfig, device: torch.device, scaler) -> dict[str, float]:
    """Backward of each micro-batch's loss / grad_accum: gradients add up to the step's mean."""
    info: dict[str, float] = {}
    for micro in range(config.grad_accum):
        batch = task.batch(step, micro)
        with autocast_context(device, config.precision):
            loss, info = task.loss(batch)
        loss = loss / config.grad_accum
        (scaler.scale(loss) if scaler else loss).backward()
    return info


def load_checkpoint(model: nn.Module, directory: Path, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """Training state from a checkpoint; a sharded model already holds its weights, its optimizer loads by name."""
    if not sharded:
        return load_training_checkpoint(model, directory, optimizer)
    state = json.loads((directory / "train_state.json").read_text())
    distributed.load_sharded_optimizer(model, optimizer, load_file(str(directory / "optimizer.safetensors")),
                                       state.pop("optimizer_param_groups"))
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    return state


def write_record(file, record: dict) -> None:
    file.write(json.dumps(record) + "\n")
    file.flush()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) gradient norm as a plain tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def prune_checkpoints(directory: Path, keep: int) -> None:
    for old in sorted(directory.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
