from dataclasses import replace

import numpy as np
import pytest

from vlfm.data.draw import _grey_level, _off_palette, render_many
from vlfm.data.shapes import (
    ALL_LABELS,
    COLOURS,
    SHAPES,
    SIZE_EXTENT,
    Obj,
    Scene,
    ShapesWorld,
    WorldConfig,
    label,
)
from vlfm.data.world_text import captions, questions


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(WorldConfig())


def labels_of(scene):
    return [label(o.colour, o.shape) for o in scene.objects]


def test_vocabulary(world):
    assert len(ALL_LABELS) == len(set(ALL_LABELS)) == 30
    assert ALL_LABELS[0] == "red circle"
    assert sorted(world.seen_labels + world.held_out_labels) == sorted(ALL_LABELS)
    assert set(world.held_out_labels) == {
        "red circle",
        "green square",
        "blue triangle",
        "yellow star",
        "purple cross",
    }


def test_determinism(world):
    other = ShapesWorld(WorldConfig())
    for split in ("train", "val", "heldout", "single"):
        for i in (0, 7, 123):
            a, b = world.scene(split, i), other.scene(split, i)
            assert a == b
            assert np.array_equal(np.asarray(world.render(a)), np.asarray(other.render(b)))
    assert world.scene("train", 0) != world.scene("train", 1)
    assert world.scene("train", 5) != world.scene("val", 5)
    assert world.scene("train", 5) != ShapesWorld(WorldConfig(seed=1)).scene("train", 5)
    scenes = [world.scene("train", i) for i in range(200)]
    assert len({s.background for s in scenes}) == len(scenes)  # background textures vary per scene
    img0, img1 = (np.asarray(world.render(world.scene("train", i))) for i in (0, 1))
    assert not np.array_equal(img0, img1)


@pytest.mark.parametrize("split", ["train", "val"])
def test_train_val_exclude_held_out(world, split):
    held = set(world.held_out_labels)
    counts = set()
    for i in range(2000):
        scene = world.scene(split, i)
        assert not held & set(labels_of(scene)), (split, i, scene)
        counts.add(len(scene.objects))
    assert counts == {1, 2, 3}


def test_heldout_and_single_splits(world):
    held = set(world.held_out_labels)
    seen_in_heldout = set()
    for i in range(500):
        names = labels_of(world.scene("heldout", i))
        assert set(names) <= held
        seen_in_heldout |= set(names)
    assert seen_in_heldout == held
    singles = [world.scene("single", i) for i in range(1500)]
    assert all(len(s.objects) == 1 for s in singles)
    assert {labels_of(s)[0] for s in singles} == set(ALL_LABELS)


def test_single_object_scene(world):
    combos = ["orange star", "red circle"]
    scenes = [world.single_object_scene(i, combos) for i in range(4)]
    assert [labels_of(s) for s in scenes] == [
        ["orange star"],
        ["red circle"],
        ["orange star"],
        ["red circle"],
    ]
    assert scenes[0] == world.single_object_scene(0, combos)
    with pytest.raises(ValueError, match="colour shape"):
        world.single_object_scene(0, ["pink circle"])


def test_objects_inside_and_apart():
    world = ShapesWorld(WorldConfig(min_objects=2, max_objects=4))
    for i in range(1000):
        objs = world.scene("train", i).objects
        assert 2 <= len(objs) <= 4
        assert len(set(labels_of(world.scene("train", i)))) == len(objs)  # colour+shape unique in a scene
        half = [SIZE_EXTENT[o.size][1] / 2 for o in objs]
        for o, h in zip(objs, half):
            assert h <= o.x <= 1 - h and h <= o.y <= 1 - h
        for a in range(len(objs)):
            for b in range(a + 1, len(objs)):
                gap = half[a] + half[b]
                assert abs(objs[a].x - objs[b].x) >= gap or abs(objs[a].y - objs[b].y) >= gap


def test_positions_spread(world):
    xs = np.array([o.x for i in range(500) for o in world.scene("train", i).objects])
    ys = np.array([o.y for i in range(500) for o in world.scene("train", i).objects])
    for v in (xs, ys):
        assert v.min() < 0.2 and v.max() > 0.8 and 0.4 < v.mean() < 0.6


