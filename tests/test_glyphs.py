"""Digit glyphs: synthetic handwriting (data/handwriting.py), world.glyph_handwritten, and the digits-val / -test split."""

import numpy as np
import pytest

from vlfm.data.datasets import NAMED, digits, digits_split_indices, load_dataset
from vlfm.data.draw import render_many
from vlfm.data.glyphs import render_glyph, render_handwritten
from vlfm.data.handwriting import STYLES
from vlfm.data.shapes import ShapesWorld, WorldConfig


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def test_handwriting_is_deterministic_and_varies():
    assert sorted(STYLES) == list(range(10)) and all(STYLES[d] for d in range(10))
    a = pixels(render_handwritten(7, 123))
    assert a.shape == (64, 64, 3) and np.array_equal(a, pixels(render_handwritten(7, 123)))
    assert not np.array_equal(a, pixels(render_handwritten(7, 124)))  # another seed, another hand
    assert not np.array_equal(a, pixels(render_handwritten(1, 123)))  # another digit
    assert render_handwritten(3, 5, image_size=32).size == (32, 32)
    # Different digits look different on average, not only pixel noise apart.
    means = {d: np.mean([pixels(render_handwritten(d, s))[..., 0] for s in range(20)], axis=0) for d in (0, 1, 7)}
    assert np.abs(means[0] - means[1]).mean() > 10 and np.abs(means[1] - means[7]).mean() > 5


@pytest.mark.parametrize("digit", range(10))
def test_handwriting_is_dark_ink_on_light_paper(digit):
    for seed in range(12):
        grey = pixels(render_handwritten(digit, seed))[..., 0]
        paper = np.percentile(grey, 90)
        ink = grey < paper - 40  # clearly darker than the paper
        assert paper > 180 and paper - grey.min() > 60, (digit, seed)  # light paper, darker ink
        assert 0.03 < ink.mean() < 0.8, (digit, seed, ink.mean())  # a written digit, not a blank or a blot
    inked = [np.mean(pixels(render_handwritten(digit, s))[..., 0] < 150) for s in range(12)]
    assert 0.1 < np.median(inked) < 0.5  # a typical one: thick strokes over a good part of the box


def test_glyph_handwritten_zero_keeps_the_world_and_one_writes_every_glyph():
    config = dict(glyph_fraction=0.4, image_size=32)
    before = ShapesWorld(WorldConfig(**config))
    same = ShapesWorld(WorldConfig(**config, glyph_handwritten=0.0))
    scenes = [before.scene("train", i) for i in range(60)]
    glyphs = [s for s in scenes if s.digit is not None]
    assert glyphs and scenes == [same.scene("train", i) for i in range(60)]
    assert not any(s.handwritten for s in glyphs)
    for s in glyphs[:5]:  # a font glyph, exactly as render_glyph draws it
        assert np.array_equal(pixels(same.render(s)), pixels(render_glyph(s.digit, s.background, 32)))
    assert "handwritten" not in repr(glyphs[0])  # scene records print (and are pinned) as before

    every = ShapesWorld(WorldConfig(**config, glyph_handwritten=1.0))
    hand = [every.scene("train", i) for i in range(60)]
    # The same scenes (the handwriting draw comes last), each glyph now handwritten.
    assert [(s.digit, s.background, s.objects) for s in hand] == [(s.digit, s.background, s.objects) for s in scenes]
    assert all(s.handwritten for s in hand if s.digit is not None)
    images, rendered = render_many(every, "train", 60, workers=1)  # the batch path draws them the same way
    for k, s in enumerate(rendered):
        if s.digit is not None:
            assert np.array_equal(images[k].transpose(1, 2, 0), np.asarray(render_handwritten(s.digit, s.background, 32)))

    half = ShapesWorld(WorldConfig(glyph_fraction=0.5, glyph_handwritten=0.5))
    mixed = [s for s in (half.scene("train", i) for i in range(400)) if s.digit is not None]
    assert 0.35 < np.mean([s.handwritten for s in mixed]) < 0.65


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_glyph_handwritten_is_named(bad):
    with pytest.raises(ValueError, match="glyph_handwritten"):
        WorldConfig(glyph_handwritten=bad)


def test_digits_val_and_test_split_all_digits():
    val, test = digits_split_indices("val"), digits_split_indices("test")
    assert len(val) == 450 and len(test) == 1347 and val.tolist() == list(range(0, 1797, 4))
    assert not set(val.tolist()) & set(test.tolist()) and sorted([*val.tolist(), *test.tolist()]) == list(range(1797))
    assert {"digits", "digits-val", "digits-test"} <= set(NAMED)
    full, dval, dtest = digits(), load_dataset("digits-val"), load_dataset("digits-test")
    assert (dval.name, len(dval), dtest.name, len(dtest)) == ("digits-val", 450, "digits-test", 1347)
    assert dval.targets.tolist() == full.targets[val].tolist() and dtest.targets.tolist() == full.targets[test].tolist()
    assert np.array_equal(np.asarray(dval.images[1]), np.asarray(full.images[4]))
    assert dval.templates == full.templates and dval.synonyms == full.synonyms
    assert sorted(set(dval.targets.tolist())) == list(range(10))
    with pytest.raises(ValueError, match="'train'"):
        digits_split_indices("train")


def test_some_handwriting_is_size_normalised_to_fill_the_frame():
    def ink_box(image):
        grey = pixels(image)[..., 0]
        rows, cols = np.flatnonzero((grey < 150).any(1)), np.flatnonzero((grey < 150).any(0))
        return (rows[-1] - rows[0] + 1) / 64, (cols[-1] - cols[0] + 1) / 64

    boxes = [ink_box(render_handwritten(1, seed)) for seed in range(40)]
    # a 1 written upright is narrow; size-normalised and stretched, its ink spans most of the width
    assert sum(w < 0.45 for _, w in boxes) >= 5 and sum(w > 0.8 and h > 0.8 for h, w in boxes) >= 5
