"""The built-in world's language: captions in varied phrasings and question/answer pairs for each scene.

Pure functions of the scene (a per-scene seed drives the choices), so any scene's text is reproducible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from vlfm.data.glyphs import glyph_captions
from vlfm.data.shapes import ALL_LABELS, COLOURS, SHAPES, Obj, Scene

NUMBERS = ("zero", "one", "two", "three", "four")
OPENERS = ("a picture of", "an image of", "a drawing of", "a photo of")
PLURALS = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}

# First matching pattern names a question's kind (the order matters: "is there" before "left of"). The patterns
# cover every wording of WORDINGS.
KINDS = [("count", r"^how many|^count the|^tell me how many"),
         ("colour", r"^(in the picture, )?(what|which) colou?r|colou?r of the"),
         ("shape", r"^(in the picture, )?(what|which) shape|shape of the"), ("digit", r"digit"),
         ("size", r"big or small|small or big"),
         ("existence", r"^is there|^(in the picture, )?can you see|^does the picture show|^tell me if there is"),
         ("relation", r" (left of|above) "),
         ("position", r"left or the right|right or the left|top or the bottom|bottom or the top|^where|"
                      r"^in the picture, where|^tell me where")]  # fmt: skip

# Each question form's wordings: (training, held out). The first training wording is the form itself, the only
# one `wordings: one` asks. A held-out wording recombines phrasings that training uses elsewhere (the prefix
# "in the picture, " where training has the suffix, "tell me ..." where training asks directly), as
# eval/world.py's unseen templates are openings no caption uses: VQA on them tests another wording of a
# question the model can answer, not words it never read.
WORDINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "what colour is the {0}?": (
        ("what colour is the {0}?", "which colour is the {0}?", "tell me the colour of the {0}.",
         "what colour is the {0} in the picture?"),
        ("what is the colour of the {0}?", "in the picture, which colour is the {0}?")),
    "what shape is the {0} object?": (
        ("what shape is the {0} object?", "which shape is the {0} object?", "what is the shape of the {0} object?",
         "what shape is the {0} object in the picture?"),
        ("tell me the shape of the {0} object.", "in the picture, what shape is the {0} object?")),
    "is the {0} big or small?": (
        ("is the {0} big or small?", "is the {0} small or big?", "tell me if the {0} is big or small.",
         "is the {0} in the picture big or small?"),
        ("tell me if the {0} is small or big.", "in the picture, is the {0} big or small?")),
    "how many {0} are there?": (
        ("how many {0} are there?", "how many {0} can you see?", "count the {0}.", "how many {0} are in the picture?"),
        ("tell me how many {0} there are.", "how many {0} does the picture show?")),
    "is there {0}?": (
        ("is there {0}?", "can you see {0}?", "does the picture show {0}?", "is there {0} in the picture?"),
        ("tell me if there is {0}.", "in the picture, can you see {0}?")),
    "is the {0} on the left or the right?": (
        ("is the {0} on the left or the right?", "is the {0} on the right or the left?",
         "tell me if the {0} is on the left or the right.", "is the {0} on the left or the right of the picture?"),
        ("in the picture, is the {0} on the right or the left?", "tell me if the {0} is on the right or the left.")),
    "is the {0} at the top or the bottom?": (
        ("is the {0} at the top or the bottom?", "is the {0} at the bottom or the top?",
         "tell me if the {0} is at the top or the bottom.", "is the {0} at the top or the bottom of the picture?"),
        ("in the picture, is the {0} at the bottom or the top?", "tell me if the {0} is at the bottom or the top.")),
    "where is the {0}?": (
        ("where is the {0}?", "where is the {0} in the picture?", "tell me where the {0} is."),
        ("in the picture, where is the {0}?", "where can you see the {0}?")),
    "is the {0} left of the {1}?": (
        ("is the {0} left of the {1}?", "is the {0} to the left of the {1}?", "tell me if the {0} is left of the {1}.",
         "is the {0} left of the {1} in the picture?"),
        ("in the picture, is the {0} to the left of the {1}?", "tell me if the {0} is to the left of the {1}.")),
    "is the {0} above the {1}?": (
        ("is the {0} above the {1}?", "is the {0} above the {1} in the picture?", "tell me if the {0} is above the {1}."),
        ("in the picture, is the {0} above the {1}?", "can you tell me if the {0} is above the {1}?")),
}  # fmt: skip
WORDING_CHOICES = ("one", "varied", "heldout")  # questions()' wordings: the form, training's, the held-out ones
_FORMS = [(re.compile("^" + re.escape(form).replace(r"\{0\}", "(.+?)").replace(r"\{1\}", "(.+?)") + "$"), form)
          for form in WORDINGS]  # fmt: skip


def question_kind(question: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, question)), "other")


def _scene_rng(scene: Scene, salt: int) -> np.random.Generator:
    # Derived from the scene itself, so captions/questions are reproducible without any global state.
    coords = [round(abs(v) * 1e4) % 2**32 for o in scene.objects for v in (o.x, o.y)]
    return np.random.default_rng([salt, scene.background % 2**32, len(scene.objects), *coords])


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _counted(names: list[str], singular, plural) -> str:
    """"a red shape and two blue shapes": each distinct name once, in first-seen order, with its count."""
    counts = {name: names.count(name) for name in names}
    return _join([with_article(singular(n)) if k == 1 else f"{NUMBERS[k]} {plural(n)}" for n, k in counts.items()])


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _where(o: Obj) -> str:
    h = "left" if o.x < 0.4 else "right" if o.x > 0.6 else ""
    v = "top" if o.y < 0.4 else "bottom" if o.y > 0.6 else ""
    if h and v:
        return f"in the {v} {h}"
    return f"on the {h}" if h else f"at the {v}" if v else "in the middle"


def _relation(a: Obj, b: Obj) -> str:
    """Where a is relative to b: left/right of unless the vertical offset clearly dominates."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dy) > 1.5 * abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def captions(scene: Scene, rng: np.random.Generator | None = None) -> list[str]:
    """Varied descriptions; the first is canonical (every object, left to right, with size) and fixed."""
    if scene.digit is not None:
        return glyph_captions(scene.digit)
    rng = rng or _scene_rng(scene, 1)
    order = rng.permutation(len(scene.objects))  # non-canonical captions should not always list shapes left to right
    return _phrasings(scene, order, OPENERS[rng.integers(len(OPENERS))])