def S(*objs, bg=3):
    return Scene(tuple(Obj(*o) for o in objs), bg)


def test_canonical_captions():
    assert captions(S(("red", "circle", "small", 0.5, 0.5)))[0] == "a small red circle"
    left, right = ("blue", "square", "small", 0.2, 0.5), ("green", "triangle", "big", 0.7, 0.4)
    expected = "a small blue square left of a big green triangle"
    assert captions(S(left, right))[0] == expected
    assert captions(S(right, left))[0] == expected  # order of objects in the scene does not matter
    top, bottom = ("red", "star", "big", 0.45, 0.2), ("yellow", "cross", "small", 0.55, 0.8)
    assert captions(S(top, bottom))[0] == "a big red star above a small yellow cross"
    assert captions(S(("red", "star", "big", 0.55, 0.2), ("yellow", "cross", "small", 0.45, 0.8)))[0] == (
        "a small yellow cross below a big red star"
    )
    # Vertical wording only when the vertical offset clearly dominates (here 2x the horizontal one).
    assert captions(S(("red", "star", "big", 0.3, 0.2), ("yellow", "cross", "small", 0.5, 0.6)))[0] == (
        "a big red star above a small yellow cross"
    )
    assert captions(S(("red", "star", "big", 0.3, 0.3), ("yellow", "cross", "small", 0.6, 0.65)))[0] == (
        "a big red star left of a small yellow cross"
    )
    three = S(
        ("green", "star", "small", 0.8, 0.5),
        ("red", "circle", "big", 0.2, 0.5),
        ("blue", "square", "small", 0.5, 0.2),
    )
    assert captions(three)[0] == "a big red circle, a small blue square and a small green star"


def test_caption_variants(world):
    for i in range(300):
        scene = world.scene("train", i)
        caps = captions(scene)
        assert caps == captions(scene)  # deterministic
        assert len(set(caps)) >= 4
        for c in caps:
            assert c == c.lower() and 1 <= len(c.split()) <= 20
            for o in scene.objects:  # every caption names each object's colour or its shape (or both)
                assert o.colour in c or o.shape in c
        assert sum(all(o.colour in c and o.shape in c for o in scene.objects) for c in caps) >= 4
    single = captions(S(("red", "circle", "small", 0.15, 0.5)))
    assert "a red circle on the left" in single
    pair = captions(S(("blue", "square", "small", 0.2, 0.5), ("green", "triangle", "big", 0.7, 0.4)))
    assert "a green triangle right of a blue square" in pair
    assert any(c.startswith("two shapes") for c in pair)
    assert "a blue shape and a green shape" in pair or "a green shape and a blue shape" in pair
    three = captions(S(("red", "star", "small", 0.2, 0.5), ("red", "circle", "small", 0.5, 0.5), ("red", "cross", "small", 0.8, 0.5)))
    assert "three red shapes" in three


def qa_dict(scene, **kw):
    pairs = questions(scene, **kw)
    assert len({q for q, _ in pairs}) == len(
        pairs
    )  # no question asked twice (with possibly different answers)
    return dict(pairs)


def test_questions_hand_built():
    scene = S(
        ("red", "circle", "big", 0.2, 0.5),
        ("blue", "square", "small", 0.75, 0.5),
        ("red", "star", "small", 0.5, 0.15),
    )
    qa = qa_dict(scene)
    assert qa["how many shapes are there?"] == "three"
    assert qa["how many red shapes are there?"] == "two"
    assert qa["how many squares are there?"] == "one"
    assert qa["what colour is the circle?"] == "red"
    assert qa["what shape is the blue object?"] == "square"
    assert "what shape is the red object?" not in qa  # two red objects: ambiguous, never asked
    assert qa["is the red circle big or small?"] == "big"
    assert qa["what colour is the big shape?"] == "red"
    existence = {q.split(" ", 3)[3][:-1]: a for q, a in qa.items() if q.startswith("is there")}
    assert sorted(existence.values()) == ["no", "yes"]
    assert all((a == "yes") == (name in labels_of(scene)) for name, a in existence.items())
    key = "is the red circle left of the blue square?"
    assert qa.get(key, "yes") == "yes" and qa.get("is the blue square left of the red circle?", "no") == "no"
    assert key in qa or "is the blue square left of the red circle?" in qa
    above = [q for q in qa if "above" in q]
    assert above and all(qa[q] == ("yes" if q.startswith("is the red star") else "no") for q in above)
    answers = set(qa.values())
    assert all(len(a.split()) == 1 for a in answers)


