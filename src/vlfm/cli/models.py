"""Commands that use a trained model: `vlfm eval | classify | embed | info | convert | export | verify`."""

from __future__ import annotations

import json
from pathlib import Path

from vlfm import distributed
from vlfm.cli.assistant import describe, eval_vlm
from vlfm.cli.common import (
    add_collection_flags,
    add_max_pixels,
    add_precision,
    distributed_run,
    non_negative_int,
    output_home,
    positive_int,
    print_json,
    text,
    two_tower,
)
from vlfm.io import UsageError, open_image


def add_eval(p) -> None:
    p.add_argument("checkpoint", help="run directory or checkpoint directory")
    add_precision(p)
    p.add_argument("--task", choices=("world", "zeroshot_classification", "zeroshot_retrieval", "linear_probe"),
                   default="world", help="world (default): zero-shot + retrieval on the built-in world -> eval.json")
    p.add_argument("--dataset", default="shapes",
                   help="shapes | shapes-ood | digits | digits-val | digits-test | lfw_subset | a folder of class folders | a caption file (zeroshot_retrieval)")
    p.add_argument("--features", choices=("embedding", "pooled", "tokens"), default="pooled",
                   help="linear_probe: which frozen image features")
    p.add_argument("--csv", default="runs/eval_results.csv", help="a row per (model, dataset, task) is appended here")
    p.add_argument("--out", help="where to write the JSON (default: beside the checkpoint)")
    p.add_argument("--retrieval-size", type=positive_int, default=1000, help="world: held-out scenes for retrieval")
    p.add_argument("--classify-size", type=positive_int, default=500, help="world: single-object scenes per zero-shot set")
    p.add_argument("--ood-per-class", type=non_negative_int, default=20,
                   help="world: shapes-ood drawings per label for the out-of-domain metrics (ood_*); 0: none")
    p.add_argument("--vqa-size", type=positive_int, default=300, help="world, VLM checkpoints: unseen scenes for VQA (vqa_acc)")
    add_max_pixels(p, "--dataset folder or caption file: images (skipped and counted)")


def eval_command(args) -> None:
    import yaml

    from vlfm.checkpoint import load
    from vlfm.config import RunConfig, from_dict
    from vlfm.eval.tasks import append_csv, evaluate_task
    from vlfm.models import VisionLanguageModel

    path = Path(args.checkpoint)
    model = load(path, precision=args.precision)
    default_dir = path if path.is_dir() and (path / "config.yaml").is_file() else output_home(path)
    if isinstance(model, VisionLanguageModel):
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
        metrics = WorldBenchmark(world, args.classify_size, args.retrieval_size,
                                 ood_per_class=args.ood_per_class).evaluate(model)
        out = Path(args.out) if args.out else default_dir / "eval.json"
    else:
        two_tower(model, "eval")
        try:
            metrics = evaluate_task(model, args.task, args.dataset, args.features, args.max_pixels)
        except ValueError as error:
            raise UsageError(str(error)) from None
        name = Path(args.dataset).stem if Path(args.dataset).exists() else args.dataset
        out = Path(args.out) if args.out else default_dir / f"eval_{args.task}_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    append_csv(args.csv, str(path), args.dataset, args.task, metrics)
    print_json(metrics)
    print(f"wrote {out}; appended a row to {args.csv}")


