"""The built-in world's benchmark: zero-shot classification of colour+shape combinations never seen in
training, and text<->image retrieval over held-out scenes.

Zero-shot sets are single-object scenes classified among all 30 "colour shape" labels, so a held-out "red
circle" must beat the seen "red square" and "blue circle". The `zeroshot_unseen_*` metrics classify every
single-object scene (seen and held-out combinations) with words the world's captions never use: synonyms for
the colours or shapes, and prompt openings no caption has. Retrieval queries are each scene's canonical
caption; every scene that carries that caption is a positive (`t2i_r1`), and `*_strict` counts only the scene
the caption was written for. `ood_*` are the same 30-way zero-shot (`ood_zeroshot_top1`) and class-name text ->
image precision@k (`ood_t2i_p10`) on shapes-ood, the independent renderer's drawings (data/ood.py), beside the
in-domain single-object scenes' precision (`single_t2i_p10`).
"""

from __future__ import annotations

import numpy as np
import torch

from vlfm.data.datasets import TEMPLATES as DATASET_TEMPLATES
from vlfm.data.datasets import shapes_ood
from vlfm.data.draw import render_many
from vlfm.data.shapes import ALL_LABELS, COLOURS, SHAPES, ShapesWorld, WorldConfig
from vlfm.data.transforms import to_uint8_tensor
from vlfm.data.world_text import captions, with_article
from vlfm.eval.retrieval import class_retrieval, retrieval
from vlfm.eval.zeroshot import zeroshot_classification

# Prompt templates for the world's class names ("a red circle", "an orange star"): the openings the world's
# own captions use. The first alone is the single-template baseline the ensemble is compared with.
TEMPLATES = DATASET_TEMPLATES["shapes"]

# Words that never occur in the world's captions (tests/test_eval.py checks this): one common synonym for each
# colour and shape, and prompt openings no caption uses. A tokenizer trained on the captions cannot read them; a
# pretrained text tower (the LiT preset) can.
SYNONYMS = {
    "red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden", "purple": "violet",
    "orange": "tangerine", "circle": "ball", "square": "box", "triangle": "pyramid", "star": "pentagram",
    "cross": "plus sign",
}  # fmt: skip
UNSEEN_TEMPLATES = ["an illustration of {}", "a rendering of {}", "a painting of {}", "a cartoon of {}", "a sketch of {}"]



class WorldBenchmark:
    def __init__(self, world_config: WorldConfig, classify_size: int = 500, retrieval_size: int = 1000, workers: int = 2,
                 ood_per_class: int = 0):  # fmt: skip
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
        if self.sets:  # every single-object scene, for the unseen-words metrics
            self.single = tuple(torch.cat(parts) for parts in zip(*self.sets.values()))
        self.ood = shapes_ood(ood_per_class) if ood_per_class else None
        self.retrieval_images = torch.empty(0)
        if retrieval_size:
            images, scenes = render_many(world, "val", retrieval_size, workers=workers)
            self.retrieval_images = torch.from_numpy(images)
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
            px = normalize(pixels)
            metrics = zeroshot_classification(model, px, targets, self.classnames, templates)
            prefix = "zeroshot" if name == "heldout" else "zeroshot_seen"
            out.update({f"{prefix}_{k}": v for k, v in metrics.items()})
            if name == "heldout":
                single = zeroshot_classification(model, px, targets, self.classnames, templates[:1])
                out["zeroshot_top1_single_template"] = single["top1"]
                out.update(self.factors(model, px, targets, templates))
        if self.sets:
            out.update(self.unseen_words(model))
            single = class_retrieval(model, normalize(self.single[0]), self.single[1], self.classnames)
            out.update({f"single_{k}": v for k, v in single.items()})
        if self.ood is not None:
            out.update(self.out_of_domain(model, templates))
        if len(self.retrieval_images):
            pixels = normalize(self.retrieval_images)
            out.update(retrieval(model, pixels, self.queries, self.positives))
            strict = retrieval(model, pixels, self.queries, self.strict, ks=(1, 5))
            out.update({f"{k}_strict": v for k, v in strict.items()})
        return out

    @torch.no_grad()
    def out_of_domain(self, model, templates: list[str]) -> dict[str, float]:
        pixels = model.preprocess(self.ood.images)  # preprocessed once for classification and search
        metrics = zeroshot_classification(model, pixels, self.ood.targets, self.classnames, templates)
        out = {f"ood_zeroshot_{k}": v for k, v in metrics.items()}
        out.update({f"ood_{k}": v for k, v in class_retrieval(model, pixels, self.ood.targets, self.classnames).items()})
        return out

    @torch.no_grad()
    def factors(self, model, pixels, targets: torch.Tensor, templates: list[str]) -> dict[str, float]:
        """The held-out images' colour alone ("a red shape", 6-way) and shape alone ("a circle", 5-way): which
        factor of a held-out combination the image tower fails to read."""
        parts = [self.labels[t].split() for t in targets.tolist()]
        out = {}
        for key, names, i, form in (("colour", list(COLOURS), 0, "{} shape"), ("shape", list(SHAPES), 1, "{}")):
            classnames = [with_article(form.format(n)) for n in names]
            factor = torch.tensor([names.index(p[i]) for p in parts])
            metrics = zeroshot_classification(model, pixels, factor, classnames, templates)
            out[f"zeroshot_{key}_only_top1"] = metrics["top1"]
        return out

    @torch.no_grad()
    def unseen_words(self, model) -> dict[str, float]:
        """Top-1 over the 30 labels with unseen prompt openings; with synonyms for colours, shapes, or both."""
        pixels, targets = model.preprocess_config.normalize(self.single[0]), self.single[1]

        def renamed(colour: bool, shape: bool) -> list[str]:
            names = []
            for label in self.labels:
                c, s = label.split()
                names.append(with_article(f"{SYNONYMS[c] if colour else c} {SYNONYMS[s] if shape else s}"))
            return names

        out = {}
        for name, (colour, shape) in {"templates": (False, False), "colours": (True, False), "shapes": (False, True),
                                      "words": (True, True)}.items():  # fmt: skip
            metrics = zeroshot_classification(model, pixels, targets, renamed(colour, shape), UNSEEN_TEMPLATES)
            out[f"zeroshot_unseen_{name}_top1"] = metrics["top1"]
        return out
