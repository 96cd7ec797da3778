"""A VLM stage's training sequences and its data phases, built from a data section (duck-typed: the layers
keep config above data) and the model's text side, passed in as an `Encoder`.

The stage's own data is the built-in world (`source: shapes`, rendered here) or a LLaVA JSON file. A phase
serves its own rows in a window of steps (`mix` of each batch; the rest from the stage's own data): another
source, or the stage's source filtered: `objects` (the world only: scenes of exactly N objects, rendered for the
phase) and `kinds` (only questions of those kinds, each alone, as world_text.question_kind names them). The
phases' rows come first in `Examples`, in phase order, the stage's own rows after them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

import numpy as np
import torch

from vlfm.data.chat import (
    CAPTION_REQUESTS,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    ChatTemplate,
    Conversation,
    encode_conversation,
    expand_image_tokens,
    read_llava_json,
    world_conversations,
    world_text,
)
from vlfm.data.draw import render_many
from vlfm.data.shapes import ShapesWorld, WorldConfig
from vlfm.data.tokenizer import Tokenizer
from vlfm.data.transforms import Preprocess, to_uint8_tensor
from vlfm.data.world_text import captions, question_kind
from vlfm.io import MAX_PIXELS, ConfigError, decode_image

log = logging.getLogger("vlfm")
Pairs = list[tuple[int, Conversation]]  # (image row or -1, conversation)


class Phase(NamedTuple):
    """Steps [start, end) draw `mix` of each batch from `rows` of `Examples`, the rest from its main rows."""

    start: int
    end: int
    rows: range
    mix: float


@dataclasses.dataclass
class Examples:
    """Token sequences (labels -100 where no loss is taken) and, per sequence, its image row (-1: none)."""

    ids: list[list[int]]
    labels: list[list[int]]
    image: list[int]
    pixels: torch.Tensor  # uint8 (N, 3, H, W)
    skipped: int = 0
    phases: list[Phase] = dataclasses.field(default_factory=list)
    main: range = range(0)  # the rows of the stage's own data (after the phases' rows)


@dataclasses.dataclass
class Encoder:
    """The model's text side: a conversation to ids and labels, each image placeholder expanded to
    `image_tokens` positions."""

    tokenizer: Tokenizer
    template: ChatTemplate
    image_token_id: int
    image_tokens: int

    def __call__(self, conversation: Conversation, image: int) -> tuple[list[int], list[int]]:
        ids, labels = encode_conversation(conversation, self.tokenizer, self.template)
        return expand_image_tokens(ids, labels, self.image_token_id, self.image_tokens, int(image >= 0))


def phase_windows(phases) -> list[tuple[int, int]]:
    """[start, end) steps of each phase: `start` null is right after the previous phase (the first: step 0)."""
    out, step = [], 0
    for phase in phases:
        start = step if phase.start is None else phase.start
        step = start + phase.steps
        out.append((start, step))
    return out


def world_scenes(world: WorldConfig, n: int, split: str = "train") -> list:
    shapes = ShapesWorld(world)
    return [shapes.scene(split, i) for i in range(n)]


def text_scenes(data, n: int) -> tuple[list, list[str]]:
    """The first `n` scenes whose conversations are text alone (the tokenizer's, stage 0's, stage 2's replay) and
    the labels their 'no' questions avoid. With data.text_all_pairs they take every colour+shape pair, the
    held-out ones too: no image is drawn of them, as an LM pretrained on text knows words the images never show."""
    if data.text_all_pairs:
        return world_scenes(dataclasses.replace(data.world, held_out=[]), n), []
    return world_scenes(data.world, n), list(data.world.held_out)


def replay_pairs(data, rng: np.random.Generator) -> Pairs:
    """Stage 2's text replay: the conversations of data.text_replay x train_size text scenes without their image
    (LLaVA mixes text-only conversations into its instruction data), so the LM keeps what the text taught it."""
    scenes, avoid = text_scenes(data, round(data.text_replay * data.train_size))
    return [(-1, [(role, text.replace(IMAGE_TOKEN + "\n", "")) for role, text in conversation])
            for scene in scenes
            for conversation in world_conversations(scene, rng, avoid, data.max_turns, data.single_questions,
                                                    data.count_questions, None, data.wordings)]  # fmt: skip


def render_world(world: WorldConfig, n: int, workers: int) -> tuple[torch.Tensor, list]:
    """uint8 [n, 3, H, W] pixels of the world's first `n` training scenes, and the scenes."""
    images, scenes = render_many(ShapesWorld(world), "train", n, workers=workers)
    return torch.from_numpy(images), scenes


def stage_examples(stage: int, data, phases: list, seed: int, encoder: Encoder, preprocess: Preprocess) -> Examples:
    """The stage's sequences: stage 0 the world's text, stages 1-2 (image row, conversation) pairs of
    `data.source` (stage 1 captions, stage 2 instructions), each phase's rows first."""
    rng = np.random.default_rng([seed, stage])
    if stage == 0:
        return text_examples(data, rng, encoder)
    pixels, pairs, scenes = source_pairs(data.source, stage, data, rng, preprocess)
    parts = []
    for phase in phases:
        more_pixels, more = phase_pairs(phase, stage, data, rng, preprocess, (pairs, scenes))
        if more_pixels is not None and len(more_pixels):
            more = [(i + len(pixels) if i >= 0 else -1, c) for i, c in more]
            pixels = torch.cat([pixels, more_pixels]) if len(pixels) else more_pixels
        parts.append(more)
    if stage == 2 and data.text_replay:  # the world only (config checks); drawn last: the other rows stay as they were
        pairs = pairs + replay_pairs(data, rng)
    out = encode_parts(parts + [pairs], pixels, encoder, data.max_length)
    windows = phase_windows(phases)
    out.phases = [Phase(start, end, rows, phase.mix) for (start, end), rows, phase in zip(windows, out.phases, phases)]
    if out.skipped:
        log.info("stage %d: %d sequences longer than data.max_length=%d skipped", stage, out.skipped, data.max_length)
    if not out.main:
        raise ConfigError(f"stage {stage} has no training sequences (data.source={data.source})")
    for i, (phase, built) in enumerate(zip(phases, out.phases)):
        if not built.rows:
            raise ConfigError(f"stage{stage}.phases[{i}] has no training sequences: source={phase.source or data.source}"
                              f", objects={phase.objects}, kinds={phase.kinds} ask no such question (data.world: "
                              f"{data.world.min_objects}-{data.world.max_objects} objects)")
    return out


def text_examples(data, rng: np.random.Generator, encoder: Encoder) -> Examples:
    """Stage 0, text only: every token is a target, except the image placeholder (no image to predict)."""
    scenes, avoid = text_scenes(data, data.text_size)
    texts = world_text(scenes, encoder.template, rng, avoid, data.count_questions, data.wordings)
    ids = [encoder.tokenizer.encode(t)[: data.max_length] for t in texts]
    labels = [[IGNORE_INDEX if i == encoder.image_token_id else i for i in row] for row in ids]
    return Examples(ids, labels, [-1] * len(ids), torch.empty(0, 3, 1, 1, dtype=torch.uint8), main=range(len(ids)))


def encode_parts(parts: list[Pairs], pixels: torch.Tensor, encoder: Encoder, max_length: int) -> Examples:
    """The parts' pairs encoded one part after the other; `phases` holds each part's rows but the last's
    (`main`). Sequences longer than max_length are skipped and counted."""
    out, ranges = Examples([], [], [], pixels), []
    for pairs in parts:
        first = len(out.ids)
        for image, conversation in pairs:
            ids, labels = encoder(conversation, image)
            if len(ids) > max_length:
                out.skipped += 1
                continue
            out.ids.append(ids), out.labels.append(labels), out.image.append(image)
        ranges.append(range(first, len(out.ids)))
    out.phases, out.main = ranges[:-1], ranges[-1]
    return out


def source_pairs(source: str, stage: int, data, rng: np.random.Generator, preprocess: Preprocess,
                 image_root: str | None = None):  # fmt: skip
    """Pixels, (image row, conversation) pairs and the world's scenes (None for a LLaVA file) of a source."""
    if source == "shapes":
        pixels, scenes = render_world(data.world, data.train_size, data.workers)
        return pixels, scene_pairs(scenes, stage, rng, data), scenes
    pixels, pairs = llava_pairs(source, image_root if source != data.source else data.image_root, preprocess,
                                data.max_pixels)  # fmt: skip
    return pixels, pairs, None


def phase_pairs(phase, stage: int, data, rng: np.random.Generator, preprocess: Preprocess, main: tuple):
    """A phase's new pixels (None: it uses the stage's own rows) and its pairs. On the world: scenes of
    `objects` objects rendered for it, or the first half of the stage's scenes."""
    source, (main_pairs, scenes) = phase.source or data.source, main
    if source == "shapes":
        half = max(1, data.train_size // 2)
        if phase.objects is not None:
            world = dataclasses.replace(data.world, min_objects=phase.objects, max_objects=phase.objects,
                                        object_weights=None)  # fmt: skip
            pixels, scenes = render_world(world, half, data.workers)
        elif scenes is None:  # the stage's own data is a file
            pixels, scenes = render_world(data.world, half, data.workers)
        else:  # rows of the stage's render: nothing rendered twice
            pixels, scenes = None, scenes[:half]
        return pixels, scene_pairs(scenes, stage, rng, data, phase.kinds)
    if source == data.source:
        pixels, pairs = None, main_pairs
    else:
        pixels, pairs, _ = source_pairs(source, stage, data, rng, preprocess)
    return pixels, (pairs if phase.kinds is None else kind_pairs(pairs, phase.kinds))


def scene_pairs(scenes: list, stage: int, rng: np.random.Generator, data, kinds: list[str] | None = None) -> Pairs:
    """(image row, conversation) pairs of rendered scenes: stage 1 every caption under a random request, stage 2
    the instruction conversations (`kinds`: only those questions, each alone)."""
    if stage == 1:
        return [(i, [("user", f"{IMAGE_TOKEN}\n{CAPTION_REQUESTS[rng.integers(len(CAPTION_REQUESTS))]}"),
                     ("assistant", text)]) for i, scene in enumerate(scenes) for text in captions(scene)]  # fmt: skip
    return [(i, c) for i, scene in enumerate(scenes)
            for c in world_conversations(scene, rng, data.world.held_out, data.max_turns, data.single_questions,
                                         data.count_questions, kinds, data.wordings)]  # fmt: skip


def kind_pairs(pairs: Pairs, kinds: list[str]) -> Pairs:
    """The (question, answer) turns whose question (question_kind of the user turn, lower-cased, without the
    image placeholder) is of `kinds`, each as a conversation of its own with the record's image."""
    out = []
    for row, conversation in pairs:
        for (role, text), (next_role, answer) in zip(conversation, conversation[1:]):
            question = text.replace(IMAGE_TOKEN, "").strip()
            if role == "user" and next_role == "assistant" and question_kind(question.lower()) in kinds:
                out.append((row, [("user", f"{IMAGE_TOKEN}\n{question}" if row >= 0 else question),
                                  ("assistant", answer)]))  # fmt: skip
    return out


def llava_pairs(path: str, image_root: str | None, preprocess: Preprocess,
                max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, Pairs]:  # fmt: skip
    """(image row, conversation) pairs from a LLaVA JSON file; images that are undecodable or over `max_pixels`
    are skipped and counted."""
    try:
        records, skipped = read_llava_json(path, image_root)
    except (ValueError, FileNotFoundError) as error:  # an unknown role, a file that is not JSON, no records
        raise ConfigError(f"data.source={path}: {error}") from None
    images, pairs, rows = [], [], {}
    for record in records:
        row = -1
        if record.image is not None:
            if record.image not in rows:
                image = decode_image(record.image, max_pixels, preprocess.image_size)
                if image is None:
                    skipped += 1
                    continue
                rows[record.image] = len(images)
                images.append(preprocess.resize_crop(image))
            row = rows[record.image]
        pairs.append((row, record.conversation))
    log.info("%s: %d conversations, %d images, %d records skipped", path, len(pairs), len(images), skipped)
    pixels = to_uint8_tensor(images) if images else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return pixels, pairs
