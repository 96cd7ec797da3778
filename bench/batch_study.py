"""The sigmoid (SigLIP) loss against the softmax (CLIP) loss over batch sizes, at the same number of samples seen.

The claim measured (SigLIP, Zhai et al. 2023): the sigmoid loss beats the softmax loss at small batches and
matches it at large ones. Every run trains `configs/shapes-clip.yaml`'s model and data on the built-in world,
changing only the loss (`model.kind`: clip, or siglip with its bias, initialised at -ln B, and the SigLIP
preset's 10x learning rate for temperature and bias) and the batch: `--samples` samples seen at every batch
size (steps = samples / batch), the learning rate scaled by sqrt(batch / 64) from the preset's (tuned at 64),
warmup 10% of the steps, `--seeds` seeds each (the seed sets the initial weights and the batch order; the scenes
are the same). Measured at the end: held-out zero-shot top-1 (the five never-seen colour+shape pairs, 30 labels)
and text -> image R@1, from the run's own evaluation.

Runs go `--jobs` at a time, one torch thread each, in worker processes that render the world's scenes once and
reuse them (the same world config in every run). Prints a table (markdown) and JSON; writes the plot (`--plot`).

    .venv/bin/python bench/batch_study.py --plot docs/batch_study.png        # 2 losses x 4 batches x 3 seeds
    .venv/bin/python bench/batch_study.py --batches 16 256 --seeds 0 --samples 4096 --plot /tmp/s.png  # a look
    .venv/bin/python bench/batch_study.py --samples 4096 --merge s0.log s1.log --plot both.png  # seeds run apart
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial

PRESET = "configs/shapes-clip.yaml"
METRICS = ("zeroshot_top1", "t2i_r1")


def _cached_render(original):
    cache: dict = {}

    def render(world, split, n, start=0, workers=2):
        key = (repr(world.config), split, n, start)
        if key not in cache:
            cache[key] = original(world, split, n, start, workers=1)
        return cache[key]

    return render


def _init_worker() -> None:
    import torch

    import vlfm.eval.world
    import vlfm.train.contrastive

    torch.set_num_threads(1)
    vlfm.train.contrastive.render_many = _cached_render(vlfm.train.contrastive.render_many)
    vlfm.eval.world.render_many = _cached_render(vlfm.eval.world.render_many)


def train_one(job: tuple[str, int, int], samples: int, out: str, extra: list[str]) -> dict:
    from vlfm.config import load_config
    from vlfm.train import run

    loss, batch, seed = job
    steps = max(1, samples // batch)
    overrides = [f"name={loss}-b{batch}-s{seed}", f"output_dir={out}", f"model.kind={loss}",
                 f"train.batch_size={batch}", f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                 f"train.seed={seed}", "train.eval_every=0", "train.save_every=0", "train.threads=1",
                 "data.ood_per_class=0", "data.workers=1"]
    if loss == "siglip":
        overrides += [f"model.logit_bias_init={-math.log(batch):.4f}", "train.logit_lr_mult=10"]
    config = load_config(PRESET, overrides + extra)
    config.train.lr *= math.sqrt(batch / 64)
    start = time.perf_counter()
    metrics = run(config)
    return {"loss": loss, "batch": batch, "seed": seed, "steps": steps, "lr": round(config.train.lr, 6),
            "seconds": round(time.perf_counter() - start, 1), **{m: round(metrics[m], 4) for m in METRICS}}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(10, 4))
    for ax, metric in zip(axes, METRICS):
        for loss, colour in (("clip", "tab:blue"), ("siglip", "tab:orange")):
            batches = sorted({r["batch"] for r in rows if r["loss"] == loss})
            values = [[r[metric] for r in rows if r["loss"] == loss and r["batch"] == b] for b in batches]
            for b, v in zip(batches, values):
                ax.scatter([b] * len(v), v, color=colour, alpha=0.4, s=12)
            ax.plot(batches, [statistics.mean(v) for v in values], color=colour, marker="o", label=loss)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size (same samples seen)")
        ax.set_title({"zeroshot_top1": "held-out zero-shot top-1", "t2i_r1": "text -> image R@1"}[metric])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=32768, help="samples seen by every run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--plot", default="batch_study.png")
    parser.add_argument("-o", dest="overrides", action="append", default=[], help="extra config override")
    parser.add_argument("--merge", nargs="+", metavar="LOG", help="no training: the table and plot of earlier runs' "
                        "printed JSON (the same --samples), e.g. seeds run as separate processes")
    args = parser.parse_args()
    if args.merge:
        rows = [row for path in args.merge for row in _saved_rows(path, args.samples)]
        runs = [(r["loss"], r["batch"], r["seed"]) for r in rows]
        if twice := sorted({run for run in runs if runs.count(run) > 1}):
            raise SystemExit(f"--merge: these (loss, batch, seed) runs are in more than one log: {twice}")
    else:
        jobs = [(loss, b, s) for s in args.seeds for b in args.batches for loss in ("clip", "siglip")]
        with tempfile.TemporaryDirectory() as out, ProcessPoolExecutor(args.jobs, initializer=_init_worker) as pool:
            rows = list(pool.map(partial(train_one, samples=args.samples, out=out, extra=args.overrides), jobs))
        print(json.dumps({"bench": "batch_study", "samples": args.samples, "rows": rows}))
    batches = sorted({r["batch"] for r in rows})
    print(f"\n| batch | steps | {' | '.join(f'{loss} {m}' for m in METRICS for loss in ('clip', 'siglip'))} | seeds |")
    print("| --- | --- |" + " --- |" * (2 * len(METRICS) + 1))
    for b in batches:
        cells = []
        for metric in METRICS:
            for loss in ("clip", "siglip"):
                v = [r[metric] for r in rows if r["loss"] == loss and r["batch"] == b]
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                cells.append(f"{statistics.mean(v):.3f} +- {sd:.3f}")
        seeds = len({r["seed"] for r in rows if r["batch"] == b})
        print(f"| {b} | {max(1, args.samples // b)} | {' | '.join(cells)} | {seeds} |")
    plot(rows, args.plot)
    print(f"plot: {args.plot}")


def _saved_rows(path: str, samples: int) -> list[dict]:
    """The rows of a log this script printed (its one JSON line); refuses a log of another --samples."""
    with open(path) as f:
        saved = [json.loads(line) for line in f if line.startswith('{"bench": "batch_study"')]
    if not saved:
        raise SystemExit(f"{path}: no batch_study JSON line (a finished run of this script prints one)")
    if saved[-1]["samples"] != samples:
        raise SystemExit(f"{path}: runs of {saved[-1]['samples']} samples, not --samples {samples}")
    return saved[-1]["rows"]


if __name__ == "__main__":
    main()