def test_questions_single_and_avoid():
    qa = qa_dict(S(("green", "cross", "big", 0.2, 0.5)))
    assert qa["where is the cross?"] == "left"
    assert qa["is the green cross on the left or the right?"] == "left"
    assert not any("top or the bottom" in q for q in qa)  # vertically centred: no clear answer
    assert qa_dict(S(("green", "cross", "big", 0.5, 0.52)))["where is the cross?"] == "middle"
    assert qa_dict(S(("green", "cross", "big", 0.5, 0.75)))["where is the cross?"] == "bottom"
    assert "where is the cross?" not in qa_dict(S(("green", "cross", "big", 0.2, 0.2)))  # left or top?
    assert "where is the cross?" not in qa_dict(S(("green", "cross", "big", 0.35, 0.5)))  # left or middle?
    two_circles = qa_dict(S(("red", "circle", "big", 0.2, 0.5), ("blue", "circle", "small", 0.8, 0.5)))
    assert (
        "what colour is the circle?" not in two_circles
        and two_circles["how many circles are there?"] == "two"
    )
    assert two_circles["what shape is the blue object?"] == "circle"
    avoid = [t for t in ALL_LABELS if t != "orange cross"]
    assert qa_dict(S(("green", "cross", "big", 0.2, 0.5)), avoid=avoid)["is there an orange cross?"] == "no"


def test_questions_consistent_on_random_scenes(world):
    for i in range(300):
        scene = world.scene("train", i)
        by_label = {label(o.colour, o.shape): o for o in scene.objects}
        for q, a in questions(scene, avoid=world.held_out_labels):
            if q.startswith("is there "):
                name = q.split(" ", 3)[3][:-1]
                assert a == ("yes" if name in by_label else "no")
                assert a == "yes" or name not in world.held_out_labels
                colour, shape = (
                    name.split()
                )  # a plausible 'no': shares the colour or the shape of something there
                assert any(o.colour == colour or o.shape == shape for o in scene.objects)
            elif " left of the " in q:
                first, second = q[len("is the ") : -1].split(" left of the ")
                assert a == ("yes" if by_label[first].x < by_label[second].x else "no")


def test_training_questions_add_existence_questions_only_when_asked(world):
    """training=True appends a 'yes' about every object, as many plausible 'no's (sharing the colour or the
    shape of an object there) and one easy 'no' (sharing neither); by default (the VQA benchmark's questions)
    one 'yes' and one plausible 'no'. No 'no' names a held-out label."""
    for i in range(100):
        scene = world.scene("train", i)
        plain = questions(scene, avoid=world.held_out_labels)
        more = questions(scene, avoid=world.held_out_labels, training=True)
        assert more[: len(plain)] == plain
        extra, present = more[len(plain) :], {label(o.colour, o.shape) for o in scene.objects}
        asked = {q[len("is there ") : -1].split(" ", 1)[1] for q, _ in more if q.startswith("is there ")}
        assert present <= asked and all(q.startswith("is there ") for q, _ in extra)
        named = [(q[len("is there ") : -1].split(" ", 1)[1], a) for q, a in extra]
        assert all((name in present) == (a == "yes") for name, a in named)
        easy = [n for n, a in named if a == "no" and not any(o.colour in n.split() or o.shape in n.split()
                                                              for o in scene.objects)]  # fmt: skip
        assert len(easy) == 1 and not set(n for n, _ in named) & set(world.held_out_labels)
        yes, plausible = sum(a == "yes" for _, a in named), sum(a == "no" for _, a in named) - 1
        attrs = {o.colour for o in scene.objects} | {o.shape for o in scene.objects}
        left = [t for t in ALL_LABELS if t not in asked and t not in world.held_out_labels and set(t.split()) & attrs]
        assert plausible == min(yes, len(left) + plausible)  # one per 'yes', unless they run out
        assert len({q for q, _ in more}) == len(more)  # nothing asked twice


