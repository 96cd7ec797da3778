import ast
import inspect

import numpy as np
import pytest
import torch

import vlfm.data.ood as ood
from vlfm.data.datasets import load_dataset
from vlfm.data.shapes import ALL_LABELS, COLOURS, SHAPES
from vlfm.eval.retrieval import class_retrieval


def test_a_renderer_of_its_own():
    imports = {(node.module, alias.name) for node in ast.walk(ast.parse(inspect.getsource(ood)))
               if isinstance(node, ast.ImportFrom) for alias in node.names}  # fmt: skip
    # none of the world's drawing code (data/draw.py, data/randomise.py) nor PIL's drawing: only the label names
    assert {m for m, _ in imports if m.startswith("vlfm")} == {"vlfm.data.shapes"}
    assert ("vlfm.data.shapes", "ALL_LABELS") in imports and len([m for m, _ in imports if m.startswith("vlfm")]) == 1
    assert ("PIL", "ImageDraw") not in imports and "ImageDraw." not in inspect.getsource(ood)
    assert set(ood.OOD_COLOURS) == set(COLOURS) and set(ood._MAX_TURN) == set(SHAPES)
    assert all(ood.OOD_COLOURS[c] != COLOURS[c] for c in COLOURS)  # other shades of the same names


@pytest.mark.parametrize(
    ("shape", "area"),
    [("circle", np.pi), ("square", 1.6**2), ("triangle", 3 * np.sqrt(3) / 4), ("cross", 2 * 0.54 * 1.9 - 0.54**2),
     ("star", 5 * 0.4 * np.sin(np.pi / 5))],
)
def test_shape_masks_have_the_geometry_they_claim(shape, area):
    radius = 30.0
    cover = ood._coverage(shape, 96, 48.0, 48.0, radius, 0.0)
    assert cover.sum() == pytest.approx(area * radius**2, rel=0.02)
    turned = ood._coverage(shape, 96, 48.0, 48.0, radius, 0.3)
    assert turned.sum() == pytest.approx(area * radius**2, rel=0.03)  # turning keeps the area


def test_triangle_points_up_and_star_has_five_points():
    tri = ood._coverage("triangle", 96, 48.0, 48.0, 30.0, 0.0)
    assert tri[25:35].sum() < tri[55:65].sum()  # narrow at the top, wide at the bottom
    star = ood._coverage("star", 96, 48.0, 48.0, 30.0, 0.0) > 0.5
    angles = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    ring = star[(48 + 24 * np.sin(angles)).astype(int), (48 + 24 * np.cos(angles)).astype(int)]
    assert np.count_nonzero(ring & ~np.roll(ring, 1)) == 5  # a circle near the tips crosses five points


def test_ood_set_labels_colours_and_determinism():
    images, targets = ood.ood_set(per_class=2)
    assert len(images) == 60 and targets == [i % 30 for i in range(60)]
    assert all(im.size == (ood.SIZE, ood.SIZE) and im.mode == "RGB" for im in images)
    for image, t in zip(images, targets):
        colour = ALL_LABELS[t].split()[0]
        px = np.asarray(image, dtype=float).reshape(-1, 3)
        near = np.linalg.norm(px - ood.OOD_COLOURS[colour], axis=1) < 30
        assert near.mean() > 0.03  # the object is there, in its own colour
    again, _ = ood.ood_set(per_class=2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
    other, _ = ood.ood_set(per_class=2, seed=1)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))


class _Oracle:
    """Embeds images by a chosen class and texts by their class name: retrieval ranks are known."""

    def __init__(self, image_classes, names):
        self.image_classes, self.names = image_classes, names

    def eval(self):
        return self

    def embed_texts(self, texts):
        return torch.eye(len(self.names))[[self.names.index(t) for t in texts]]

    def embed_images(self, images):
        rows = torch.eye(len(self.names))[self.image_classes]
        return rows + torch.linspace(0, 0.01, len(rows))[:, None]  # later images rank first within a class


def test_class_retrieval_precision():
    names = ["a", "b", "c"]
    targets = torch.tensor([0] * 12 + [1] * 12 + [2] * 12)
    seen = targets.clone()
    seen[:4] = 1  # the model reads four "a" images as "b"
    metrics = class_retrieval(_Oracle(seen, names), None, targets, names)
    # "a": its 8 readable images then others -> 8/10; "b": 16 candidates, the 4 misread "a" rank last -> 10/10
    assert metrics["t2i_p10"] == pytest.approx((8 / 10 + 1 + 1) / 3)
    assert metrics["t2i_p1"] == 1.0


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(ValueError, match="shapes-ood"):
        load_dataset("shapes-odd")