def _phrasings(scene: Scene, order, opener: str) -> list[str]:
    """captions() with its two random choices given: the order of the listed objects and the opening."""
    objs = sorted(scene.objects, key=lambda o: (o.x, o.y))
    name = (lambda o: o.shape) if scene.grey else (lambda o: o.label)
    full = [f"a {o.size} {name(o)}" for o in objs]
    plain = [with_article(name(o)) for o in objs]
    if len(objs) == 2:
        first = f"{full[0]} {_relation(objs[0], objs[1])} {full[1]}"
    else:
        first = _join(full)
    shuffled = [plain[i] for i in order]
    count = f"{NUMBERS[len(objs)]} shape{'s' if len(objs) > 1 else ''}"
    out = [
        first,
        f"{opener} {_join(shuffled)}",
        f"there is {_join(shuffled)}",
        f"{count}: {_join([full[i] for i in order])}",
        _join([name(objs[i]) for i in order]),
    ]
    # Colour-only and shape-only descriptions: they teach the two factors separately, which is what lets
    # a never-seen combination ("red circle") be recognised from its parts.
    colours = [objs[i].colour for i in order]
    shapes = [objs[i].shape for i in order]
    if not scene.grey:
        out.append(_counted(colours, lambda c: f"{c} shape", lambda c: f"{c} shapes"))
    out.append(_counted(shapes, str, PLURALS.get))
    if len(objs) == 1:
        out += [f"{plain[0]} {_where(objs[0])}", f"{_where(objs[0])}, {full[0]}", f"a single {name(objs[0])}"]
    elif len(objs) == 2:
        rel = _relation(objs[1], objs[0])
        out += [f"{plain[1]} {rel} {plain[0]}", f"{full[1]} {rel} {full[0]}", f"{count}, {_join(shuffled)}"]
    else:
        out += [f"from left to right: {_join([name(o) for o in objs])}", f"{count}: {_join(shuffled)}"]
    return out


def questions(
    scene: Scene, rng: np.random.Generator | None = None, avoid: Iterable[str] = (), training: bool = False,
    wordings: str = "one",
) -> list[tuple[str, str]]:
    """(question, one-word answer) pairs, only those whose answer is unambiguous in this scene.

    `wordings`: "one" asks each question in its one form; "varied" in one of its training wordings and
    "heldout" in one of its held-out wordings (WORDINGS), drawn per question from the scene's own seed, so the
    questions and answers are the same in every mode and only their wording differs."""
    qa = _questions(scene, rng, avoid, training)
    if wordings == "one":
        return qa
    if wordings not in WORDING_CHOICES:
        raise ValueError(f"wordings={wordings!r} is not one of: {', '.join(WORDING_CHOICES)}")
    pick = _scene_rng(scene, 3)
    return [(reword(q, pick, held_out=wordings == "heldout"), a) for q, a in qa]


def reword(question: str, rng: np.random.Generator, held_out: bool = False) -> str:
    """The question in one of its form's training (or held-out) wordings; a question of no form unchanged."""
    for pattern, form in _FORMS:
        if match := pattern.match(question):
            choices = WORDINGS[form][held_out]
            return choices[rng.integers(len(choices))].format(*match.groups())
    return question


