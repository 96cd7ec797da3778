"""Rendering the built-in world (scenes: data/shapes.py, pixels: data/draw.py): scenes/s of
`render_many(..., workers=0)` (scene records and images, one process), against a baseline copy loaded under
another module name in the same process, timed interleaved (rounds alternate) so that the shared CPU's load
hits both alike. The baseline is another version of data/draw.py (it imports this checkout's data/shapes.py,
so it times only the renderer), or a data/shapes.py from before the renderer moved to data/draw.py (world and
renderer in one file). Both must return the same images and scene records (checked). The numbers are printed
only.

    git show main:src/vlfm/data/draw.py > /tmp/draw_main.py
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/render.py --baseline /tmp/draw_main.py
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/render.py   # this checkout alone
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from types import SimpleNamespace

import numpy as np

from vlfm.data import draw, shapes

WORLDS = {  # the presets' worlds (configs/*.yaml data.world)
    "plain": {},
    "off_palette": {"colour_free_fraction": 0.45, "colour_free_style": "off_palette"},
    "grey": {"colour_free_fraction": 0.3, "colour_free_style": "grey"},
}


def load_baseline(path: str):
    """The module at `path`; `timed` uses its ShapesWorld, WorldConfig and render_many (a draw.py has the
    first two from its import of vlfm.data.shapes)."""
    spec = importlib.util.spec_from_file_location("vlfm.data._shapes_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def timed(module, world: dict, split: str, n: int) -> tuple[float, np.ndarray, list]:
    w = module.ShapesWorld(module.WorldConfig(**world))
    t = time.process_time()  # CPU time: the shared machine's load barely moves it
    images, scenes = module.render_many(w, split, n, workers=0)
    return time.process_time() - t, images, scenes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="path of another draw.py (or a pre-split shapes.py) to compare with")
    p.add_argument("--n", type=int, default=2000, help="scenes per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--split", default="train")
    args = p.parse_args()
    this = SimpleNamespace(
        ShapesWorld=shapes.ShapesWorld, WorldConfig=shapes.WorldConfig, render_many=draw.render_many
    )
    modules = {"this": this} | ({"baseline": load_baseline(args.baseline)} if args.baseline else {})
    for name, world in WORLDS.items():
        best = dict.fromkeys(modules, float("inf"))
        for _ in range(args.rounds):
            out = {}
            for key, module in modules.items():
                dt, images, scenes = timed(module, world, args.split, args.n)
                best[key], out[key] = min(best[key], dt), (images, repr(scenes))
            if "baseline" in out:
                assert np.array_equal(out["this"][0], out["baseline"][0]) and out["this"][1] == out["baseline"][1]
        line = "  ".join(f"{k} {args.n / v:7.0f} scenes/s" for k, v in best.items())
        ratio = f"  speed-up x{best['baseline'] / best['this']:.2f}" if args.baseline else ""
        print(f"{name:12s} {args.split} n={args.n}: {line}{ratio}", flush=True)


if __name__ == "__main__":
    main()
