"""Questions as people type them: the world tokenizer's normaliser (case, American spellings, spacing), several
wordings per question form with a held-out set training never asks, and the VQA sets on held-out wordings and
on the independent renderer's scenes."""

import hashlib
import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import normalizers

import vlfm.train.vlm as train_vlm
from vlfm.config import ConfigError, load_config
from vlfm.config.vlm import VLMDataConfig
from vlfm.data import ood
from vlfm.data.chat import TEMPLATES, add_chat_tokens, encode_prompt, world_conversations, world_text
from vlfm.data.shapes import Obj, Scene, ShapesWorld, WorldConfig
from vlfm.data.stage_data import scene_pairs
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.world_text import KINDS, WORDINGS, captions, question_kind, questions
from vlfm.eval.vqa import VQASet

WORLD = WorldConfig(max_objects=4, glyph_fraction=0.1, colour_free_fraction=0.2)


def _template_pattern(wording: str) -> re.Pattern:
    return re.compile("^" + re.escape(wording).replace(r"\{0\}", ".+?").replace(r"\{1\}", ".+?") + "$")


TRAINING = [_template_pattern(w) for train, _ in WORDINGS.values() for w in train]
HELD_OUT = [_template_pattern(w) for _, held in WORDINGS.values() for w in held]


def _world_texts(n: int = 40) -> list[str]:
    """Everything the world says: captions, questions in every wording, conversations in both templates."""
    world = ShapesWorld(WORLD)
    scenes = [world.scene(split, i) for split in ("train", "val", "heldout") for i in range(n)]
    texts = [c for s in scenes for c in captions(s)]
    texts += [q + " " + a for s in scenes for mode in ("one", "varied", "heldout") for q, a in questions(s, wordings=mode)]
    for template in TEMPLATES.values():
        texts += world_text(scenes[:n], template, np.random.default_rng(0), WORLD.held_out, 3, "varied")
    return texts


@pytest.fixture(scope="module")
def world_tokenizer():
    return Tokenizer.train(_world_texts(), vocab_size=400)


def test_normaliser_leaves_every_world_text_and_its_ids_as_they_were(world_tokenizer):
    texts = _world_texts()
    normalise = world_tokenizer.backend.normalizer.normalize_str
    assert [normalise(t) for t in texts] == texts  # so a tokenizer trained on them learns the same merges
    before = HFTokenizer.from_str(world_tokenizer.backend.to_str())
    before.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])  # the one before
    assert [e.ids for e in before.encode_batch(texts)] == [e.ids for e in world_tokenizer.backend.encode_batch(texts)]


@pytest.mark.parametrize(("typed", "world"), [
    ("What COLOR is the Circle?", "what colour is the circle?"),
    ("  Is there a GRAY   square ?? ", "is there a grey square?"),
    ("Is the Red Star in the CENTER , or on the left!!", "is the red star in the centre, or on the left!"),
    ("How many Colors are there\t?", "how many colours are there?"),
])  # fmt: skip
def test_typed_questions_get_the_world_s_ids(world_tokenizer, typed, world, tmp_path):
    assert world_tokenizer.encode(typed) == world_tokenizer.encode(world)
    before = HFTokenizer.from_str(world_tokenizer.backend.to_str())
    before.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    assert before.encode(typed).ids != before.encode(world).ids  # lower-casing alone did not
    world_tokenizer.save(tmp_path / "tokenizer.json")  # the normaliser travels in tokenizer.json
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode(typed) == world_tokenizer.encode(world)


def test_typed_prompt_is_the_world_s_prompt(world_tokenizer):
    template = TEMPLATES["vlfm"]
    tok = Tokenizer(HFTokenizer.from_str(world_tokenizer.backend.to_str()))
    add_chat_tokens(tok, template)
    typed = encode_prompt([("user", "<image>\nWhat COLOR is the big Shape ?")], tok, template)
    assert typed == encode_prompt([("user", "<image>\nwhat colour is the big shape?")], tok, template)


