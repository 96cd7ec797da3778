"""VQA on the built-in world: every question of scenes never seen in training, answered by greedy decoding
and scored by exact match against the world's one-word answers, overall and per question kind."""

from __future__ import annotations

from collections import defaultdict

import torch

from vlfm.data.chat import exact_match
from vlfm.data.shapes import ShapesWorld, WorldConfig, render_many
from vlfm.data.world_text import question_kind, questions
from vlfm.models.vlm import left_pad


class VQASet:
    """Scenes `start..start+n-1` of a world split with all their questions."""

    def __init__(self, world_config: WorldConfig, split: str = "val", n: int = 300, workers: int = 2):
        images, scenes = render_many(ShapesWorld(world_config), split, n, workers=workers)
        self.pixels = torch.from_numpy(images)  # uint8 (n, 3, H, W)
        self.items = [(i, q, a) for i, scene in enumerate(scenes) for q, a in questions(scene)]

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
