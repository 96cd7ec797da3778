from dataclasses import replace

import numpy as np
import pytest

from vlfm.data.draw import _PALETTE
from vlfm.data.randomise import free_scale, shade
from vlfm.data.shapes import _GAP, _HALF, COLOURS, ShapesWorld, WorldConfig
from vlfm.data.world_text import captions

PLAIN = ShapesWorld(WorldConfig(colour_free_fraction=0.3, colour_free_style="off_palette"))
RANDOM = ShapesWorld(WorldConfig(colour_free_fraction=0.3, colour_free_style="off_palette", randomise=0.8))


def corners(world, n=60):
    return np.array([np.asarray(world.render(world.scene("train", i)))[:3, :3].reshape(-1, 3).mean(0) for i in range(n)])


def test_same_scenes_and_captions_only_the_drawing_varies():
    for i in range(100):
        plain, randomised = PLAIN.scene("train", i), RANDOM.scene("train", i)
        assert randomised == replace(plain, randomised=0.8)
        assert captions(randomised) == captions(plain)
        assert not {o.label for o in randomised.objects} & set(RANDOM.config.held_out)
    # evaluation splits stay the plain world, pixel for pixel
    for split in ("val", "heldout", "single"):
        a, b = PLAIN.scene(split, 3), RANDOM.scene(split, 3)
        assert a == b and np.array_equal(np.asarray(PLAIN.render(a)), np.asarray(RANDOM.render(b)))


def test_randomise_fraction_draws_that_share_randomised_and_the_rest_plain():
    config = replace(RANDOM.config, randomise_fraction=0.25)
    part = ShapesWorld(config)
    scenes = [(PLAIN.scene("train", i), part.scene("train", i)) for i in range(400)]
    assert all(p == replace(s, randomised=0.0) for p, s in scenes)  # the same scenes either way
    share = np.mean([s.randomised == 0.8 for _, s in scenes])
    assert 0.18 < share < 0.32
    with pytest.raises(ValueError, match="randomise_fraction"):
        replace(config, randomise_fraction=0.0)


def test_backgrounds_vary_in_colour_and_brightness():
    plain, randomised = corners(PLAIN), corners(RANDOM)
    saturation = lambda c: c.max(1) - c.min(1)  # noqa: E731
    assert saturation(plain).max() < 40 and plain.mean(1).min() > 100  # the plain world: light greys
    assert (saturation(randomised) > 80).mean() > 0.3  # strongly coloured backgrounds
    assert randomised.mean(1).min() < 70 and randomised.mean(1).max() > 190  # dark and bright ones


def test_deterministic_per_seed():
    scene = RANDOM.scene("train", 11)
    again = ShapesWorld(RANDOM.config).render(scene)
    assert np.array_equal(np.asarray(RANDOM.render(scene)), np.asarray(again))
    other = ShapesWorld(replace(RANDOM.config, seed=1))
    assert not np.array_equal(np.asarray(RANDOM.render(scene)), np.asarray(other.render(other.scene("train", 11))))
    assert RANDOM.render(scene).size == (64, 64)


def test_free_scale_keeps_boxes_apart_and_inside():
    for i in range(200):
        objs = PLAIN.scene("train", i).objects
        z = free_scale(objs, _HALF, _GAP)
        assert z >= 1.0  # the placement already reserved the unscaled boxes
        for o in objs:
            h = _HALF[o.size] * z
            assert min(o.x, o.y) >= h - 1e-9 and max(o.x, o.y) <= 1 - h + 1e-9
        for a in objs:
            for b in objs:
                if a is not b:
                    assert max(abs(a.x - b.x), abs(a.y - b.y)) >= (_HALF[a.size] + _HALF[b.size]) * z + _GAP - 1e-9


def test_shades_keep_their_name():
    rng = np.random.default_rng(0)
    for i, rgb in enumerate(COLOURS.values()):
        shades = np.array([shade(rng, np.array(rgb, float), _PALETTE, 45) for _ in range(50)])
        assert np.abs(shades - rgb).max() > 20  # they do vary
        assert (np.linalg.norm(_PALETTE[None] - shades[:, None], axis=2).argmin(1) == i).all()


def test_bad_strength():
    with pytest.raises(ValueError, match=r"world.randomise=1.5 must be in \[0, 1\]"):
        WorldConfig(randomise=1.5)


def test_randomise_factors_vary_only_the_named_ones():
    every = ShapesWorld(replace(RANDOM.config, randomise_factors=["size", "edges", "shade", "background", "zoom",
        "outline", "shadow", "aspect", "turn", "proportions", "resample", "blur", "light", "noise", "jpeg"]))  # fmt: skip
    scene = RANDOM.scene("train", 5)
    assert np.array_equal(np.asarray(RANDOM.render(scene)), np.asarray(every.render(every.scene("train", 5))))
    # background left out: every corner is the plain world's light grey paper, as without randomisation
    turned = ShapesWorld(replace(RANDOM.config, randomise_factors=["turn", "proportions"]))
    grey = corners(turned)
    assert (grey.max(1) - grey.min(1)).max() < 40 and grey.mean(1).min() > 100
    assert not (corners(RANDOM).mean(1).min() > 100)
    # turn alone: the same scene with its objects turned or not, so some drawings differ from the plain-style one
    nothing = ShapesWorld(replace(RANDOM.config, randomise_factors=[]))
    only_turn = ShapesWorld(replace(RANDOM.config, randomise_factors=["turn"]))
    differ = [not np.array_equal(np.asarray(nothing.render(nothing.scene("train", i))),
                                 np.asarray(only_turn.render(only_turn.scene("train", i)))) for i in range(40)]  # fmt: skip
    assert 0.2 < np.mean(differ) < 1.0  # turned with probability ~strength / 2 per object
    with pytest.raises(ValueError, match="randomise_factors=.*must be a list of: size, edges"):
        WorldConfig(randomise=0.5, randomise_factors=["rotation"])
