"""VQA on the built-in world: every question of scenes never seen in training, answered by greedy decoding
and scored by exact match against the world's one-word answers, overall and per question kind."""

from __future__ import annotations

from collections import defaultdict

import torch

from vlfm.data.chat import exact_match
from vlfm.data.draw import render_many
from vlfm.data.ood import render_scene
from vlfm.data.shapes import ShapesWorld, WorldConfig
from vlfm.data.transforms import to_uint8_tensor
from vlfm.data.world_text import question_kind, questions
from vlfm.models.vlm import left_pad


class VQASet:
    """Scenes `0..n-1` of a world split with all their questions. `wordings`: questions()' (one, or heldout:
    wordings training never asks); `renderer`: world, or ood (the same scenes drawn by data/ood.py, digit scenes
    left out: that renderer draws shapes only)."""

    def __init__(self, world_config: WorldConfig, split: str = "val", n: int = 300, workers: int = 2,
                 wordings: str = "one", renderer: str = "world"):  # fmt: skip
        if renderer == "world":
            images, scenes = render_many(ShapesWorld(world_config), split, n, workers=workers)
            self.pixels = torch.from_numpy(images)  # uint8 (n, 3, H, W)
        elif renderer == "ood":
            world = ShapesWorld(world_config)
            scenes = [s for s in (world.scene(split, i) for i in range(n)) if s.digit is None]
            self.pixels = to_uint8_tensor([render_scene(s, world_config.image_size) for s in scenes])
        else:
            raise ValueError(f"renderer={renderer!r} is not world or ood")
        self.items = [(i, q, a) for i, scene in enumerate(scenes) for q, a in questions(scene, wordings=wordings)]

    def __len__(self) -> int:
        return len(self.items)


@torch.no_grad()
def vqa_accuracy(model, data: VQASet, limit: int | None = None, batch_size: int = 128, prefix: str = "vqa") -> dict:
    """`{prefix}_acc` over the first `limit` questions (all by default) and `{prefix}_acc_{kind}`."""
    was_training = model.training
    model.eval()
    items = data.items[:limit]
    right: dict[str, list[bool]] = defaultdict(list)
    token = model.config.image_token
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        rows = [model.prompt_ids([("user", f"{token}\n{q}")], images=1) for _, q, _ in chunk]
        ids, mask = left_pad(rows, model.tokenizer.pad_id)
        pixels = model.preprocess_config.normalize(data.pixels[[i for i, _, _ in chunk]].to(model.device))
        out = model.generate(ids.to(model.device), mask.to(model.device), pixels, max_new_tokens=4)
        for (_, q, answer), tokens in zip(chunk, out):
            ok = exact_match(model.tokenizer.decode(tokens), answer)
            right["all"].append(ok)
            right[question_kind(q)].append(ok)
    model.train(was_training)
    metrics = {f"{prefix}_acc": sum(right.pop("all")) / max(1, len(items))}
    metrics.update({f"{prefix}_acc_{kind}": sum(v) / len(v) for kind, v in sorted(right.items())})
    return metrics
