"""Training entry point: resolve the run directory, build the task, run the loop, evaluate, plot.

Launched by torchrun (RANK / WORLD_SIZE in the environment) the same call joins the process group first;
rank 0 alone writes the run directory."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed
import yaml

from vlfm import distributed
from vlfm.config import RunConfig, VLMRunConfig, to_dict
from vlfm.io import ConfigError, RunExistsError

log = logging.getLogger("vlfm")


def run(config: RunConfig | VLMRunConfig, resume: bool = False, stop_after: int | None = None,
        stage: int | None = None) -> dict:
    """Train `config` into config.run_dir; returns the final evaluation (empty when stopped early). A VLM run
    trains its stages in order, or only `stage`."""
    from vlfm.checkpoint import latest_checkpoint, load
    from vlfm.train.contrastive import ContrastiveTask
    from vlfm.train.loop import pick_device, train
    from vlfm.train.plots import plot_curves, plot_similarity

    run_dir = config.run_dir
    exists = latest_checkpoint(run_dir) is not None or (run_dir / "model").exists() or any(run_dir.glob("stage*/checkpoints"))
    if not resume and stage is None and exists:
        raise RunExistsError(f"run directory {run_dir} already holds a run; pass --resume to continue it, "
                             f"or choose another name with -o name=...")
    launched = "RANK" in os.environ or "WORLD_SIZE" in os.environ  # torchrun sets both
    device = pick_device(config.train)  # checked before joining: a bad config fails on every rank alike
    if launched:
        if config.task == "vlm":
            raise ConfigError("task: vlm trains in one process; launch it without torchrun")
        try:
            distributed.local_batch_size(config.train.batch_size, int(os.environ.get("WORLD_SIZE", 1)))
        except ValueError as error:
            raise ConfigError(f"train.batch_size (the global batch): {error}") from None
        device = distributed.init_from_env("gloo" if device.type == "cpu" else "nccl")
    main = distributed.rank() == 0
    if not main:
        log.setLevel(logging.WARNING)  # one copy of the progress messages (rank 0's); warnings from every rank
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log") if main else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.train.seed)  # every rank builds the same initial model
        if main:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        if config.task == "vlm":
            from vlfm.train.vlm import run_vlm

            return run_vlm(config, device, resume=resume, stage=stage, stop_after=stop_after)
        task = ContrastiveTask(config, device)
        result = train(task, config.train, run_dir, resume=resume, stop_after=stop_after, parallel=config.distributed)
        if result["step"] < config.train.steps:
            return {}
        if not main:
            return result["last_eval"]
        write_eval(run_dir, result["last_eval"])
        plot_curves(result["history"], run_dir / "curves.png")
        if task.benchmark is not None:
            bench = task.benchmark
            # A sharded model answers only with every rank; the saved full model answers alone.
            model = load(run_dir / "model", device) if launched and config.distributed.strategy == "fsdp" else task.model
            plot_similarity(model, bench.retrieval_images[:8], bench.queries[:8], run_dir / "similarity.png")
        return result["last_eval"]
    finally:
        log.removeHandler(handler)
        handler.close()
        if launched and distributed.is_distributed():
            torch.distributed.destroy_process_group()


def write_eval(directory: Path, metrics: dict) -> Path:
    path = Path(directory) / "eval.json"
    path.write_text(json.dumps(metrics, indent=2))
    return path
