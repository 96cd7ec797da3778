"""The built-in world's benchmark: zero-shot classification of colour+shape combinations never seen in
training, and text<->image retrieval over held-out scenes.

Zero-shot sets are single-object scenes classified among all 30 "colour shape" labels, so a held-out "red
circle" must beat the seen "red square" and "blue circle". Retrieval queries are each scene's canonical
caption; every scene that carries that caption is a positive (`t2i_r1`), and `*_strict` counts only the scene
the caption was written for.
"""

from __future__ import annotations

import numpy as np
import torch

from vlfm.data.shapes import ALL_LABELS, ShapesWorld, WorldConfig, captions, render_many, with_article
from vlfm.data.transforms import to_uint8_tensor
from vlfm.eval.retrieval import retrieval
from vlfm.eval.zeroshot import zeroshot_classification

# Prompt templates for the world's class names ("a red circle", "an orange star"): the openings the world's
# own captions use. The first alone is the single-template baseline the ensemble is compared with.
TEMPLATES = ["{}", "a photo of {}", "a picture of {}", "an image of {}", "there is {}"]



class WorldBenchmark:
    def __init__(self, world_config: WorldConfig, classify_size: int = 500, retrieval_size: int = 1000, workers: int = 2):
        world = ShapesWorld(world_config)
        self.labels = list(ALL_LABELS)
        self.classnames = [with_article(label) for label in self.labels]
        self.sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, combos in (("heldout", world.held_out_labels), ("seen", world.seen_labels)):
            if not combos or not classify_size:
                continue
            scenes = [world.single_object_scene(i, combos) for i in range(classify_size)]
            pixels = to_uint8_tensor([world.render(s) for s in scenes])
            targets = torch.tensor([self.labels.index(s.objects[0].label) for s in scenes])
            self.sets[name] = (pixels, targets)
        self.retrieval_images = torch.empty(0)
        if retrieval_size:
            images, scenes = render_many(world, "val", retrieval_size, workers=workers)
            self.retrieval_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
            caption_sets = [set(captions(s)) for s in scenes]
            self.queries = [captions(s)[0] for s in scenes]
            self.positives = torch.tensor(np.array([[q in c for c in caption_sets] for q in self.queries]))
            self.strict = torch.eye(len(scenes), dtype=torch.bool)

    @torch.no_grad()
    def evaluate(self, model, templates: list[str] | None = None) -> dict[str, float]:
        templates = templates or TEMPLATES
        normalize = model.preprocess_config.normalize
        out: dict[str, float] = {}
        for name, (pixels, targets) in self.sets.items():
            metrics = zeroshot_classification(model, normalize(pixels), targets, self.classnames, templates)
            prefix = "zeroshot" if name == "heldout" else "zeroshot_seen"
            out.update({f"{prefix}_{k}": v for k, v in metrics.items()})
            if name == "heldout":
                single = zeroshot_classification(model, normalize(pixels), targets, self.classnames, templates[:1])
                out["zeroshot_top1_single_template"] = single["top1"]
        if len(self.retrieval_images):
            pixels = normalize(self.retrieval_images)
            out.update(retrieval(model, pixels, self.queries, self.positives))
            strict = retrieval(model, pixels, self.queries, self.strict, ks=(1, 5))
            out.update({f"{k}_strict": v for k, v in strict.items()})
        return out