def test_a_tokenizer_saved_before_keeps_its_own_normaliser():
    directory = "tests/data/checkpoint-v1"
    tok = Tokenizer.from_directory(directory)
    with open(f"{directory}/tokenizer.json") as handle:
        saved = json.load(handle)["normalizer"]
    assert json.loads(tok.backend.to_str())["normalizer"] == saved  # loading changes none of its ids
    assert "Replace" not in json.dumps(saved) and tok.encode("What COLOR") == tok.encode("what color")


def test_every_wording_is_classified_to_its_form_s_kind():
    slots = ("red circle", "blue star")
    assert {question_kind(form.format(*slots)) for form in WORDINGS} == {k for k, _ in KINDS} - {"digit"}
    for form, (train, held) in WORDINGS.items():
        kind = question_kind(form.format(*slots))
        assert train[0] == form and not set(train) & set(held) and len(held) >= 2
        assert all(question_kind(w.format(*slots)) == kind for w in train + held), form
    words = lambda texts: {w for t in texts for w in re.findall(r"[a-z]+", t)}  # noqa: E731
    # held-out wordings recombine training's words: another wording of a known question, not unknown words
    assert words(h for _, held in WORDINGS.values() for h in held) <= words(t for train, _ in WORDINGS.values() for t in train)


@pytest.mark.parametrize("mode", ["varied", "heldout"])
def test_rewording_keeps_questions_answers_and_kinds(mode):
    world = ShapesWorld(WORLD)
    patterns = TRAINING if mode == "varied" else HELD_OUT
    other = HELD_OUT if mode == "varied" else TRAINING
    reworded = 0
    for split, i in [(s, i) for s in ("train", "val") for i in range(80)]:
        scene = world.scene(split, i)
        one = questions(scene, avoid=WORLD.held_out, training=True)
        new = questions(scene, avoid=WORLD.held_out, training=True, wordings=mode)
        assert [a for _, a in new] == [a for _, a in one]
        assert [question_kind(q) for q, _ in new] == [question_kind(q) for q, _ in one]
        for (q, _), (q1, _) in zip(new, one):
            if q1 != "what digit is this?":
                assert any(p.match(q) for p in patterns) and not any(p.match(q) for p in other), q
        reworded += sum(q != q1 for (q, _), (q1, _) in zip(new, one))
    assert reworded > 500
    with pytest.raises(ValueError, match="wordings='typed' is not one of"):
        questions(world.scene("val", 0), wordings="typed")


def test_varied_training_data_never_asks_a_held_out_wording():
    world = ShapesWorld(WORLD)
    scenes = [world.scene("train", i) for i in range(120)]
    data = VLMDataConfig(world=WORLD, wordings="varied", count_questions=3)
    asked = [text.split("\n", 1)[-1] for _, conversation in scene_pairs(scenes, 2, np.random.default_rng(0), data)
             for role, text in conversation if role == "user"]  # fmt: skip
    asked += [q for kind in ("colour", "relation") for _, c in scene_pairs(scenes, 2, np.random.default_rng(0), data, [kind])
              for role, q in c if role == "user"]  # fmt: skip
    lines = [line.split("|>")[-1] for t in world_text(scenes, TEMPLATES["vlfm"], np.random.default_rng(0), WORLD.held_out,
                                                    3, "varied") for line in t.split("<|end|>")]  # fmt: skip
    assert not [q for q in asked + lines if any(p.match(q.strip()) for p in HELD_OUT)]
    used = {p.pattern for q in asked for p in TRAINING if p.match(q)}
    assert len(used) == len(TRAINING)  # every training wording is asked
    with pytest.raises(ConfigError, match="data.wordings='heldout' must be one or varied"):
        load_config(None, ["task=vlm", "data.wordings=heldout"])