def test_render_colour_at_centre():
    for colour, rgb in COLOURS.items():
        for shape in ("circle", "square"):
            for bg in (0, 1, 2, 3):
                img = np.asarray(
                    ShapesWorld(WorldConfig()).render(S((colour, shape, "big", 0.5, 0.5), bg=bg))
                )
                assert img.shape == (64, 64, 3) and img.dtype == np.uint8
                centre = img[29:35, 29:35].reshape(-1, 3).mean(0)
                assert np.abs(centre - rgb).max() < 30, (colour, centre)
                nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - centre).sum())
                assert nearest == colour
                corner = img[:6, :6].reshape(-1, 3).mean(0)  # background: low saturation, mid-to-light
                assert corner.max() - corner.min() < 40 and corner.mean() > 100


def test_render_many_matches_render(world):
    imgs, scenes = render_many(world, "val", 5, start=3, workers=2)
    assert imgs.shape == (5, 3, 64, 64) and imgs.dtype == np.uint8
    assert scenes == [world.scene("val", i) for i in range(3, 8)]
    for img, scene in zip(imgs, scenes):
        assert np.array_equal(img, np.asarray(world.render(scene)).transpose(2, 0, 1))
    imgs1, scenes1 = render_many(world, "val", 5, start=3, workers=1)
    assert np.array_equal(imgs, imgs1) and scenes == scenes1
    small = ShapesWorld(WorldConfig(image_size=32))
    imgs, scenes = render_many(small, "heldout", 3, workers=1)
    assert imgs.shape == (3, 3, 32, 32) and scenes == [small.scene("heldout", i) for i in range(3)]
    assert render_many(world, "train", 0)[0].shape == (0, 3, 64, 64)
    with pytest.raises(ValueError, match="valid splits"):
        render_many(world, "test", 2)
    with pytest.raises(ValueError, match="valid splits"):
        world.scene("tset", 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"held_out": ["pink circle"]}, "colours"),
        ({"held_out": ["red hexagon"]}, "shapes"),
        ({"held_out": ["red circle", "red circle"]}, "twice"),
        ({"held_out": "red circle"}, "list"),
        ({"held_out": list(ALL_LABELS)}, "hold out fewer"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"min_objects": 0}, "min_objects"),
        ({"max_objects": 9}, "max_objects"),
        ({"object_weights": [0.5, 0.5]}, "3 non-negative weights"),
        ({"object_weights": [1.0, -1.0, 1.0]}, "non-negative"),
        ({"image_size": 16}, "image_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        WorldConfig(**kwargs)


def test_object_weights_and_heldout_needs_labels():
    world = ShapesWorld(WorldConfig(object_weights=[0, 0, 1]))
    assert all(len(world.scene("train", i).objects) == 3 for i in range(50))
    with pytest.raises(ValueError, match="held_out"):
        ShapesWorld(WorldConfig(held_out=[])).scene("heldout", 0)
    assert len(ShapesWorld(WorldConfig(held_out=[])).seen_labels) == 30
    assert len(SHAPES) == 5


def test_grey_scenes_only_in_training_and_never_name_colours():
    world = ShapesWorld(WorldConfig(colour_free_fraction=0.4))
    grey = [s for s in (world.scene("train", i) for i in range(300)) if s.grey]
    assert 80 < len(grey) < 160
    assert not any(world.scene(split, i).grey for split in ("val", "heldout", "single") for i in range(100))
    for scene in grey[:20]:
        pixels = np.asarray(world.render(scene)).astype(int)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
        words = {w for c in captions(scene) for w in c.replace(",", " ").replace(":", " ").split()}
        words |= {w for q, a in questions(scene) for w in (q + " " + a).split()}
        assert not words & set(COLOURS), words & set(COLOURS)
        assert all(o.shape in captions(scene)[0] for o in scene.objects)
    # nor do their pixels: an object's grey level is drawn whatever its colour (a converted colour render kept
    # each colour's luminance, blue ~62 ... yellow ~202), and always stands 45 levels clear of the background
    scene = grey[0]
    recoloured = replace(scene, objects=tuple(replace(o, colour="yellow") for o in scene.objects))
    assert np.array_equal(np.asarray(world.render(scene)), np.asarray(world.render(recoloured)))
    rng = np.random.default_rng(0)
    for background in (130.0, 215.0):
        levels = np.array([_grey_level(rng, background) for _ in range(2000)])
        assert np.abs(levels - background).min() >= 44 and levels.min() < 10 and levels.max() > background - 50
        assert (levels > background).any() == (background < 200)
    # the same index gives the same scene whether or not grey scenes are enabled (only the flag differs)
    plain = ShapesWorld(WorldConfig())
    assert plain.scene("train", 5).objects == world.scene("train", 5).objects
    with pytest.raises(ValueError, match="colour_free_fraction"):
        WorldConfig(colour_free_fraction=1.0)


def test_off_palette_grey_scenes():
    world = ShapesWorld(WorldConfig(colour_free_fraction=0.4, colour_free_style="off_palette"))
    scenes = [world.scene("train", i) for i in range(100)]
    grey = [s for s in scenes if s.grey]
    assert grey and all(s.off_palette for s in grey) and not any(s.off_palette for s in scenes if not s.grey)
    # same scenes and captions as the plain grey world: only how the objects are drawn differs
    plain = ShapesWorld(WorldConfig(colour_free_fraction=0.4))
    assert [replace(s, off_palette=False) for s in scenes] == [plain.scene("train", i) for i in range(100)]
    assert all(not set(c.split()) & set(COLOURS) for s in grey for c in captions(s))
    # the pixels are colour pictures now, and still independent of the objects' (hidden) palette colours
    pixels = [np.asarray(world.render(s)).astype(int) for s in grey[:10]]
    assert any((p[..., 0] != p[..., 1]).mean() > 0.5 for p in pixels)
    recoloured = replace(grey[0], objects=tuple(replace(o, colour="yellow") for o in grey[0].objects))
    assert np.array_equal(np.asarray(world.render(grey[0])), np.asarray(world.render(recoloured)))
    # object colours: far from every named colour, clear of the background, spread over the rest of the cube
    rng = np.random.default_rng(0)
    palette = np.array(list(COLOURS.values()), dtype=float)
    for background in (130.0, 215.0):
        colours = np.stack([_off_palette(rng, background) for _ in range(2000)])
        assert np.linalg.norm(colours[:, None] - palette[None], axis=2).min() > 90
        assert np.abs(colours.mean(1) - background).min() > 30
        assert colours.std(0).min() > 50 and (colours.max(1) - colours.min(1) > 100).mean() > 0.3
    with pytest.raises(ValueError, match="colour_free_style='pink' is not one of: grey, off_palette"):
        WorldConfig(colour_free_style="pink")


def test_glyph_scenes():
    from vlfm.data.shapes import ShapesWorld, WorldConfig
    from vlfm.data.world_text import captions, questions

    world = ShapesWorld(WorldConfig(glyph_fraction=0.3))
    train = [world.scene("train", i) for i in range(400)]
    glyphs = [s for s in train if s.digit is not None]
    assert 0.2 < len(glyphs) / len(train) < 0.4 and not any(s.objects for s in glyphs)
    assert all(world.scene("heldout", i).digit is None for i in range(50))  # only train and val show digits
    scene = glyphs[0]
    assert captions(scene)[0] == f"the digit {scene.digit}" and questions(scene)[0] == ("what digit is this?", str(scene.digit))
    image = np.asarray(world.render(scene), dtype=np.float32)
    assert np.array_equal(image, np.asarray(world.render(scene)))  # deterministic
    assert image.mean() > 128 and image.min() < 110  # dark ink on light paper
    plain = ShapesWorld(WorldConfig())  # glyph_fraction 0: the world is exactly as before
    assert [plain.scene("train", i) for i in range(20)] == [ShapesWorld(WorldConfig(glyph_fraction=0.0)).scene("train", i) for i in range(20)]
    with pytest.raises(ValueError, match="glyph_fraction"):
        WorldConfig(glyph_fraction=1.0)
