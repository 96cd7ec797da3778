import json
import logging

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from vlfm.data.chat import (
    IGNORE_INDEX,
    TEMPLATES,
    Record,
    add_chat_tokens,
    encode_conversation,
    encode_prompt,
    exact_match,
    expand_image_tokens,
    read_llava_json,
    world_conversations,
    world_text,
)
from vlfm.data.shapes import ShapesWorld
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.world_text import captions, questions

CORPUS = ["a small red circle", "a big blue square left of a green triangle", "there is a yellow star",
          "what colour is the star?", "how many shapes are there? two"] * 20  # fmt: skip
CONVERSATION = [
    ("system", "answer in one word."),
    ("user", "<image>\nwhat colour is the star?"),
    ("assistant", "yellow"),
    ("user", "how many shapes are there?"),
    ("assistant", "two shapes"),
]


def chat_tokenizer(template=None) -> Tokenizer:
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    for t in [template] if template else TEMPLATES.values():
        add_chat_tokens(tok, t)
    return tok


def label_spans(labels: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of each run of trained positions."""
    trained = [label != IGNORE_INDEX for label in labels] + [False]
    return [(i, j) for i in range(len(labels)) if trained[i] and (i == 0 or not trained[i - 1])
            for j in [trained.index(False, i)]]  # fmt: skip


def test_markers_become_single_tokens_idempotently():
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    template = TEMPLATES["vlfm"]
    assert len(tok.encode("<|assistant|>")) > 1
    with pytest.raises(ValueError, match="add_chat_tokens"):
        encode_conversation(CONVERSATION, tok, template)
    ids = add_chat_tokens(tok, template)
    size = tok.vocab_size
    assert len(ids) == len(set(ids)) == len(template.special_tokens) == 5
    assert [tok.encode(t) for t in template.special_tokens] == [[i] for i in ids]
    assert add_chat_tokens(tok, template) == ids and tok.vocab_size == size
    chatml = add_chat_tokens(tok, TEMPLATES["chatml"])
    assert chatml[-1] == ids[-1] and tok.encode("<|im_start|>user\n")[0] == chatml[0]
    assert tok.encode("<|END|>") != [template.stop_id(tok)]  # a special token is matched as written


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_labels_are_exactly_the_replies_and_their_end_marker(name):
    template = TEMPLATES[name]
    tok = chat_tokenizer(template)
    ids, labels = encode_conversation(CONVERSATION, tok, template)
    assert len(ids) == len(labels) and ids[0] == tok.bos_id == tok.token_id("<bos>")
    replies = [text for role, text in CONVERSATION if role == "assistant"]
    spans = label_spans(labels)
    assert len(spans) == len(replies)
    for (start, stop), reply in zip(spans, replies):
        assert labels[start:stop] == ids[start:stop]  # aligned, not shifted
        assert ids[stop - 1] == template.stop_id(tok) and tok.decode(ids[start : stop - 1]) == reply
    assert ids.count(tok.token_id("<image>")) == 1 and ids.count(template.stop_id(tok)) == len(CONVERSATION)
    with pytest.raises(ValueError, match=f"{len(ids)} tokens.*max_length=10"):
        encode_conversation(CONVERSATION, tok, template, max_length=10)
    assert encode_conversation(CONVERSATION, tok, template, max_length=len(ids))[0] == ids


def test_unknown_role_is_named():
    tok = chat_tokenizer()
    with pytest.raises(ValueError, match="'bot'"):
        encode_conversation([("user", "hi"), ("bot", "hello")], tok, TEMPLATES["vlfm"])


def test_no_bos_when_the_tokenizer_adds_none():
    tok = chat_tokenizer()
    backend = HFTokenizer.from_str(tok.backend.to_str())
    backend.post_processor = None  # like Qwen2's: nothing around a text
    qwen_like = Tokenizer(backend)
    assert qwen_like.bos_id is None
    ids, _ = encode_conversation(CONVERSATION, qwen_like, TEMPLATES["chatml"])
    assert ids == encode_conversation(CONVERSATION, tok, TEMPLATES["chatml"])[0][1:]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prompt_is_a_prefix_of_the_training_sequence(name):
    template = TEMPLATES[name]
    tok = chat_tokenizer(template)
    history = CONVERSATION[:-1]
    prompt = encode_prompt(history, tok, template)
    ids, labels = encode_conversation(CONVERSATION, tok, template)
    assert ids[: len(prompt)] == prompt
    # the reply starts right after the prompt, and everything before it since the previous reply is masked
    assert labels[len(prompt)] != IGNORE_INDEX and labels[len(prompt) - 1] == IGNORE_INDEX
    assert tok.decode(ids[len(prompt) : label_spans(labels)[-1][1] - 1]) == "two shapes"
    with pytest.raises(ValueError, match="end with a user turn"):
        encode_prompt(CONVERSATION, tok, template)


def test_rendered_vlfm_text_tokenizes_as_encoded():
    template = TEMPLATES["vlfm"]
    tok = chat_tokenizer(template)
    world = ShapesWorld()
    scenes = [world.scene("train", i) for i in range(3)]
    texts = world_text(scenes, template, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    conversations = [c for s in scenes for c in world_conversations(s, rng)]
    assert len(texts) == len(conversations) and texts[0].startswith("<|user|><image>\n")
    assert [tok.encode(t) for t in texts] == [encode_conversation(c, tok, template)[0][1:] for c in conversations]


def test_expand_image_tokens_and_count_errors():
    ids, labels = [1, 9, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6]
    out_ids, out_labels = expand_image_tokens(ids, labels, image_token_id=9, n=3)
    assert out_ids == [1, 9, 9, 9, 5, 6] and out_labels == [IGNORE_INDEX] * 5 + [6]
    two = expand_image_tokens([9, 2, 9], [IGNORE_INDEX, 2, IGNORE_INDEX], 9, 2, images=2)[0]
    assert two == [9, 9, 2, 9, 9]
    with pytest.raises(ValueError, match="1 image.*0 image placeholder"):
        expand_image_tokens([1, 5], [IGNORE_INDEX, 5], 9, 3)
    with pytest.raises(ValueError, match="1 image.*2 image placeholder"):
        expand_image_tokens([9, 9], [IGNORE_INDEX] * 2, 9, 3, images=1)
    assert expand_image_tokens([1, 5], [1, 5], 9, 3, images=0) == ([1, 5], [1, 5])


def turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


def test_read_llava_json(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"not decoded here")
    good = [
        {"id": "1", "image": "images/a.jpg", "conversations": turns(("human", "<image>\nwhat?"), ("gpt", "red"))},
        {"id": "2", "conversations": turns(("system", "be brief."), ("user", "hi"), ("assistant", "hello"))},
    ]
    malformed = [
        "a string",
        {"id": "3"},
        {"id": "4", "conversations": [{"from": "human"}]},
        {"id": "5", "image": "images/missing.jpg", "conversations": turns(("human", "<image>\nq"), ("gpt", "a"))},
        {"id": "6", "image": "images/a.jpg", "conversations": turns(("human", "no placeholder"), ("gpt", "a"))},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(good[:1] + malformed + good[1:]))
    with caplog.at_level(logging.WARNING, logger="vlfm"):
        records, skipped = read_llava_json(path)
    assert skipped == 5 and len(caplog.records) == 1 and "skipped 5 of 7" in caplog.text
    assert records == [
        Record(tmp_path / "images" / "a.jpg", [("user", "<image>\nwhat?"), ("assistant", "red")]),
        Record(None, [("system", "be brief."), ("user", "hi"), ("assistant", "hello")]),
    ]
    lines = tmp_path / "data.jsonl"
    lines.write_text("\n".join([json.dumps(good[0]), "{broken", "", json.dumps(good[1])]))
    assert read_llava_json(lines, image_root=tmp_path) == (records, 1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([good[1], {"conversations": turns(("human", "hi"), ("bot", "hello"))}]))
    with pytest.raises(ValueError, match=r"bad\.json record 1: unknown role 'bot'"):
        read_llava_json(bad)


def test_world_conversations_answer_with_the_world_answers():
    world = ShapesWorld()
    rng = np.random.default_rng(0)
    for i in range(20):
        scene = world.scene("train", i)
        conversations = world_conversations(scene, rng, avoid=world.held_out_labels, counts=None)
        caption = conversations[0]
        assert caption[0][1].startswith("<image>\n") and caption[1][1] in captions(scene)
        expected = questions(scene, avoid=world.held_out_labels, training=True)
        singles = [c for c in conversations[1:] if len(c) == 2]
        multi = [c for c in conversations[1:] if len(c) > 2]
        assert [(q.removeprefix("<image>\n"), a) for (_, q), (_, a) in singles] == expected
        assert multi and all(len(c) in (4, 6) for c in multi)
        for conversation in conversations:
            roles = [role for role, _ in conversation]
            assert roles == ["user", "assistant"] * (len(conversation) // 2)
            assert [text.count("<image>") for _, text in conversation] == [1] + [0] * (len(conversation) - 1)
            assert conversation[0][1].startswith("<image>\n")
        asked = {(q.removeprefix("<image>\n"), a) for c in multi for (_, q), (_, a) in zip(c[::2], c[1::2])}
        assert asked <= set(expected) and len(asked) >= len(expected) - 1  # at most one left over


def test_exact_match_normalises():
    assert exact_match("Red.", "red") and exact_match("  two \n", "two") and exact_match("yes!", "Yes")
    assert not exact_match("red circle", "red") and not exact_match("blue", "red") and not exact_match("", "red")


@pytest.mark.parametrize("max_turns,singles", [(3, True), (6, False), (1, False)])
def test_world_conversations_ask_every_question(max_turns, singles):
    scene = ShapesWorld().scene("train", 5)
    asked = questions(scene, training=True)  # training's questions: the extra existence questions included
    conversations = world_conversations(scene, np.random.default_rng(0), max_turns=max_turns, singles=singles,
                                        counts=None)
    assert conversations[0][1][1] in captions(scene)  # a caption request first
    qa = [[(q.removeprefix("<image>\n"), a) for (_, q), (_, a) in zip(c[::2], c[1::2])] for c in conversations[1:]]
    assert all(c[0][1].startswith("<image>\n") and "<image>" not in "".join(t for _, t in c[1:]) for c in conversations[1:])
    alone = len(asked) if singles else 0
    assert [t[0] for t in qa[:alone]] == asked[:alone] and all(len(t) == 1 for t in qa[:alone])
    grouped = qa[alone:]
    again = sorted(x for t in grouped for x in t)  # every question once more in conversations (with singles, a
    assert set(again) <= set(asked) and len(again) == len(set(again)) >= len(asked) - singles  # last odd one may not)
    assert all(len(t) <= max_turns for t in grouped) and (not singles or all(len(t) >= 2 for t in grouped))


@pytest.mark.parametrize("counts", [0, 1, 3])
def test_world_conversations_cap_the_count_questions(counts):
    """`counts`: that many "how many" questions per scene, drawn at random; every other question still asked."""
    world, rng = ShapesWorld(), np.random.default_rng(0)
    drawn = set()
    for i in range(30):
        scene = world.scene("train", i)
        every = questions(scene, training=True)
        tally = [q for q, _ in every if q.startswith("how many ")]
        conversations = world_conversations(scene, rng, max_turns=6, singles=False, counts=counts)
        asked = [(q.removeprefix("<image>\n"), a) for c in conversations[1:] for (_, q), (_, a) in zip(c[::2], c[1::2])]
        kept = [q for q, _ in asked if q.startswith("how many ")]
        assert len(kept) == min(counts, len(tally)) and set(kept) <= set(tally)
        assert sorted(p for p in asked if not p[0].startswith("how many ")) == sorted(
            p for p in every if not p[0].startswith("how many "))
        drawn.update(kept)
    assert counts == 0 or len(drawn) > 3 * counts  # drawn at random, not always the first ones
