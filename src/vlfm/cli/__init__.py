"""`vlfm` command line: one table of subcommands, each with its argument builder and its function.

Errors a user can fix (a config key, a missing file, a non-image, a checkpoint without weights) print one line
and exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from vlfm.cli import assistant, models, search, serve, training
from vlfm.io import VlfmError

# name -> (help, adds the arguments, runs the command)
COMMANDS = {
    "train": ("train a model from a YAML preset (configs/*.yaml)", training.add_train, training.train_command),
    "eval": ("evaluate a model: the built-in world's benchmark, or a task on a dataset", models.add_eval, models.eval_command),
    "classify": ("zero-shot classify images among natural-language labels", models.add_classify, models.classify_command),
    "embed": ("write normalised embeddings of texts, or of a collection of images (decoding workers, resumable, "
              "torchrun), to a .npy file", models.add_embed, models.embed_command),
    "info": ("describe a checkpoint: architecture, sizes, files", models.add_info, models.info_command),
    "verify": ("check a checkpoint's files against its manifest (sizes, sha256) and every tensor for NaN / inf",
               models.add_verify, models.verify_command),
    "convert": ("convert a checkpoint: vlfm / Hugging Face / open_clip -> vlfm or Hugging Face", models.add_convert,
                models.convert_command),
    "export": ("export a model's image and text encoders for deployment: ONNX graphs (dynamic batch) with the "
               "preprocessing and tokenizer files", models.add_export, models.export_command),
    "data": ("data tools: shard (write WebDataset shards)", training.add_data, training.data_command),
    "adapt": ("fine-tune the image tower on a labelled set (full or LoRA), with a WiSE-FT curve", training.add_adapt,
              training.adapt_command),
    "index": ("nearest-neighbour index of images: build (or resume) | add", search.add_index, search.index_command),
    "search": ("query an index with a text (text -> image) or an image (image -> image)", search.add_search,
               search.search_command),
    "chat": ("talk with a trained assistant about an image (interactive, or --prompt once)", assistant.add_chat,
             assistant.chat_command),
    "serve": ("serve a model over HTTP: embeddings, zero-shot, search and chat APIs and a web page", serve.add_serve,
              serve.serve_command),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlfm", description="A compact toolkit for vision-language foundation models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command][2](args) or 0
    except (VlfmError, FileNotFoundError) as error:
        print(f"vlfm {args.command}: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