def test_one_asks_what_it_always_asked():
    """The main branch's questions and world text (sha256 computed before the wordings existed)."""
    world = ShapesWorld(WORLD)
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for i in range(60):
            scene = world.scene(split, i)
            digest.update(repr(questions(scene)).encode())
            digest.update(repr(questions(scene, avoid=world.held_out_labels, training=True, wordings="one")).encode())
    scenes = [world.scene("train", i) for i in range(30)]
    digest.update(repr(world_text(scenes, TEMPLATES["vlfm"], np.random.default_rng(5), world.held_out_labels, 3)).encode())
    assert digest.hexdigest() == "b63ea06ce27474d2cd2c06122552770350676e2370bedb5e4101231f581154cc"
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    assert world_conversations(scenes[0], rng_a, counts=2) == world_conversations(scenes[0], rng_b, counts=2, wordings="one")


def test_ood_draws_the_world_s_scene_in_its_own_style():
    objs = (Obj("red", "square", "big", 0.3, 0.7), Obj("blue", "circle", "small", 0.75, 0.25))
    image = np.asarray(ood.render_scene(Scene(objs, background=7)), dtype=float)
    areas = []
    for obj in objs:
        near = np.linalg.norm(image - np.array(ood.OOD_COLOURS[obj.colour]), axis=2) < 40
        ys, xs = np.nonzero(near)
        assert abs(xs.mean() / ood.SIZE - obj.x) < 0.03 and abs(ys.mean() / ood.SIZE - obj.y) < 0.03
        areas.append(near.sum())
    assert areas[0] > 2 * areas[1]  # big is big, small is small
    assert ood.render_scene(Scene(objs, background=7), 32).size == (32, 32)
    with pytest.raises(ValueError, match="not a digit"):
        ood.render_scene(Scene((), background=1, digit=3))


def test_vqa_sets_ask_held_out_wordings_and_draw_with_the_other_renderer():
    config = WorldConfig(image_size=32, glyph_fraction=0.3)
    plain = VQASet(config, "val", 12, workers=1)
    worded = VQASet(config, "val", 12, workers=1, wordings="heldout")
    drawn = VQASet(config, "val", 12, workers=1, renderer="ood")
    assert [(i, a) for i, _, a in worded.items] == [(i, a) for i, _, a in plain.items]
    assert all(any(p.match(q) for p in HELD_OUT) for _, q, _ in worded.items if "digit" not in q)
    digits = [i for i in range(12) if ShapesWorld(config).scene("val", i).digit is not None]
    assert digits and len(drawn.pixels) == 12 - len(digits)  # the other renderer draws no digits
    kept = [i for i in range(12) if i not in digits]
    assert [(kept[i], q, a) for i, q, a in drawn.items] == [item for item in plain.items if item[0] in kept]
    assert drawn.pixels.shape[1:] == plain.pixels.shape[1:] and not (drawn.pixels == plain.pixels[kept]).all()


def test_evaluate_vlm_reports_every_vqa_set(tmp_path, monkeypatch):
    seen = {}

    def record(model, data, prefix="vqa", **kw):
        seen[prefix] = data.items
        return {f"{prefix}_acc": 0.5}

    monkeypatch.setattr(train_vlm, "vqa_accuracy", record)
    config = load_config(None, ["task=vlm", "data.world.image_size=32", "data.eval_size=5", "data.workers=1"])
    metrics = train_vlm.evaluate_vlm(None, config)
    assert set(metrics) == {"vqa_acc", "vqa_heldout_acc", "vqa_wordings_acc", "vqa_ood_acc"}
    world = config.data.world
    assert seen["vqa_wordings"] == VQASet(world, "val", 5, 1, wordings="heldout").items != seen["vqa"]
    assert seen["vqa_ood"] == VQASet(world, "val", 5, 1, renderer="ood").items == seen["vqa"]
    assert seen["vqa_heldout"] == VQASet(world, "heldout", 5, 1).items
