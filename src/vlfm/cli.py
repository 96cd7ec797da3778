"""`vlfm` command line: train | eval | classify | embed | info | convert | data | adapt | index | search | chat.

Errors a user can fix (bad config key, missing file, non-image, checkpoint without weights) print one line
and exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from vlfm.cli_common import UsageError, open_image, two_tower
from vlfm.cli_search import add_parsers as add_search_parsers
from vlfm.cli_search import cmd_index, cmd_search
from vlfm.cli_vlm import add_parsers as add_vlm_parsers
from vlfm.cli_vlm import cmd_chat, describe, eval_vlm, is_language_model, is_vlm, print_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlfm", description="A compact toolkit for vision-language foundation models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML preset (configs/*.yaml)")
    p.add_argument("config", help="YAML config, e.g. configs/shapes-clip.yaml")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. -o train.steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--stage", type=int, choices=(0, 1, 2), help="VLM runs: train only this stage (default: 0, 1, 2)")

    p = sub.add_parser("eval", help="evaluate a model: the built-in world's benchmark, or a task on a dataset")
    p.add_argument("checkpoint", help="run directory or checkpoint directory")
    p.add_argument("--task", choices=("world", "zeroshot_classification", "zeroshot_retrieval", "linear_probe"),
                   default="world", help="world (default): zero-shot + retrieval on the built-in world -> eval.json")
    p.add_argument("--dataset", default="shapes",
                   help="shapes | digits | lfw_subset | a folder of class folders | a caption file (zeroshot_retrieval)")
    p.add_argument("--features", choices=("embedding", "pooled", "tokens"), default="pooled",
                   help="linear_probe: which frozen image features")
    p.add_argument("--csv", default="runs/eval_results.csv", help="a row per (model, dataset, task) is appended here")
    p.add_argument("--out", help="where to write the JSON (default: beside the checkpoint)")
    p.add_argument("--retrieval-size", type=int, default=1000, help="world: held-out scenes for retrieval")
    p.add_argument("--classify-size", type=int, default=500, help="world: single-object scenes per zero-shot set")
    p.add_argument("--vqa-size", type=int, default=300, help="world, VLM checkpoints: unseen scenes for VQA (vqa_acc)")

    p = sub.add_parser("classify", help="zero-shot classify images among natural-language labels")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--labels", required=True, help='comma-separated labels, e.g. "a red circle,a blue square"')
    p.add_argument("--templates", help='comma-separated prompt templates with {}, e.g. "a photo of {}"')

    p = sub.add_parser("embed", help="write normalised embeddings of images or texts to a .npy file")
    p.add_argument("checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (sorted by name; undecodable ones are skipped)")
    source.add_argument("--texts", help="text file, one text per line")
    p.add_argument("--out", required=True, help="output .npy (a .txt beside it lists the rows)")
    p.add_argument("--batch-size", type=int, default=256)

    p = sub.add_parser("info", help="describe a checkpoint: architecture, sizes, files")
    p.add_argument("checkpoint")

    p = sub.add_parser("convert", help="convert a checkpoint: vlfm / Hugging Face / open_clip -> vlfm or Hugging Face")
    p.add_argument("checkpoint", help="vlfm run or checkpoint, Hugging Face CLIP/SigLIP/BERT directory, or open_clip weights")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--to", choices=("hf", "vlfm"), required=True,
                   help="hf: a directory transformers' CLIPModel / SiglipModel loads; vlfm: vlfm's own format")
    p.add_argument("--config", help="open_clip only: the model-config JSON (e.g. ViT-B-32.json) if not beside the weights")

    p = sub.add_parser("data", help="data tools: shard (write WebDataset shards)")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="shard")
    d = dsub.add_parser("shard", help="write image + caption pairs into WebDataset .tar shards")
    d.add_argument("source", nargs="?", help="a folder of images (captions from same-named .txt files) or a caption file")
    d.add_argument("--world", type=int, metavar="N", help="instead of SOURCE: N scenes of the built-in world, one caption each")
    d.add_argument("--image-size", type=int, default=64, help="--world: image size in pixels")
    d.add_argument("--out", required=True, help="directory for shard-000000.tar, ...")
    d.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    d.add_argument("--max-pixels", type=int, default=50_000_000, help="larger images are skipped as oversized")

    p = sub.add_parser("adapt", help="fine-tune the image tower on a labelled set (full or LoRA), with a WiSE-FT curve")
    p.add_argument("checkpoint", help="a two-tower model: the zero-shot classifier it gives is the starting point")
    p.add_argument("--dataset", required=True, help="shapes | digits | lfw_subset | a folder of class folders")
    p.add_argument("--out", required=True, help="directory for zeroshot/, model/, adapter/ (LoRA), results.json, mix.png")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, help="default 1e-3 (full) or 3e-3 (LoRA)")
    p.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning; R: LoRA of rank R (peft)")
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--mix", help="WiSE-FT: comma-separated alphas to evaluate, e.g. 0,0.25,0.5,0.75,1 (plot: mix.png)")
    p.add_argument("--seed", type=int, default=0)

    add_search_parsers(sub)
    add_vlm_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from vlfm.checkpoint import CheckpointError
    from vlfm.config import ConfigError
    from vlfm.search.index import SearchError
    from vlfm.train import RunExistsError

    try:
        return COMMANDS[args.command](args) or 0
    except (UsageError, ConfigError, CheckpointError, RunExistsError, SearchError, FileNotFoundError) as error:
        print(f"vlfm {args.command}: error: {error}", file=sys.stderr)
        return 2


def cmd_train(args) -> None:
    from vlfm.config import load_config
    from vlfm.train import run

    config = load_config(args.config, args.override)
    if args.stage is not None and config.task != "vlm":
        raise UsageError("--stage is for VLM runs (task: vlm)")
    metrics = run(config, resume=args.resume, stage=args.stage)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print_json(metrics)
        print(f"run directory: {config.run_dir}")


def cmd_eval(args) -> None:
    import yaml

    import vlfm
    from vlfm.checkpoint import resolve
    from vlfm.config import RunConfig, from_dict
    from vlfm.eval.tasks import append_csv, evaluate_task

    path = Path(args.checkpoint)
    model = vlfm.load(path)
    default_dir = path if path.is_dir() and (path / "config.yaml").is_file() else resolve(path)
    if is_vlm(model):
        if args.task != "world" or args.dataset != "shapes":
            raise UsageError("a vision-language model is evaluated on the built-in world's VQA (--task world)")
        metrics, out = eval_vlm(model, args, path)
    elif args.task == "world":
        two_tower(model, "eval")
        from vlfm.data.shapes import WorldConfig
        from vlfm.eval.world import WorldBenchmark

        if args.dataset != "shapes":
            raise UsageError("--task world evaluates on the built-in world; pick another --task for --dataset")
        run_config = path / "config.yaml"
        if run_config.is_file():  # a run directory: evaluate on the world it trained on
            world = from_dict(RunConfig, yaml.safe_load(run_config.read_text())).data.world
        else:
            world = WorldConfig(image_size=model.config.vision.image_size)
        metrics = WorldBenchmark(world, args.classify_size, args.retrieval_size).evaluate(model)
        out = Path(args.out) if args.out else default_dir / "eval.json"
    else:
        two_tower(model, "eval")
        try:
            metrics = evaluate_task(model, args.task, args.dataset, features=args.features)
        except ValueError as error:
            raise UsageError(str(error)) from None
        name = Path(args.dataset).stem if Path(args.dataset).exists() else args.dataset
        out = Path(args.out) if args.out else default_dir / f"eval_{args.task}_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    append_csv(args.csv, str(path), args.dataset, args.task, metrics)
    print_json(metrics)
    print(f"wrote {out}; appended a row to {args.csv}")


def cmd_classify(args) -> None:
    import vlfm

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise UsageError("--labels needs at least two comma-separated labels")
    templates = [t.strip() for t in args.templates.split(",")] if args.templates else None
    if templates and any("{}" not in t for t in templates):
        raise UsageError("every template needs a {} where the label goes")
    images = [open_image(p) for p in args.images]
    model = two_tower(vlfm.load(args.checkpoint), "classify")
    probabilities = model.classify(images, labels, templates)
    width = max(len(label) for label in labels)
    for path, row in zip(args.images, probabilities):
        best = int(row.argmax())
        print(f"{path}: {labels[best]}")
        for label, p in sorted(zip(labels, row.tolist()), key=lambda t: -t[1]):
            print(f"  {label:<{width}}  {p:.3f}")


def cmd_embed(args) -> None:
    import numpy as np

    import vlfm

    model = vlfm.load(args.checkpoint)
    if args.texts:
        text_file = Path(args.texts)
        if not text_file.is_file():
            raise FileNotFoundError(f"text file {str(text_file)!r} does not exist")
        rows = [line.strip() for line in text_file.read_text().splitlines() if line.strip()]
        if not rows:
            raise UsageError(f"{text_file} has no non-empty lines")
        embeddings = model.embed_texts(rows, args.batch_size)
    else:
        two_tower(model, "embed --images")
        from vlfm.data.sources import decode_rgb, list_images

        try:
            decoded = [(path, decode_rgb(path)) for path in list_images(args.images)]
        except ValueError as error:
            raise UsageError(str(error)) from None
        images, rows = [image for _, image in decoded if image is not None], [str(p) for p, image in decoded if image is not None]
        skipped = [path.name for path, image in decoded if image is None]
        if skipped:
            logging.getLogger("vlfm").warning("skipped %d undecodable image(s): %s", len(skipped), ", ".join(skipped[:5]))
        if not images:
            raise UsageError(f"{args.images} holds no readable images")
        embeddings = model.embed_images(images, args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, embeddings.cpu().numpy().astype(np.float32))
    out.with_suffix(".txt").write_text("\n".join(rows) + "\n")
    print(f"wrote {tuple(embeddings.shape)} embeddings to {out}")


def cmd_info(args) -> None:
    import vlfm
    from vlfm.checkpoint import resolve
    from vlfm.config import to_dict
    from vlfm.foreign import detect

    directory = resolve(args.checkpoint)
    model = vlfm.load(directory)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    print(f"checkpoint: {directory} (layout: {detect(directory)})")
    if is_language_model(model):
        describe(model, count)
    elif hasattr(model, "visual") and hasattr(model, "text"):
        print(f"kind: {model.config.kind}  embed_dim: {model.config.embed_dim}  parameters: {count(model) / 1e6:.2f}M")
    elif hasattr(model, "visual"):
        names = model.config.classnames
        print(f"kind: image classifier, {len(names)} classes ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
              f"  parameters: {count(model) / 1e6:.2f}M")  # fmt: skip
    else:
        print(f"kind: text encoder  parameters: {count(model) / 1e6:.2f}M")
    if hasattr(model, "visual"):
        v = model.visual.config
        print(f"vision: {v.image_size}px patch {v.patch_size} width {v.width} x {v.layers} layers, "
              f"stem {v.stem}, pool {v.pool} ({count(model.visual) / 1e6:.2f}M)")
    if hasattr(model, "text"):
        t = model.text.config
        print(f"text: context {t.context_length} width {t.width} x {t.layers} layers, {t.norm}-norm, "
              f"{'causal' if t.causal else 'bidirectional'}, pool {t.pool} ({count(model.text) / 1e6:.2f}M)")
    preprocess = f"; preprocess: {to_dict(model.preprocess_config)}" if hasattr(model, "preprocess_config") else ""
    print(f"tokenizer: {model.tokenizer.vocab_size if model.tokenizer else 'none'} tokens{preprocess}")
    print("files: " + ", ".join(sorted(p.name for p in directory.iterdir())) if directory.is_dir() else f"file: {directory}")


def cmd_convert(args) -> None:
    import vlfm
    from vlfm.convert import export_hf

    model = vlfm.load(args.checkpoint, config=args.config)
    out = export_hf(model, args.out) if args.to == "hf" else model.save(args.out)
    print(f"wrote {args.to} checkpoint {out}")


def cmd_data(args) -> None:
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


def cmd_adapt(args) -> None:
    import vlfm
    from vlfm.adapt.finetune import finetune
    from vlfm.config import TrainConfig
    from vlfm.data.datasets import load_dataset

    try:
        alphas = [float(a) for a in args.mix.split(",")] if args.mix else None
        data = load_dataset(args.dataset)
    except ValueError as error:
        raise UsageError(str(error)) from None
    model = two_tower(vlfm.load(args.checkpoint), "adapt")
    lr = args.lr or (3e-3 if args.lora_rank else 1e-3)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, warmup_steps=min(50, args.steps // 10),
                        weight_decay=0.05, eval_every=max(1, args.steps // 3), log_every=10, seed=args.seed)  # fmt: skip
    results = finetune(model, data, args.out, train, args.lora_rank, args.lora_alpha, args.seed, alphas)
    summary = {"zeroshot_top1": results["zeroshot"]["top1"], "finetuned_top1": results["finetuned"]["top1"],
               "trainable_fraction": results["trainable_fraction"]}  # fmt: skip
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}))
    print(f"wrote {Path(args.out) / 'results.json'}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "classify": cmd_classify, "embed": cmd_embed, "info": cmd_info,
            "convert": cmd_convert, "data": cmd_data, "adapt": cmd_adapt, "index": cmd_index, "search": cmd_search, "chat": cmd_chat}

if __name__ == "__main__":
    sys.exit(main())
