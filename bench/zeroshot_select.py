"""Zero-shot choices made on a validation split only: every saved checkpoint of a run x every prompt choice (each
template alone, the template ensemble, the ensemble with the class names' synonyms; the same for `--templates`,
such as the forms of the training captions) scored on `--val`; the best
on `--val` is reported on `--test`, with the whole grid for the record (the test column is never used to choose).

    .venv/bin/python bench/zeroshot_select.py runs/NAME                        # digits-val -> digits-test
    .venv/bin/python bench/zeroshot_select.py runs/NAME --templates "the number {}" "a drawing of the digit {}"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import vlfm
from vlfm.data.datasets import load_dataset
from vlfm.eval.zeroshot import zeroshot_classification


def prompt_choices(data, extra: list[str]) -> dict[str, tuple[list, list[str]]]:
    """name -> (class names or synonym lists, templates): the set's templates and `extra` ones, each alone and
    as an ensemble, with the class names or (where the set has them) their synonyms."""
    choices = {f"{t!r}": (data.classnames, [t]) for t in [*data.templates, *extra]}
    for name, templates in (("ensemble", data.templates), ("extra ensemble", extra)):
        if len(templates) > 1:
            choices[name] = (data.classnames, templates)
            if data.synonyms:
                choices[f"{name} + synonyms"] = (data.synonyms, templates)
    return choices


def checkpoints(run: Path) -> list[Path]:
    saved = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
    return saved or [run]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory (its checkpoints/step_* are the candidates)")
    parser.add_argument("--val", default="digits-val")
    parser.add_argument("--test", default="digits-test")
    parser.add_argument("--templates", nargs="*", default=[], help="more candidate templates ('{}': the class)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    val, test = load_dataset(args.val), load_dataset(args.test)
    rows = []
    for path in checkpoints(args.run):
        model = vlfm.load(path, "cpu")
        vpx, tpx = model.preprocess(val.images), model.preprocess(test.images)
        for name, (classes, templates) in prompt_choices(val, args.templates).items():
            v = zeroshot_classification(model, vpx, val.targets, classes, templates)["top1"]
            t = zeroshot_classification(model, tpx, test.targets, classes, templates)["top1"]
            rows.append({"checkpoint": path.name, "prompts": name, "val_top1": v, "test_top1": t})
    print(f"| checkpoint | prompts | {args.val} top-1 | {args.test} top-1 |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['prompts']} | {r['val_top1']:.3f} | {r['test_top1']:.3f} |")
    best = max(rows, key=lambda r: r["val_top1"])  # chosen on validation alone
    print(json.dumps({"chosen_on": args.val, **best}))


if __name__ == "__main__":
    main()
