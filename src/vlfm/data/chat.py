"""Conversations for the LLaVA-style assistant: the chat template shared by training and inference, label
masking, `<image>` placeholders, the LLaVA JSON format, and instruction data from the built-in world.

Every turn is `opening text end separator`, and each of those pieces is tokenized on its own. So the
assistant's reply starts and ends on token boundaries (the labels are exact, with no re-tokenization guesswork),
and the prompt `encode_prompt` builds for generation is exactly a prefix of the training sequence. Labels are
aligned with the ids, not shifted (the model shifts them, as Hugging Face does).
"""

from __future__ import annotations

import functools
import json
import logging
import string
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from vlfm.data.shapes import Scene
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.world_text import captions, question_kind, questions
from vlfm.io import UsageError

log = logging.getLogger("vlfm")

IGNORE_INDEX = -100  # label of positions the loss skips (torch's cross_entropy default)
IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
Conversation = list[tuple[str, str]]  # (role, text) turns


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation is written. `markers` are the special tokens inside the openings and `end`; `end`
    closes every turn and is where generation stops, so it must be one of them."""

    system: str  # the text that opens a system turn
    user: str
    assistant: str
    end: str
    separator: str  # after each end marker
    markers: tuple[str, ...]

    def __post_init__(self):
        if self.end not in self.markers:
            raise ValueError(f"the end-of-turn marker {self.end!r} must be one of the markers {self.markers}")

    @property
    def stop_token(self) -> str:
        return self.end

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The tokens that must be single tokens of the tokenizer (add_chat_tokens makes them so)."""
        return (*self.markers, IMAGE_TOKEN)

    def opening(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        return getattr(self, role)

    def render(self, conversation: Conversation) -> str:
        return "".join(self.opening(role) + text + self.end + self.separator for role, text in conversation)

    def stop_id(self, tokenizer: Tokenizer) -> int:
        return tokenizer.token_id(self.end)


TEMPLATES: dict[str, ChatTemplate] = {
    # Nothing but special tokens between the texts, so a rendered conversation (world_text) tokenizes whole
    # exactly as encode_conversation tokenizes it piece by piece: pretraining sees the same sequences.
    "vlfm": ChatTemplate(
        system="<|system|>", user="<|user|>", assistant="<|assistant|>", end="<|end|>", separator="\n",
        markers=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
    # Qwen2 / SmolLM instruct models: `<|im_start|>user\n...<|im_end|>\n`.
    "chatml": ChatTemplate(
        system="<|im_start|>system\n", user="<|im_start|>user\n", assistant="<|im_start|>assistant\n",
        end="<|im_end|>", separator="\n", markers=("<|im_start|>", "<|im_end|>"),
    ),
}  # fmt: skip


def add_chat_tokens(tokenizer: Tokenizer, template: ChatTemplate, image_token: str = IMAGE_TOKEN) -> list[int]:
    """Make the template's markers and the image token special tokens (never split, never normalised) and
    return their ids, in the order markers..., image token. Idempotent: present tokens keep their ids."""
    tokens = list(dict.fromkeys([*template.markers, image_token]))
    tokenizer.backend.add_special_tokens(tokens)
    return [tokenizer.token_id(token) for token in tokens]


def encode_conversation(
    conversation: Conversation, tokenizer: Tokenizer, template: ChatTemplate, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels: IGNORE_INDEX except on the assistant's replies and their end marker, so the model
    learns to answer and to stop. The ids start with the tokenizer's bos when it has one (`Tokenizer.bos_id`),
    as its own template would; there is no eos: the end marker ends the sequence. A sequence longer than
    max_length (counted before image expansion) is an error, since truncating it would cut answers."""
    _check_markers(tokenizer, template)
    ids = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    labels = [IGNORE_INDEX] * len(ids)
    end, separator = [template.stop_id(tokenizer)], tokenizer.encode(template.separator)
    for role, text in conversation:
        opening, reply = tokenizer.encode(template.opening(role)), tokenizer.encode(text) + end
        ids += opening + reply + separator
        labels += [IGNORE_INDEX] * len(opening)
        labels += reply if role == "assistant" else [IGNORE_INDEX] * len(reply)
        labels += [IGNORE_INDEX] * len(separator)
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"the conversation is {len(ids)} tokens, longer than max_length={max_length}: "
                         "raise max_length or leave the conversation out")  # fmt: skip
    return ids, labels


def encode_prompt(conversation: Conversation, tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
    """The conversation so far (ending with a user turn) and the assistant's opening: generation continues
    from here and stops at `template.stop_id(tokenizer)`."""
    if not conversation or conversation[-1][0] != "user":
        last = conversation[-1][0] if conversation else "nothing"
        raise ValueError(f"a prompt must end with a user turn, this one ends with {last}")
    ids, _ = encode_conversation(conversation, tokenizer, template)
    return ids + tokenizer.encode(template.assistant)


def encode_with_chat_template(conversation: Conversation, tokenizer: Tokenizer) -> list[int]:
    """The prompt for generation as transformers builds it from a Hugging Face checkpoint's own Jinja chat
    template (`tokenizer.chat_template`): rendered with the generation prompt, then tokenized with the
    tokenizer's special tokens unless the text already starts with its bos token (as its processors do)."""
    text = render_chat_template(tokenizer, conversation)
    bos = tokenizer.special_tokens.get("bos_token")
    return tokenizer.encode(text, special_tokens=not (bos and text.startswith(bos)))


def render_chat_template(tokenizer: Tokenizer, conversation: Conversation, add_generation_prompt: bool = True) -> str:
    """`tokenizer.chat_template` rendered for a conversation. Turns go in as text, `<image>` placeholders
    inline (language-model templates); a template that shows none of the texts so (a multimodal one, reading
    content parts) gets them as parts: {"type": "image"} per placeholder, {"type": "text", "text": ...}."""
    if not tokenizer.chat_template:
        raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)")
    template = _compile(tokenizer.chat_template)
    names = {k: v for k, v in tokenizer.special_tokens.items() if v is not None}

    def render(messages):
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **names)

    text = render([{"role": role, "content": content} for role, content in conversation])
    shown = [t.replace(IMAGE_TOKEN, "").strip() for _, t in conversation]
    if all(t in text for t in shown):
        return text
    return render([{"role": role, "content": _parts(content)} for role, content in conversation])


def _parts(text: str) -> list[dict]:
    """A turn's text as content parts: an image part per `<image>` (the newline after one dropped), text parts."""
    parts: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        piece = piece.removeprefix("\n") if i else piece
        parts += ([{"type": "image"}] if i else []) + ([{"type": "text", "text": piece}] if piece else [])
    return parts


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    """A chat template compiled as transformers compiles it: a sandbox (templates come from the hub: untrusted
    code), trim_blocks and lstrip_blocks, loop controls, `{% generation %}` blocks, tojson, raise_exception."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # `{% generation %}...{% endgeneration %}` marks assistant text: render its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise UsageError(f"the tokenizer's chat template is not valid Jinja: {error}") from None


def _check_markers(tokenizer: Tokenizer, template: ChatTemplate) -> None:
    for token in template.markers:
        if len(tokenizer.encode(token)) != 1:
            raise ValueError(f"{token!r} is not a single token of this tokenizer: "
                             "call add_chat_tokens(tokenizer, template) first")  # fmt: skip


def expand_image_tokens(
    ids: list[int], labels: list[int], image_token_id: int, n: int, images: int = 1
) -> tuple[list[int], list[int]]:
    """Each image placeholder becomes n copies (labels IGNORE_INDEX): the positions the model fills with the n
    projected image features. `images`: how many images come with the sequence; the placeholders must match."""
    found = ids.count(image_token_id)
    if found != images:
        raise ValueError(f"{images} image(s) come with this sequence but it holds {found} image placeholder(s) "
                         f"(id {image_token_id}); put one {IMAGE_TOKEN} per image in the text")
    out_ids: list[int] = []
    out_labels: list[int] = []
    for token, label in zip(ids, labels):
        if token == image_token_id:
            out_ids += [token] * n
            out_labels += [IGNORE_INDEX] * n
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


# ------------------------------------------------------------------------------------------------ LLaVA JSON

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Record:
    image: Path | None  # None: a text-only conversation
    conversation: Conversation


def read_llava_json(path: str | Path, image_root: str | Path | None = None) -> tuple[list[Record], int]:
    """Records of a LLaVA instruction file (.json: a list of records; .jsonl: one a line) and how many
    were skipped. Image paths are relative to image_root (default: the file's folder); images are decoded
    later (io.decode_image).

    Malformed records (not an object, no conversations, a turn without text, a missing image, placeholders
    that do not match the image) are skipped, counted and summarised in one warning. An unknown role is an
    error: it means the whole file is in a format this reader misreads, not that one record is bad."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file {str(path)!r} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix == ".jsonl":
        raw = [_json_or_none(line) for line in text.splitlines() if line.strip()]
    else:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            raise UsageError(f"{path} is not valid JSON ({error}); LLaVA files hold a list of records") from None
        if not isinstance(raw, list):
            raise UsageError(f"{path} holds a JSON {type(raw).__name__}; LLaVA files hold a list of records")
    records, problems = [], []
    for index, item in enumerate(raw):
        record = _record(item, root, f"{path} record {index}")
        if isinstance(record, Record):
            records.append(record)
        else:
            problems.append(f"record {index}: {record}")
    if raw and not records:
        raise UsageError(f"none of the {len(raw)} records in {path} is usable (first: {problems[0]})")
    if problems:
        log.warning("%s: skipped %d of %d records as malformed, e.g. %s", path, len(problems), len(raw),
                    problems[0])
    return records, len(problems)


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None  # counted as malformed with the other bad records


def _record(item, root: Path, where: str) -> Record | str:
    """The record, or why it is malformed."""
    if not isinstance(item, dict) or not item.get("conversations") or not isinstance(item["conversations"], list):
        return "not an object with a non-empty 'conversations' list"
    conversation: Conversation = []
    for turn in item["conversations"]:
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            return "a turn without a 'from' role and a 'value' text"
        if turn["from"] not in LLAVA_ROLES:
            raise UsageError(f"{where}: unknown role {turn['from']!r}; known roles: {', '.join(LLAVA_ROLES)}")
        conversation.append((LLAVA_ROLES[turn["from"]], turn["value"]))
    image = None if item.get("image") is None else root / str(item["image"])
    try:
        if image is not None and not image.is_file():
            return f"image file {image} is missing"
    except (OSError, ValueError):  # a name too long, a NUL byte
        return f"image {str(item['image'])[:80]!r} is not a usable file name"
    placeholders, images = sum(text.count(IMAGE_TOKEN) for _, text in conversation), int(image is not None)
    if placeholders != images:
        return f"{placeholders} {IMAGE_TOKEN} placeholder(s) for {images} image(s)"
    return Record(image, conversation)


# ------------------------------------------------------------------------------------------------ world data

CAPTION_REQUESTS = ("describe the image.", "what is in the picture?", "describe this picture briefly.",
                    "what do you see?")  # fmt: skip


def world_conversations(
    scene: Scene, rng: np.random.Generator, avoid: Iterable[str] = (), max_turns: int = 3, singles: bool = True,
    counts: int | None = None, kinds: Iterable[str] | None = None, wordings: str = "one",
) -> list[Conversation]:
    """Instruction data for one scene: a caption request, every question alone, and the questions again in
    multi-turn conversations of 2-3. The image comes first in the first user turn, as in LLaVA's data. Answers
    are questions()' one-word answers verbatim (VQA scores them by exact match); `avoid`: questions()' labels
    that 'no' questions must not mention (the held-out ones, in training). `max_turns`: the longest multi-turn
    conversation; `singles`: whether every question also comes alone (one answer per image pass); `counts`:
    at most this many of the scene's "how many" questions, drawn at random (None: all). They are a third of a
    scene's questions and the first kind learnt; the steps they free go to the slower kinds. `kinds`: only
    the questions of these kinds (question_kind), each alone, and nothing else (a focus phase). `wordings`:
    questions()' (one: each question's one form; varied: its training wordings)."""
    image = IMAGE_TOKEN + "\n"
    if kinds is not None:
        return [[("user", image + question), ("assistant", answer)]
                for question, answer in questions(scene, avoid=avoid, training=True, wordings=wordings)
                if question_kind(question) in kinds]  # fmt: skip
    texts = captions(scene)
    request = CAPTION_REQUESTS[rng.integers(len(CAPTION_REQUESTS))]
    out = [[("user", image + request), ("assistant", texts[rng.integers(len(texts))])]]
    pairs = questions(scene, avoid=avoid, training=True, wordings=wordings)
    tally = [i for i, (question, _) in enumerate(pairs) if question_kind(question) == "count"]
    if counts is not None and len(tally) > counts:
        dropped = set(rng.choice(tally, len(tally) - counts, replace=False).tolist())
        pairs = [pair for i, pair in enumerate(pairs) if i not in dropped]
    if singles:
        out += [[("user", image + question), ("assistant", answer)] for question, answer in pairs]
    order, start = rng.permutation(len(pairs)), 0
    while len(pairs) - start >= (2 if singles else 1):
        group = order[start : start + int(rng.integers(min(2, max_turns), max_turns + 1))]
        start += len(group)
        conversation: Conversation = []
        for k, i in enumerate(group):
            question, answer = pairs[i]
            conversation += [("user", (image if k == 0 else "") + question), ("assistant", answer)]
        out.append(conversation)
    return out


def world_text(
    scenes: Iterable[Scene], template: ChatTemplate, rng: np.random.Generator, avoid: Iterable[str] = (),
    counts: int | None = None, wordings: str = "one",
) -> list[str]:
    """The world's conversations rendered through the template, `<image>` placeholder included: text for
    tokenizer training and language-model pretraining."""
    avoid = list(avoid)
    return [template.render(c) for scene in scenes
            for c in world_conversations(scene, rng, avoid, counts=counts, wordings=wordings)]


def exact_match(prediction: str, answer: str) -> bool:
    """Equal after lower-casing, collapsing whitespace and stripping surrounding punctuation ("Red." is "red")."""
    return _normalise(prediction) == _normalise(answer)


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip(string.whitespace + string.punctuation).split())
