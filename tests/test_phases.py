"""Data phases of a VLM stage (stage2.phases): the world's curriculum and focus window, the config's checks, and
phases on one's own LLaVA JSON data (another source, one question kind, a mixed batch), each served only in its
window (data/stage_data.py, train/vlm.py's VLMTask)."""

import json
import re

import pytest
import torch
from test_vlm import TINY_VLM, tiny_vlm_config

from vlfm.config import ConfigError, from_dict, load_config, to_dict
from vlfm.config.vlm import VLMRunConfig
from vlfm.data.shapes import ShapesWorld, WorldConfig
from vlfm.train.vlm import VLMTask, build_model, stage_examples


def turns(*pairs):
    out = []
    for question, answer in pairs:
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """main.json: count and colour questions (one record multi-turn, one text-only); other.json: shape questions."""
    folder = tmp_path_factory.mktemp("llava")
    world = ShapesWorld(WorldConfig(image_size=32))
    for i in range(4):
        world.render(world.scene("val", i)).save(folder / f"{i}.png")
    main = [{"image": f"{i}.png", "conversations": turns(("<image>\nHow many shapes are there?", "two"),
                                                          ("What colour is the circle?", "red"))} for i in range(3)]
    main += [{"image": "3.png", "conversations": turns(("<image>\nhow many shapes are there?", "one"))},
             {"conversations": turns(("what colour is the sky?", "blue"))}]  # fmt: skip
    other = [{"image": f"{i}.png", "conversations": turns(("<image>\nwhat shape is the red object?", "star"))}
             for i in (0, 1)]  # fmt: skip
    (folder / "main.json").write_text(json.dumps(main))
    (folder / "other.json").write_text(json.dumps(other))
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    return build_model(tiny_vlm_config(tmp_path_factory.mktemp("vlm"))).eval()


def texts(model, examples, rows):
    return [model.tokenizer.decode([i for i in examples.ids[r] if i != model.config.image_token_id]) for r in rows]


