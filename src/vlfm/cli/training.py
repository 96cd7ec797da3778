"""Commands that train or write data: `vlfm train | adapt | data shard`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlfm.cli.common import (
    add_max_pixels,
    non_negative_int,
    positive_float,
    positive_int,
    print_json,
    two_tower,
    unit_floats,
    world_image_size,
)
from vlfm.io import UsageError


def add_train(p) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/shapes-clip.yaml")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. -o train.steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--stage", type=int, choices=(0, 1, 2), help="VLM runs: train only this stage (default: 0, 1, 2)")


def train_command(args) -> None:
    from vlfm.config import load_config
    from vlfm.train import run

    config = load_config(args.config, args.override)
    if args.stage is not None and config.task != "vlm":
        raise UsageError("--stage is for VLM runs (task: vlm)")
    metrics = run(config, resume=args.resume, stage=args.stage)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print_json(metrics)
        print(f"run directory: {config.run_dir}")


def add_adapt(p) -> None:
    p.add_argument("checkpoint", help="a two-tower model: the zero-shot classifier it gives is the starting point")
    p.add_argument("--dataset", required=True, help="shapes | digits | digits-val | digits-test | lfw_subset | a folder of class folders")
    p.add_argument("--out", required=True, help="directory for zeroshot/, model/, adapter/ (LoRA), results.json, mix.png")
    p.add_argument("--steps", type=positive_int, default=600)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, help="default 1e-3 (full) or 3e-3 (LoRA)")
    p.add_argument("--lora-rank", type=non_negative_int, default=0, help="0: full fine-tuning; R: LoRA of rank R (peft)")
    p.add_argument("--lora-alpha", type=positive_int, default=16)
    p.add_argument("--mix", type=unit_floats, help="WiSE-FT: comma-separated alphas to evaluate, e.g. 0,0.25,0.5,0.75,1 (plot: mix.png)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    add_max_pixels(p, "--dataset folder: images (skipped and counted)")


def adapt_command(args) -> None:
    from vlfm.adapt.finetune import finetune
    from vlfm.checkpoint import load
    from vlfm.config import TrainConfig
    from vlfm.data.datasets import load_dataset

    try:
        alphas = args.mix
        data = load_dataset(args.dataset, args.max_pixels)
    except ValueError as error:
        raise UsageError(str(error)) from None
    model = two_tower(load(args.checkpoint), "adapt")
    lr = args.lr or (3e-3 if args.lora_rank else 1e-3)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, warmup_steps=min(50, args.steps // 10),
                        weight_decay=0.05, eval_every=max(1, args.steps // 3), log_every=10, seed=args.seed)  # fmt: skip
    results = finetune(model, data, args.out, train, args.lora_rank, args.lora_alpha, args.seed, alphas)
    summary = {"zeroshot_top1": results["zeroshot"]["top1"], "finetuned_top1": results["finetuned"]["top1"],
               "trainable_fraction": results["trainable_fraction"]}  # fmt: skip
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}))
    print(f"wrote {Path(args.out) / 'results.json'}")


def add_data(p) -> None:
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="shard")
    d = dsub.add_parser("shard", help="write image + caption pairs into WebDataset .tar shards")
    d.add_argument("source", nargs="?", help="a folder of images (captions from same-named .txt files) or a caption file")
    d.add_argument("--world", type=positive_int, metavar="N", help="instead of SOURCE: N scenes of the built-in world, one caption each")
    d.add_argument("--image-size", type=world_image_size, default=64, help="--world: image size in pixels")
    d.add_argument("--out", required=True, help="directory for shard-000000.tar, ...")
    d.add_argument("--maxcount", type=positive_int, default=1000, help="samples per shard")
    add_max_pixels(d, "images (skipped and counted as oversized)")


def data_command(args) -> None:
    from vlfm.data.shards import folder_items, write_shards, write_world_shards
    from vlfm.data.sources import read_caption_file

    if (args.source is None) == (args.world is None):
        raise UsageError("give a SOURCE (image folder or caption file) or --world N, not both")
    try:
        if args.world is not None:
            stats = write_world_shards(args.world, args.out, args.maxcount, args.image_size)
        else:
            source = Path(args.source)
            items = folder_items(source) if source.is_dir() else read_caption_file(source)
            stats = write_shards(items, args.out, args.maxcount, args.max_pixels)
    except (ValueError, FileExistsError) as error:
        raise UsageError(str(error)) from None
    print(json.dumps({k: v for k, v in stats.items() if k != "shards"}))
    print(f"wrote {len(stats['shards'])} shard(s) to {args.out}")
