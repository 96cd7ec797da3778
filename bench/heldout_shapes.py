"""How an assistant answers "what shape is the red object?" on scenes of held-out colour+shape pairs: where the
right shape ranks among the five shape words by the first answer token's logits, and which shape it names
instead. Right shapes ranked second or third point at the answer prior (the colour's training shapes); ranks
spread over all five at the shape reading itself. A diagnostic for docs/experiments.md §10.11.

    .venv/bin/python bench/heldout_shapes.py runs/VLM [--scenes 300] [--threads 2]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

import vlfm
from vlfm.config import load_config
from vlfm.data.shapes import SHAPES
from vlfm.data.world_text import question_kind
from vlfm.eval.vqa import VQASet
from vlfm.models.vlm import left_pad


@torch.no_grad()
def shape_ranks(model, data: VQASet, batch_size: int = 128) -> tuple[Counter, Counter]:
    """(rank of the right shape -> count, (right, named) -> count) over data's shape questions."""
    first = [model.tokenizer.encode(shape)[0] for shape in SHAPES]
    if len(set(first)) != len(SHAPES):
        raise SystemExit("the shape words share a first token: their logits cannot be told apart")
    items = [item for item in data.items if question_kind(item[1]) == "shape"]
    ranks, named = Counter(), Counter()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        rows = [model.prompt_ids([("user", f"{model.config.image_token}\n{q}")], images=1) for _, q, _ in chunk]
        ids, mask = left_pad(rows, model.tokenizer.pad_id)
        pixels = model.preprocess_config.normalize(data.pixels[[i for i, _, _ in chunk]].to(model.device))
        logits = model(ids.to(model.device), pixels, attention_mask=mask.to(model.device))[:, -1, first]
        for (_, _, answer), row in zip(chunk, logits):
            order = [SHAPES[k] for k in row.argsort(descending=True).tolist()]
            ranks[order.index(answer)] += 1
            named[answer, order[0]] += 1
    return ranks, named


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = vlfm.load(args.run).eval()
    world = load_config(f"{args.run}/config.yaml", []).data.world
    ranks, named = shape_ranks(model, VQASet(world, "heldout", args.scenes))
    total = sum(ranks.values())
    print(f"{total} shape questions on {args.scenes} held-out scenes; rank of the right shape (1 = named):")
    print("  " + ", ".join(f"{r + 1}: {ranks[r]}" for r in range(len(SHAPES))))
    print("right -> named instead (most often):")
    for (right, pick), n in named.most_common(12):
        if right != pick:
            print(f"  {right:>8} -> {pick:<8} {n}")


if __name__ == "__main__":
    main()
