"""Which drawing factor of shapes-ood costs a trained model most: its 30-way zero-shot top-1 on shapes-ood as it
is, and with one factor at a time drawn as the built-in world draws it.

shapes-ood (data/ood.py) differs from the world in its paper (white, pastel gradient, dark slate; the world's is
light grey), outlines and drop shadows, its shades of the six colours, turned shapes, larger objects, and the
shapes' proportions (an equilateral triangle, a thinner star and cross). Each row swaps one of them for the
world's (light grey paper, plain fills, the world's colours, no turn, the world's object size), and the last row
all of them but the proportions; besides top-1, the share of predictions with the right colour and the right
shape, and per shape. The swaps patch data/ood.py's private drawing functions inside this process only: a
diagnostic, not an evaluation set.

    .venv/bin/python bench/ood_factors.py runs/NAME [--threads 2]
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import numpy as np
import torch

import vlfm
from vlfm.data import ood
from vlfm.data.datasets import shapes_ood
from vlfm.data.shapes import ALL_LABELS, COLOURS


def grey_paper(rng, n):
    rng.choice(3)  # the draw the original makes, so every later draw is the same
    return np.full((n, n, 3), rng.uniform(150, 200)), False


def plain_paint(canvas, dark, colour, shape, cx, cy, radius, rng):
    """ood._paint without the drop shadow and the outline (the same draws, so the same turn and shade)."""
    turn = np.deg2rad(rng.uniform(-1, 1) * ood._MAX_TURN[shape])
    rng.random()
    fill = np.clip(np.array(ood.OOD_COLOURS[colour]) + rng.uniform(-10, 10, size=3), 0, 255)
    body = ood._coverage(shape, canvas.shape[0], cx, cy, radius, turn)[..., None]
    return canvas * (1 - body) + fill * body


def world_size_draw(colour, shape, seed):
    """ood.draw with the world's object size (radius x 0.55: 19-42% of the frame across, the world's 19-44%)."""
    rng = np.random.default_rng([seed, 3003])
    n = ood.SIZE
    canvas, dark = ood._paper(rng, n)
    radius = rng.uniform(0.17, 0.38) * n * 0.55
    cx, cy = rng.uniform(radius + 2, n - radius - 2, size=2)
    return ood._finish(ood._paint(canvas, dark, colour, shape, cx, cy, radius, rng), rng)


WORLD_COLOURS = {k: tuple(int(c) for c in v) for k, v in COLOURS.items()}
NO_TURN = dict.fromkeys(ood._MAX_TURN, 0.0)
SWAPS = {
    "shapes-ood as it is": {},
    "light grey paper": {"_paper": grey_paper},
    "no outline, no shadow": {"_paint": plain_paint},
    "the world's colours": {"OOD_COLOURS": WORLD_COLOURS},
    "no turn": {"_MAX_TURN": NO_TURN},
    "the world's object size": {"draw": world_size_draw},
    "all of these but proportions": {"_paper": grey_paper, "_paint": plain_paint, "OOD_COLOURS": WORLD_COLOURS,
                                     "_MAX_TURN": NO_TURN},
}  # fmt: skip


@contextmanager
def patched(swaps: dict):
    saved = {name: getattr(ood, name) for name in swaps}
    for name, value in swaps.items():
        setattr(ood, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ood, name, value)


@torch.no_grad()
def scores(model, per_class: int) -> dict:
    data = shapes_ood(per_class)
    classes = model.label_embeddings(data.classnames, data.templates)
    pred = (model.embed_images(model.preprocess(data.images)) @ classes.T).argmax(1).tolist()
    true = [ALL_LABELS[t].split() for t in data.targets.tolist()]
    got = [ALL_LABELS[p].split() for p in pred]
    out = {"top1": np.mean([g == t for g, t in zip(got, true)]), "colour": np.mean([g[0] == t[0] for g, t in zip(got, true)]),
           "shape": np.mean([g[1] == t[1] for g, t in zip(got, true)])}  # fmt: skip
    for shape in dict.fromkeys(t[1] for t in true):
        out[shape] = np.mean([g[1] == t[1] for g, t in zip(got, true) if t[1] == shape])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained two-tower run (or model directory)")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = vlfm.load(args.run, "cpu")
    rows = []
    for name, swaps in SWAPS.items():
        with patched(swaps):
            rows.append((name, scores(model, args.per_class)))
    keys = list(rows[0][1])
    print(f"| {args.run} | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for name, row in rows:
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
