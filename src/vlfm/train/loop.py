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
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from vlfm import distributed
from vlfm.checkpoint import (
    latest_intact_checkpoint,
    load_training_checkpoint,
    make_room,
    prune_checkpoints,
    read_train_state,
    save_training_checkpoint,
)
from vlfm.config import DistributedConfig, TrainConfig
from vlfm.io import ConfigError, DivergedError, atomic_file, load_state_strict, load_weights, non_finite
from vlfm.nn import autocast, compile_blocks, resolve_precision

log = logging.getLogger("vlfm")


class Task:
    """What the loop trains; a task subclasses this and defines `batch`, `loss` and `batch_size`.

    `train_model` is set by the loop (the module a step runs: DDP's wrapper under torchrun). `lr_mults` maps a
    parameter-name prefix to a learning-rate multiplier (parameter_groups). A task that runs its own backward
    for a whole step (GradCache) overrides `backward`. `data_state()` (called on every rank at each checkpoint;
    rank 0's answer is saved) and `load_data_state(state)` (on resume, every rank) carry a data position that is
    not the step."""

    model: nn.Module
    train_model: nn.Module
    lr_mults: dict[str, float] | None = None

    def batch(self, step: int, micro: int) -> Any:
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def batch_size(self) -> int:
        raise NotImplementedError

    def backward(self, step: int, config: TrainConfig, device: torch.device, scaler) -> dict[str, float]:
        """Backward of each micro-batch's loss / grad_accum: gradients add up to the step's mean."""
        info: dict[str, float] = {}
        for micro in range(config.grad_accum):
            batch = self.batch(step, micro)
            with autocast(device, config.precision):
                loss, info = self.loss(batch)
            loss = loss / config.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
        return info

    def after_step(self) -> None:
        pass

    def evaluate(self) -> dict[str, float]:
        return {}

    def data_state(self) -> dict | None:
        return None

    def load_data_state(self, state: dict | None) -> None:
        pass


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
    """The training device, checked against the precision before any data is built; `train.precision: auto`
    becomes the precision it stands for here (bf16 where it is fast: nn.fast_bf16), so config.yaml records it."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={config.device} but no CUDA device is available (install a CUDA build of torch)")
    if config.precision == "auto":
        config.precision = resolve_precision("auto", device)
        log.info("train.precision=auto: %s on %s", config.precision, device.type)
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU (its grad scaler is CUDA-only here); use bf16 or fp32")
    return device


NO_DECAY_NAMES = ("embed", "logit_", "probe", "norm", "bn", "bias")


def parameter_groups(model: nn.Module, config: TrainConfig, lr_mults: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases, embeddings, or the logit scale/bias.
    `lr_mults`: name prefix -> learning-rate multiplier (a VLM's LM and vision tower learn slower than its
    projector; a contrastive model's logit scale and bias may learn faster); the first matching prefix wins."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
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


def train(task: Task, config: TrainConfig, run_dir: Path, resume: bool = False, stop_after: int | None = None,
          parallel: DistributedConfig | None = None) -> dict:
    """Run (or continue) training; returns the last evaluation. `stop_after` ends early (tests, resume).

    Under torchrun (`parallel` names the strategy) every rank runs this loop on its share of each batch; rank 0
    alone writes metrics, checkpoints and the model. The task trains `task.train_model` (DDP's wrapper, or the
    FSDP-sharded model) and saves `task.model`."""
    strategy = parallel.strategy if parallel is not None and distributed.is_distributed() else None
    run_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(task, config, run_dir, strategy)
    run.start(latest_intact_checkpoint(run_dir) if resume else None, resume)  # damaged ones are skipped
    end = run.end = config.steps if stop_after is None else min(config.steps, stop_after)
    while run.step < end:
        run.train_step()
        is_last = run.step == config.steps
        # Sharded parameters need every rank in the evaluation's forward passes; whole replicas need only rank 0.
        if ((config.eval_every and run.step % config.eval_every == 0) or is_last) and (run.main or strategy == "fsdp"):
            run.evaluate()
        if (config.save_every and run.step % config.save_every == 0) or run.step == end:
            run.save_checkpoint()
    run.close()
    if run.step == config.steps:
        model, _ = distributed.full_state(task.model, None, sharded=strategy == "fsdp")
        if run.main:
            refuse_non_finite(model.state_dict(), run.step)
            model.save(run_dir / "model")
        if strategy is not None:
            dist.barrier()
    return {"history": run.history, "last_eval": run.last_eval, "step": run.step}


class _Run:
    """The state of one training run: optimizer, step, history, the metrics file and the progress bar."""

    def __init__(self, task: Task, config: TrainConfig, run_dir: Path, strategy: str | None):
        self.task, self.config, self.run_dir, self.strategy = task, config, run_dir, strategy
        self.main = distributed.rank() == 0
        self.device = next(task.model.parameters()).device
        self.step, self.history, self.last_eval = 0, {"train": [], "eval": []}, {}
        self.bad_steps = 0
        self.last_good: Path | None = None  # the newest intact checkpoint: never pruned

    def start(self, checkpoint: Path | None, resume: bool) -> None:
        task, config = self.task, self.config
        if resume and checkpoint is None:
            log.info("no checkpoint in %s: starting from scratch", self.run_dir)
        if checkpoint is not None and self.strategy == "fsdp":  # full weights go in before sharding; the optimizer after
            load_state_strict(task.model, load_weights(checkpoint / "model.safetensors"), str(checkpoint))
        if config.compile:
            log.info("train.compile: %d transformer blocks compiled (the first steps compile them)",
                     compile_blocks(task.model))
        task.train_model = distributed.wrap_model(task.model, self.strategy, config.precision)
        groups = parameter_groups(task.model, config, task.lr_mults)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        if checkpoint is not None:
            state = load_checkpoint(task.model, checkpoint, self.optimizer, sharded=self.strategy == "fsdp")
            self.step, self.history = state["step"], state["history"]
            task.load_data_state(state.get("data"))
            if self.main:  # rank 0 alone writes metrics.jsonl: two ranks rewriting it would race
                rewind_metrics(self.run_dir / "metrics.jsonl", self.step)
            self.last_good = checkpoint
            log.info("resumed from %s at step %d", checkpoint, self.step)
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a") if self.main else None
        self.last_eval = self.history["eval"][-1] if self.history["eval"] else {}
        task.model.train()
        self.bar = tqdm(total=config.steps, initial=self.step, desc="train", dynamic_ncols=True, mininterval=1.0,
                        disable=not self.main)  # fmt: skip
        self.tick, self.samples = time.perf_counter(), 0

    def train_step(self) -> None:
        task, config, optimizer, scaler = self.task, self.config, self.optimizer, self.scaler
        factor = lr_factor(self.step, config)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor * group["lr_mult"]
        optimizer.zero_grad(set_to_none=True)
        info = task.backward(self.step, config, self.device, scaler)
        if self.strategy == "fsdp":
            distributed.average_gradients(task.model, replicated_only=True)
        self.samples += config.grad_accum * task.batch_size()
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(task.model.parameters(), config.clip_grad or float("inf"))
        if self._finite(info, grad_norm):
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            task.after_step()
        self.step += 1
        if self.main and (self.step % config.log_every == 0 or self.step == self.end):
            self._log(factor, grad_norm, info)
        self.bar.update(1)

    def _finite(self, info: dict[str, float], grad_norm: torch.Tensor) -> bool:
        """Whether the step's loss and gradient norm are finite (the loss was read by the task already; the norm
        is one read more). A non-finite step is skipped; `max_bad_steps` of them in a row stop the run, naming
        the step, the loss and the first non-finite gradient or weight. With fp16 the grad scaler skips
        overflowing gradients itself, so there only the loss counts."""
        loss = float(info.get("loss", 0.0))
        norm = float(_full(grad_norm)) if self.scaler is None else 0.0
        if math.isfinite(loss) and math.isfinite(norm):
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        where = first_non_finite(self.task.model)
        log.warning("step %d: loss %s, gradient norm %s%s: step skipped", self.step + 1, loss, norm, where)
        if self.bad_steps >= self.config.max_bad_steps:
            raise DivergedError(f"training diverged: step {self.step + 1} is the {self.bad_steps}th in a row with a "
                                f"non-finite loss ({loss}) or gradient norm ({norm}){where}; nothing was saved "
                                "after the last good checkpoint (lower train.lr, or raise train.warmup_steps)")
        self.task.model.zero_grad(set_to_none=True)
        return False

    def _log(self, factor: float, grad_norm: torch.Tensor, info: dict[str, float]) -> None:
        config = self.config
        elapsed = time.perf_counter() - self.tick
        record = {"step": self.step, "samples_seen": self.step * config.grad_accum * self.task.batch_size(),
                  "lr": config.lr * factor, "grad_norm": float(_full(grad_norm)),
                  "samples_per_s": self.samples / max(elapsed, 1e-9), **info}  # fmt: skip
        self.tick, self.samples = time.perf_counter(), 0
        self.history["train"].append(record)
        write_record(self.metrics_file, record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}", sps=f"{record['samples_per_s']:.0f}")

    def evaluate(self) -> None:
        metrics = self.task.evaluate()
        self.task.model.train()
        if metrics and self.main:
            self.last_eval = {"step": self.step, **metrics}
            self.history["eval"].append(self.last_eval)
            write_record(self.metrics_file, self.last_eval)
            self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.last_eval.items()))
        self.tick = time.perf_counter()  # evaluation time is not training throughput

    def save_checkpoint(self) -> None:
        task, step = self.task, self.step
        model, optimizer_state = distributed.full_state(task.model, self.optimizer, sharded=self.strategy == "fsdp")
        data = task.data_state()  # every rank: a stream gathers
        if self.main:
            refuse_non_finite(model.state_dict(), step)
            root = self.run_dir / "checkpoints"
            make_room(root, model, optimizer_state, protect=self.last_good)  # prunes first only if the disk is short
            save_training_checkpoint(model, root / f"step_{step:08d}", optimizer_state,
                                     {"step": step, "samples_seen": step * self.config.grad_accum * task.batch_size(),
                                      "history": self.history, **({"data": data} if data is not None else {})})
            self.last_good = root / f"step_{step:08d}"
            prune_checkpoints(root, keep=2, protect=self.last_good)
        if self.strategy is not None:
            dist.barrier()  # no rank reads or resumes a checkpoint before rank 0 has renamed it into place

    def close(self) -> None:
        self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()


def load_checkpoint(model: nn.Module, directory: Path, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """Training state from a checkpoint; a sharded model already holds its weights, its optimizer loads by name."""
    if not sharded:
        return load_training_checkpoint(model, directory, optimizer)
    state = read_train_state(directory)
    distributed.load_sharded_optimizer(model, optimizer, load_weights(directory / "optimizer.safetensors"),
                                       state.pop("optimizer_param_groups"))
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    return state


def first_non_finite(model: nn.Module) -> str:
    """', first non-finite: gradient of NAME' (or 'weight NAME'), or '' when every gradient and weight is finite."""
    for kind in ("gradient", "weight"):
        for name, param in model.named_parameters():
            tensor = param.grad if kind == "gradient" else param.detach()
            if tensor is not None and not bool(torch.isfinite(_full(tensor)).all()):
                return f", first non-finite: {kind} of {name}"
    return ""


def refuse_non_finite(state: dict[str, torch.Tensor], step: int) -> None:
    """Never write non-finite weights: the last good checkpoint stays the newest."""
    bad = non_finite(state)
    if bad:
        raise DivergedError(f"training diverged: weight {bad[0]} is not finite at step {step}; nothing was saved after the "
                            "last good checkpoint (lower train.lr, or raise train.warmup_steps)")


def rewind_metrics(path: Path, step: int) -> None:
    """Drop the rows a killed run logged after the checkpoint it resumes from: they are logged again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        with atomic_file(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))


def write_record(file, record: dict) -> None:
    file.write(json.dumps(record) + "\n")
    file.flush()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) gradient norm as a plain tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