def test_stage_2_curriculum_asks_about_one_object_then_two(tmp_path, model):
    """stage2.phases [{steps: 2, objects: 1}, {steps: 2, objects: 2}]: steps 0-1 draw only from one-object scenes,
    steps 2-3 from two-object scenes, the later ones only from the configured world; without them the examples
    are those of before."""
    from vlfm.train.vlm import VLMTask, stage_examples

    config = tiny_vlm_config(tmp_path, "stage2.steps=6", "stage2.phases=[{steps: 2, objects: 1}, {steps: 2, objects: 2}]",
                             "data.length_buckets=2", "data.world.min_objects=2",
                             "data.world.max_objects=3", "data.wordings=one")  # fmt: skip
    examples = stage_examples(model, config, 2)
    plain = stage_examples(model, tiny_vlm_config(tmp_path, "data.world.min_objects=2", "data.world.max_objects=3",
                                                  "data.wordings=one"), 2)  # one wording: counts() finds its answers
    assert plain.phases == [] and [(p.start, p.end, p.mix) for p in examples.phases] == [(0, 2, 1.0), (2, 4, 1.0)]
    one, two = (len(p.rows) for p in examples.phases)
    assert one > 0 and two > 0 and examples.main == range(one + two, len(examples.ids))
    assert examples.ids[one + two :] == plain.ids  # the configured world's sequences, unchanged, after them
    # each pool's images (a two-object scene of the phase can equal one of the world's: same index, same draw)
    pools = [examples.image[:one], examples.image[one : one + two], examples.image[one + two :]]
    pools = [examples.pixels[sorted(set(rows))].flatten(1) for rows in pools]
    task = VLMTask(model, 2, examples, config)
    for step in range(6):
        pixels = torch.cat([piece["pixels"] for piece in task.batch(step, 0) if piece["pixels"] is not None])
        assert len(pixels) and all((pools[step // 2] == image.flatten()).all(1).any() for image in pixels), step
        assert step >= 2 or not any((pools[2] == image.flatten()).all(1).any() for image in pixels)

    def counts(ids):  # the answers to "how many shapes are there?"
        return {a for row in ids for a in re.findall(r"how many shapes are there\?\s*(\w+)", model.tokenizer.decode(row))}

    assert counts(examples.ids[:one]) == {"one"}
    assert counts(examples.ids[one : one + two]) == {"two"}
    assert counts(examples.ids[one + two :]) == {"two", "three"}


def test_stage_2_focus_phase_asks_only_its_kinds_in_its_steps(tmp_path, model):
    """A phase {start: 3, steps: 2, kinds: [relation]} after {steps: 2, objects: 1}: steps 3-4 draw only single
    relation questions (each alone, answered yes or no) about scenes of the configured world; steps 2 and 5-6 the
    configured world's conversations, unchanged."""
    from vlfm.data.world_text import question_kind
    from vlfm.train.vlm import VLMTask, stage_examples

    config = tiny_vlm_config(tmp_path, "stage2.steps=7", "stage2.phases=[{steps: 2, objects: 1}, "
                             "{start: 3, steps: 2, kinds: [relation]}]", "data.world.min_objects=2",
                             "data.world.max_objects=3", "data.wordings=one")  # fmt: skip
    examples = stage_examples(model, config, 2)
    plain = stage_examples(model, tiny_vlm_config(tmp_path, "data.world.min_objects=2", "data.world.max_objects=3",
                                                  "data.wordings=one"), 2)  # one wording: questions end in "?"
    one, focus = (len(p.rows) for p in examples.phases)
    assert one > 0 and focus > 0 and examples.ids[one + focus :] == plain.ids
    assert examples.phases[1].start == 3 and examples.phases[1].end == 5

    def asks_one_relation(row) -> bool:
        text = model.tokenizer.decode([i for i in row if i != model.tokenizer.pad_id])
        questions = re.findall(r"(?:is|what|how|where)[^?]*\?", text)
        return (len(questions) == 1 and question_kind(questions[0]) == "relation"
                and re.search(r"\?\W*(yes|no)\W*$", text) is not None)  # fmt: skip

    assert all(asks_one_relation(row) for row in examples.ids[one : one + focus])
    assert all(row.count(model.config.image_token_id) == model.image_tokens for row in examples.ids[one : one + focus])
    one_object = tiny_vlm_config(tmp_path, "stage2.steps=7", "stage2.phases=[{steps: 2, kinds: [relation]}]",
                                 "data.world.max_objects=1")  # fmt: skip
    with pytest.raises(ConfigError, match=r"phases\[0\] has no training sequences.*kinds=\['relation'\] ask no such"):
        stage_examples(model, one_object, 2)  # one object: no relation to ask about
    task = VLMTask(model, 2, examples, config)
    for step in range(7):  # steps 3-4 serve the focus phase only; 0-1 one object (no relation); the others all
        asks = [asks_one_relation(row.tolist()) for piece in task.batch(step, 0) for row in piece["ids"]]
        assert all(asks) if step in (3, 4) else not any(asks) if step < 2 else not all(asks), step


def test_phases_and_length_buckets_are_checked():
    phases = "stage2.phases="
    for overrides, message in [([phases + "[{steps: 1}]", "stage1.phases=[{steps: 1}]"], "only stage 2"),
                               (["stage0.phases=[{steps: 1}]"], "only stage 2"),
                               ([phases + "[{steps: 1}, {steps: 3}]"], r"phases\[1\]: steps 1-4 must lie inside"),
                               ([phases + "[{steps: 0}]"], "steps must be >= 1"),
                               ([phases + "[{start: -1, steps: 1}]"], "start >= 0"),
                               ([phases + "[{steps: 2}, {start: 1, steps: 1}]"], "may not overlap"),
                               ([phases + "[{start: 2, steps: 2}]"], "inside stage2.steps=3"),
                               ([phases + "[{steps: 1, objects: 1}]", "data.source=x.json"], "needs the built-in world"),
                               ([phases + "[{steps: 1, source: x.json, objects: 1}]"], "needs the built-in world"),
                               ([phases + "[{steps: 1, objects: 4}]"], "data.world.max_objects=3"),
                               ([phases + "[{steps: 1, objects: 0}]"], "data.world.max_objects=3"),
                               ([phases + "[{steps: 1, kinds: [relations]}]"], "name one or more question kinds"),
                               ([phases + "[{steps: 1, kinds: []}]"], "name one or more question kinds"),
                               ([phases + "[{steps: 1, mix: 0}]"], r"mix=0.0: the fraction"),
                               ([phases + "[{steps: 1, mix: 1.5}]"], r"mix=1.5"),
                               ([phases + "[{steps: 1, mix: 0.1}]"], "at least one of stage2.batch_size=4"),
                               ([phases + "[{steps: 1, colours: 2}]"], r"unknown config key 'stage2.phases\[0\].colours'"),
                               ([phases + "[3]"], r"stage2.phases\[0\] must be a mapping"),
                               ([phases + "{steps: 1}"], "stage2.phases must be a list"),
                               (["data.length_buckets=0"], "length_buckets=0 is out of range: it must be >= 1")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(None, TINY_VLM + overrides)
    config = load_config(None, TINY_VLM + ["stage2.steps=9", phases + "[{steps: 2, objects: 1}, {start: 4, steps: 3, "
                                           "kinds: [relation, colour], mix: 0.5}, {steps: 1, source: a.json}]"])
    assert [type(p).__name__ for p in config.stage2.phases] == ["PhaseConfig"] * 3
    assert config.stage2.phases[1].kinds == ["relation", "colour"] and config.stage2.phases[1].mix == 0.5
    assert config.stage2.phase_windows == [(0, 2), (4, 7), (7, 8)]
    assert load_config(None, TINY_VLM).stage2.phases == []


def test_a_curriculum_on_llava_json_serves_each_phase_only_in_its_window(files, model):
    config = tiny_vlm_config(files, f"data.source={files / 'main.json'}", "stage2.steps=8",
                             f"stage2.phases=[{{steps: 2, source: {files / 'other.json'}}}, "
                             "{start: 4, steps: 2, kinds: [colour]}]")  # fmt: skip
    examples = stage_examples(model, config, 2)
    other, colour = (p.rows for p in examples.phases)
    assert [(p.start, p.end) for p in examples.phases] == [(0, 2), (4, 6)]
    assert len(other) == 2 and all("what shape is the red object" in t for t in texts(model, examples, other))
    # the colour turns alone, with their record's image (the text-only record's without one)
    colour_texts = texts(model, examples, colour)
    assert len(colour) == 4 and all("colour" in t and "how many" not in t.lower() for t in colour_texts)
    assert sorted(examples.image[r] >= 0 for r in colour) == [False, True, True, True]
    assert [examples.ids[r].count(model.config.image_token_id) for r in colour if examples.image[r] >= 0] == [16] * 3
    assert len(examples.main) == 5 and len(examples.pixels) == 4 + 2  # other.json's images appended
    assert {examples.image[r] for r in other} == {4, 5}
    task = VLMTask(model, 2, examples, config)
    for step in range(8):
        rows = task.rows(step, 0)
        pool = other if step < 2 else colour if 4 <= step < 6 else examples.main
        assert len(rows) == 4 and set(rows) <= set(pool), step
        pixels = [piece["pixels"] for piece in task.batch(step, 0) if piece["pixels"] is not None]
        assert sum(map(len, pixels)) == sum(examples.image[r] >= 0 for r in rows)


def test_a_mixed_phase_takes_its_share_of_each_batch(files, model):
    config = tiny_vlm_config(files, f"data.source={files / 'main.json'}", "stage2.steps=4",
                             "stage2.phases=[{start: 1, steps: 2, kinds: [colour], mix: 0.5}]")  # fmt: skip
    examples = stage_examples(model, config, 2)
    (phase,) = examples.phases
    task = VLMTask(model, 2, examples, config)
    for step in range(4):
        rows = task.rows(step, 0)
        from_phase = [r for r in rows if r in phase.rows]
        assert len(rows) == 4 and len(from_phase) == (2 if step in (1, 2) else 0), step
        assert set(rows) - set(from_phase) <= set(examples.main)


def test_phases_survive_the_resolved_config(files):
    config = tiny_vlm_config(files, "stage2.steps=9", "stage2.phases=[{steps: 2, objects: 1}, {start: 4, steps: 3, "
                             "kinds: [relation], mix: 0.5}]")  # fmt: skip
    assert from_dict(VLMRunConfig, to_dict(config)) == config


def test_stage_2_text_replay_adds_text_only_rows_after_the_world_s_own(tmp_path, model):
    """data.text_replay=0.5: stage 2's own sequences unchanged, then text-only conversations of 20 scenes (no image
    row, no image token); with data.text_all_pairs they (and stage 0's text) name held-out colour+shape pairs, which
    no image row ever shows; without it they never do. A step mixing both kinds trains."""
    from vlfm.data.shapes import ALL_LABELS
    from vlfm.train.vlm import VLMTask, stage_examples

    held = WorldConfig().held_out
    plain = stage_examples(model, tiny_vlm_config(tmp_path), 2)

    def mentions_held_out(rows):
        return sum(any(label in text for label in held) for text in rows)

    for all_pairs in (False, True):
        config = tiny_vlm_config(tmp_path, "data.text_replay=0.5", f"data.text_all_pairs={all_pairs}")
        examples = stage_examples(model, config, 2)
        n = len(plain.ids)
        assert examples.ids[:n] == plain.ids and examples.image[:n] == plain.image
        replay = range(n, len(examples.ids))
        assert len(replay) > 20 and all(examples.image[r] == -1 for r in replay)
        assert not any(model.config.image_token_id in examples.ids[r] for r in replay)
        replayed, text = texts(model, examples, replay), texts(model, stage_examples(model, config, 0), range(40))
        assert (mentions_held_out(replayed) > 0) == all_pairs and (mentions_held_out(text) > 0) == all_pairs
        assert mentions_held_out(texts(model, examples, range(n))) == 0  # the image conversations: never
        assert all(label in " ".join(replayed + text) for label in ALL_LABELS) == all_pairs
    task = VLMTask(model, 2, examples, config)
    step = next(s for s in range(50) if {examples.image[r] >= 0 for r in task.rows(s, 0)} == {True, False})
    loss, _ = task.loss(task.batch(step, 0))
    loss.backward()
    assert torch.isfinite(loss) and model.lm.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_text_replay_on_a_llava_file_is_refused(files):
    with pytest.raises(ConfigError, match=r"data.text_replay=0.3 replays the built-in world's text"):
        tiny_vlm_config(files, f"data.source={files / 'main.json'}", "data.text_replay=0.3")
