"""Property tests: arbitrary overrides and arbitrary data files raise only vlfm's own errors (VlfmError), or
FileNotFoundError for a missing path: never a TypeError, a KeyError or a decoder's exception."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlfm.config import load_config
from vlfm.data.chat import read_llava_json
from vlfm.data.sources import read_caption_file
from vlfm.io import VlfmError

KEYS = ["train.steps", "train.lr", "train.betas", "train.batch_size", "name", "task", "model", "model.vision.heads",
        "model.text.width", "data.world.held_out", "data.world.object_weights", "data.source", "data.stream",
        "train", "model.kind", "data.world.min_objects", "distributed.strategy"]  # fmt: skip
VALUES = st.one_of(st.text(max_size=30), st.sampled_from(["[", "{a: 1", "[1, 2]", "-1", "0", ".nan", "2024-13-45",
                                                          "!!python/none", "{1: 2, a: 3}", "[[1]]", "~", "''"]))  # fmt: skip
OVERRIDES = st.one_of(st.text(max_size=40), st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES))
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.lists(OVERRIDES, max_size=3))
def test_any_overrides_raise_only_vlfm_errors(overrides):
    try:
        load_config("configs/shapes-clip.yaml", overrides)
    except VlfmError:
        pass


def _read(reader, suffix: str, content: str | bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
        try:
            reader(path)
        except (VlfmError, FileNotFoundError):
            pass


ROWS = st.one_of(st.text(max_size=200), st.binary(max_size=100),
                 st.lists(st.text(max_size=20), max_size=4).map(lambda cells: "filepath,caption\n" + ",".join(cells)))  # fmt: skip


@FUZZ
@given(st.sampled_from([".csv", ".tsv", ".jsonl", ".txt"]), ROWS)
def test_any_caption_file_raises_only_vlfm_errors(suffix, content):
    _read(read_caption_file, suffix, content)


JSON_ISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                            st.sampled_from(["conversations", "from", "value", "image", "id"]), inner, max_size=3),
                        max_leaves=12)  # fmt: skip


@FUZZ
@given(st.sampled_from([".json", ".jsonl"]), st.one_of(st.text(max_size=200), st.binary(max_size=100),
                                                     JSON_ISH.map(json.dumps)))
def test_any_llava_file_raises_only_vlfm_errors(suffix, content):
    _read(read_llava_json, suffix, content)
