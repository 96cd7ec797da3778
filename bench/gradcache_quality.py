"""Does a batch built from micro-batches train as well as the real thing? Three CLIP runs on the built-in world,
same seed, same steps, same 256 samples per step, each a `vlfm train` subprocess (so one cannot warm another):

- batch 256                      : one batch of 256, the reference;
- 8 x 32 GradCache               : train.gradcache=true, one loss over all 256 (the micro-batches' embeddings
                                   cached without gradients, then each re-run with its slice of the gradient);
- 8 x 32 plain accumulation      : each micro-batch its own loss over 32 (31 negatives instead of 255).

Prints zero-shot top-1 (held-out colour+shape pairs, and seen ones) and text->image R@1 of each run, and its wall time
(the ratio of the GradCache run to the reference is its cost: every micro-batch runs its forward twice).

    .venv/bin/python bench/gradcache_quality.py --steps 300 --out runs/bench-gradcache
    .venv/bin/python bench/gradcache_quality.py --steps 300 -o model.vision.stem=patch   # no BatchNorm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "batch 256": ["train.batch_size=256"],
    "8 x 32 GradCache": ["train.batch_size=32", "train.grad_accum=8", "train.gradcache=true"],
    "8 x 32 plain accumulation": ["train.batch_size=32", "train.grad_accum=8"],
}
METRICS = ("zeroshot_top1", "zeroshot_seen_top1", "t2i_r1", "i2t_r1")  # zeroshot_top1: held-out pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shapes-clip.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-gradcache")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("-o", "--override", action="append", default=[], help="more config overrides for every run")
    args = parser.parse_args()
    vlfm = str(Path(sys.executable).with_name("vlfm"))
    rows = {}
    for name in args.variants:
        overrides = VARIANTS[name] + args.override
        run = Path(args.out) / name.replace(" ", "")
        common = [f"name={run.name}", f"output_dir={run.parent}", f"train.steps={args.steps}", f"train.lr={args.lr}",
                  "train.warmup_steps=40", "train.eval_every=0", "train.save_every=0", f"train.threads={args.threads}"]
        command = [vlfm, "train", args.config] + [x for o in common + overrides for x in ("-o", o)]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        metrics = json.loads((run / "eval.json").read_text())
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        rows[name] = {"seconds": round(seconds, 1), **{k: metrics.get(k) for k in METRICS}, "losses": losses}
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "losses"}), flush=True)
    print(f"\n{'variant':28s} {'seconds':>8s} " + " ".join(f"{m:>22s}" for m in METRICS))
    for name, row in rows.items():
        cells = " ".join(f"{row[m]:22.3f}" if row[m] is not None else f"{'-':>22s}" for m in METRICS)
        print(f"{name:28s} {row['seconds']:8.1f} {cells}")
    names = list(rows)
    for other in names[1:]:  # the same samples and captions each step: the loss curves should follow each other
        a, b = rows[names[0]]["losses"], rows[other]["losses"]
        gap = max(abs(x - y) for x, y in zip(a, b)) if a and b else float("nan")
        print(f"largest logged-loss gap, {other} vs {names[0]}: {gap:.4f} (final losses {a[-1]:.4f} / {b[-1]:.4f})")
    (Path(args.out) / "gradcache_quality.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