def _questions(scene: Scene, rng: np.random.Generator | None, avoid: Iterable[str], training: bool) -> list[tuple[str, str]]:
    """questions() in their one form.

    `avoid`: labels that 'no' existence questions must not mention (e.g. the held-out ones in training).
    `training`: more existence questions, appended: a 'yes' about every object, as many plausible 'no's, and
    one easy 'no' about an object whose colour and shape are both absent (one attribute answers it, which a
    model learns before it learns to check both). With one 'yes' and one 'no' per scene, some runs answered
    one word to every existence question; with these, most runs learn them (docs/experiments.md §10)."""
    if scene.digit is not None:
        return [("what digit is this?", str(scene.digit)), ("how many shapes are there?", "zero")]
    rng = rng or _scene_rng(scene, 2)
    objs = list(scene.objects)
    colours, shapes = [o.colour for o in objs], [o.shape for o in objs]
    qa = [("how many shapes are there?", NUMBERS[len(objs)])] + _attribute_questions(objs)
    qa += _count_questions(colours, shapes, rng)
    # Existence: one 'yes', and a plausible 'no' that shares the colour or the shape of a present object.
    qa.append((f"is there {with_article(objs[rng.integers(len(objs))].label)}?", "yes"))
    present, avoid = {o.label for o in objs}, set(avoid)
    near = [t for t in ALL_LABELS if t not in present and t not in avoid and set(t.split()) & set(colours + shapes)]
    if near:
        qa.append((f"is there {with_article(near[rng.integers(len(near))])}?", "no"))
    qa += _relation_questions(objs, rng)
    if training:  # drawn last, so the other questions are the same with and without them
        asked = {q for q, _ in qa}
        yes = [q for q in (f"is there {with_article(t)}?" for t in sorted(present)) if q not in asked]
        no = [q for q in (f"is there {with_article(t)}?" for t in near) if q not in asked]
        qa += [(q, "yes") for q in yes] + [(no[i], "no") for i in rng.permutation(len(no))[: len(yes)]]
        far = [t for t in ALL_LABELS if t not in avoid and not set(t.split()) & set(colours + shapes)]
        if far:
            qa.append((f"is there {with_article(far[rng.integers(len(far))])}?", "no"))
    if scene.grey:  # a grey picture cannot answer, or be asked about, colours
        qa = [(q, a) for q, a in qa if a not in COLOURS and not any(c in q.split() for c in COLOURS)]
    return qa


def _attribute_questions(objs: list[Obj]) -> list[tuple[str, str]]:
    """Colour, shape, size and position of each object, where the answer is unambiguous."""
    colours, shapes = [o.colour for o in objs], [o.shape for o in objs]
    qa = []
    for o in objs:
        if shapes.count(o.shape) == 1:
            qa.append((f"what colour is the {o.shape}?", o.colour))
        if colours.count(o.colour) == 1:
            qa.append((f"what shape is the {o.colour} object?", o.shape))
        qa.append((f"is the {o.label} big or small?", o.size))
        if abs(o.x - 0.5) > 0.15:  # absolute position, only with a clear margin from the centre line
            qa.append((f"is the {o.label} on the left or the right?", "left" if o.x < 0.5 else "right"))
        if abs(o.y - 0.5) > 0.15:
            qa.append((f"is the {o.label} at the top or the bottom?", "top" if o.y < 0.5 else "bottom"))
    if len(objs) == 1:
        o = objs[0]
        dx, dy = abs(o.x - 0.5), abs(o.y - 0.5)
        if dx < 0.1 and dy < 0.1:
            qa.append((f"where is the {o.shape}?", "middle"))
        elif dx > 0.2 and dy < 0.1:
            qa.append((f"where is the {o.shape}?", "left" if o.x < 0.5 else "right"))
        elif dy > 0.2 and dx < 0.1:
            qa.append((f"where is the {o.shape}?", "top" if o.y < 0.5 else "bottom"))
    if len(objs) > 1 and [o.size for o in objs].count("big") == 1:
        qa.append(("what colour is the big shape?", next(o.colour for o in objs if o.size == "big")))
    return qa


def _count_questions(colours: list[str], shapes: list[str], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Counts per colour and per shape, plus one absent colour and shape ("zero" is an answer too)."""
    qa = []
    absent_c = [c for c in COLOURS if c not in colours]
    absent_s = [s for s in SHAPES if s not in shapes]
    for c in sorted(set(colours)) + [absent_c[rng.integers(len(absent_c))]] * bool(absent_c):
        qa.append((f"how many {c} shapes are there?", NUMBERS[colours.count(c)]))
    for s in sorted(set(shapes)) + [absent_s[rng.integers(len(absent_s))]] * bool(absent_s):
        qa.append((f"how many {PLURALS[s]} are there?", NUMBERS[shapes.count(s)]))
    return qa


def _relation_questions(objs: list[Obj], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Relations between pairs, only when the offset along that axis is clear; random order balances yes/no."""
    qa = []
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = (objs[i], objs[j]) if rng.random() < 0.5 else (objs[j], objs[i])
            if abs(a.x - b.x) > 0.15:
                qa.append((f"is the {a.label} left of the {b.label}?", "yes" if a.x < b.x else "no"))
            if abs(a.y - b.y) > 0.15:
                qa.append((f"is the {a.label} above the {b.label}?", "yes" if a.y < b.y else "no"))
    return qa