def add_classify(p) -> None:
    p.add_argument("checkpoint")
    add_precision(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--labels", type=text, required=True, help='comma-separated labels, e.g. "a red circle,a blue square"')
    p.add_argument("--templates", help='comma-separated prompt templates with {}, e.g. "a photo of {}"')
    add_max_pixels(p)


def classify_command(args) -> None:
    from vlfm.checkpoint import load

    labels = [label.strip() for label in args.labels.split(",")]
    if not all(labels):
        raise UsageError(f"--labels {args.labels!r} holds an empty label; separate labels with single commas")
    if len(labels) < 2:
        raise UsageError("--labels needs at least two comma-separated labels")
    templates = [t.strip() for t in args.templates.split(",")] if args.templates else None
    if templates and any("{}" not in t for t in templates):
        raise UsageError("every template needs a {} where the label goes")
    model = two_tower(load(args.checkpoint, precision=args.precision), "classify")
    images = [open_image(p, args.max_pixels, model.preprocess_config.image_size) for p in args.images]
    probabilities = model.classify(images, labels, templates)
    width = max(len(label) for label in labels)
    for path, row in zip(args.images, probabilities):
        best = int(row.argmax())
        print(f"{path}: {labels[best]}")
        for label, p in sorted(zip(labels, row.tolist()), key=lambda t: -t[1]):
            print(f"  {label:<{width}}  {p:.3f}")


def add_embed(p) -> None:
    p.add_argument("checkpoint")
    add_precision(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="an image folder, a caption file (.csv/.tsv/.jsonl) or WebDataset shards "
                                         "(undecodable images are skipped and counted)")  # fmt: skip
    source.add_argument("--texts", help="text file, one text per line")
    p.add_argument("--out", required=True, help="output .npy (.npy is added if missing; a .txt beside it lists the rows)")
    add_collection_flags(p)


def embed_command(args) -> None:
    from vlfm.checkpoint import load

    out = Path(args.out)
    if out.suffix != ".npy":  # np.save would add it: name the file actually written
        out = out.with_name(out.name + ".npy")
    model = load(args.checkpoint, precision=args.precision)
    if args.images:
        return _embed_images(two_tower(model, "embed --images"), args, out)
    from vlfm.search.collection import save_embeddings

    text_file = Path(args.texts)
    if not text_file.is_file():
        raise FileNotFoundError(f"text file {str(text_file)!r} does not exist")
    rows = [line.strip() for line in text_file.read_text().splitlines() if line.strip()]
    if not rows:
        raise UsageError(f"{text_file} has no non-empty lines")
    embeddings = model.embed_texts(rows, args.batch_size)
    save_embeddings(out, embeddings.cpu().numpy(), rows)
    print(f"wrote {tuple(embeddings.shape)} embeddings to {out}")


def _embed_images(model, args, out: Path) -> None:
    """The collection pipeline (search/collection.py): chunks in OUT.parts/ until merged into OUT.npy + OUT.txt."""
    import shutil

    from vlfm.search.collection import Collection, embed_collection, write_embeddings

    collection = Collection.from_source(args.images)
    with distributed_run():
        work = out.with_suffix(".parts")
        paths = embed_collection(model, collection, work, args.batch_size, args.workers, args.chunk_size,
                                 args.max_pixels)  # fmt: skip
        if distributed.rank() == 0:
            stats = write_embeddings(paths, out)
            shutil.rmtree(work)
            print(json.dumps({**stats, "out": str(out)}))


def add_info(p) -> None:
    p.add_argument("checkpoint")


def info_command(args) -> None:
    from vlfm.checkpoint import load, resolve
    from vlfm.config import to_dict
    from vlfm.interop import detect
    from vlfm.models import ImageClassifier, LanguageModel, TwoTowerModel, VisionLanguageModel

    directory = resolve(args.checkpoint)
    model = load(args.checkpoint)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    print(f"checkpoint: {directory} (layout: {detect(directory)})")
    if isinstance(model, (VisionLanguageModel, LanguageModel)):
        describe(model, count)
    elif isinstance(model, TwoTowerModel):
        print(f"kind: {model.config.kind}  embed_dim: {model.config.embed_dim}  parameters: {count(model) / 1e6:.2f}M")
    elif isinstance(model, ImageClassifier):
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
    print(f"tokenizer: {f'{model.tokenizer.vocab_size} tokens' if model.tokenizer else 'none'}{preprocess}")
    print("files: " + ", ".join(sorted(p.name for p in directory.iterdir())) if directory.is_dir() else f"file: {directory}")


def add_convert(p) -> None:
    p.add_argument("checkpoint", help="vlfm run or checkpoint, Hugging Face CLIP/SigLIP/BERT/LLaVA/Llama/Qwen2 directory, open_clip weights, or a hub name (ORG/NAME[@REV], open_clip MODEL/TAG)")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--to", choices=("hf", "vlfm"), required=True,
                   help="hf: a directory transformers loads (CLIPModel / SiglipModel, LlamaForCausalLM / Qwen2ForCausalLM); "
                        "vlfm: vlfm's own format")
    p.add_argument("--config", help="open_clip only: the model-config JSON (e.g. ViT-B-32.json) if not beside the weights")


def convert_command(args) -> None:
    from vlfm.checkpoint import load
    from vlfm.interop import export_hf

    model = load(args.checkpoint, config=args.config)
    out = export_hf(model, args.out) if args.to == "hf" else model.save(args.out)
    print(f"wrote {args.to} checkpoint {out}")


def add_export(p) -> None:
    p.add_argument("checkpoint", help="an image-text model (any layout vlfm loads)")
    p.add_argument("out", help="output directory: image_encoder.onnx, text_encoder.onnx, preprocess.json, tokenizer.json")
    p.add_argument("--to", choices=("onnx",), required=True)


def export_command(args) -> None:
    from vlfm.checkpoint import load
    from vlfm.models.onnx import export_onnx

    out = export_onnx(two_tower(load(args.checkpoint), "export"), args.out)
    print(f"wrote {args.to} encoders to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


def add_verify(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory (vlfm, a Hugging Face export, a LoRA adapter), or a run "
                                      "directory (its model/ and every training checkpoint)")


def verify_command(args) -> int:
    """One line per problem (a file missing, cut short, changed since it was written, unreadable, a tensor holding
    NaN / inf), or one line per intact checkpoint; exit 2 when anything is damaged."""
    from vlfm.checkpoint import resolve, verify_checkpoint
    from vlfm.io import MANIFEST

    path = Path(args.checkpoint)
    steps = sorted(p for p in (path / "checkpoints").glob("step_*") if p.is_dir()) if path.is_dir() else []
    directories = ([path / "model"] if (path / "model").is_dir() else []) + steps
    if not directories or (path / "config.json").is_file():
        directories = [path if (path / "adapter_config.json").is_file() else resolve(path)]  # a LoRA adapter alone
    damaged = False
    for directory in directories:
        problems = verify_checkpoint(directory)
        for line in problems:
            print(line)
        damaged |= bool(problems)
        if not problems and directory.is_dir():
            sums = "sizes and sha256 match manifest.json" if (directory / MANIFEST).is_file() else (
                "no manifest.json (saved before manifests): files read, no checksums")
            print(f"{directory}: intact ({sums}; every tensor finite)")
    return 2 if damaged else 0
