"""Malformed invocations of every subcommand: each row exits with its code and a one-line message, no traceback.

Rows are (argv, exit code, a piece of the message); `{run}` is the session's tiny trained run, `{idx}` a tiny
index built once for the module, `{tmp}` the module's folder with the broken files below."""

import shutil

import pytest

from vlfm.cli import main
from vlfm.data.draw import render
from vlfm.data.shapes import Obj, Scene

T, V = "configs/shapes-clip.yaml", "configs/shapes-vlm.yaml"


def train(*overrides, config=T):
    return ["train", config, *(part for o in overrides for part in ("-o", o))]


RANGE = "is out of range"
TRAIN = [
    (train("train.batch_size=0"), 2, "train.batch_size=0 is out of range: it must be >= 1"),
    (train("train.lr=-1"), 2, "train.lr=-1.0 is out of range: it must be >= 0"),
    (train("train.grad_accum=0"), 2, "train.grad_accum=0 " + RANGE),
    (train("model.vision.heads=0"), 2, "model.vision.heads=0 " + RANGE),
    (train("model.text.heads=0"), 2, "model.text.heads=0 " + RANGE),
    (train("model.vision.width=0"), 2, "model.vision.width=0 " + RANGE),
    (train("model.text.layers=0"), 2, "model.text.layers=0 " + RANGE),
    (train("model.text.width=130"), 2, "text.width 130 is not divisible by text.heads 4"),
    (train("train.steps=0"), 2, "train.steps=0 " + RANGE),
    (train("train.steps=-5"), 2, "train.steps=-5 " + RANGE),
    (train("train.save_every=-1"), 2, "train.save_every=-1 " + RANGE),
    (train("train.eval_every=-1"), 2, "train.eval_every=-1 " + RANGE),
    (train("train.log_every=0"), 2, "train.log_every=0 " + RANGE),
    (train("train.warmup_steps=-1"), 2, "train.warmup_steps=-1 " + RANGE),
    (train("train.weight_decay=-0.1"), 2, "train.weight_decay=-0.1 " + RANGE),
    (train("train.min_lr_ratio=1.5"), 2, "train.min_lr_ratio=1.5 is out of range: it must be in [0, 1]"),
    (train("train.betas=[0.9, 1.0]"), 2, "train.betas=1.0 is out of range: it must be in [0, 1)"),
    (train("train.betas=[0.9]"), 2, "train.betas must hold 2 values"),
    (train("train.eps=0"), 2, "train.eps=0.0 is out of range: it must be > 0"),
    (train("train.clip_grad=-1"), 2, "train.clip_grad=-1.0 " + RANGE),
    (train("train.lr=.nan"), 2, "train.lr=nan " + RANGE),
    (train("train.lr=.inf"), 2, "train.lr=inf " + RANGE),
    (train("train.seed=-1"), 2, "train.seed=-1 " + RANGE),
    (train("train.threads=-2"), 2, "train.threads=-2 " + RANGE),
    (train("train.loss_chunk=-1"), 2, "train.loss_chunk=-1 " + RANGE),
    (train("train.logit_lr_mult=-1"), 2, "train.logit_lr_mult=-1.0 " + RANGE),
    (train("data.train_size=0"), 2, "data.train_size=0 " + RANGE),
    (train("data.eval_size=-1"), 2, "data.eval_size=-1 " + RANGE),
    (train("data.workers=-1"), 2, "data.workers=-1 " + RANGE),
    (train("data.shuffle_buffer=-1"), 2, "data.shuffle_buffer=-1 " + RANGE),
    (train("data.world.image_size=16"), 2, "world.image_size=16 is too small"),
    (train("data.world.min_objects=0"), 2, "world needs 1 <= min_objects"),
    (train("data.world.colour_free_fraction=1.5"), 2, "world.colour_free_fraction=1.5 must be in [0, 1)"),
    (train("data.world.held_out=[1]"), 2, "data.world.held_out[0] must be str"),
    (train("data.world.object_weights=[1, .nan, 1]"), 2, "world.object_weights="),
    (train("model.embed_dim=0"), 2, "model.embed_dim=0 " + RANGE),
    (train("model.vision.patch_size=0"), 2, "model.vision.patch_size=0 " + RANGE),
    (train("model.vision.image_size=-64"), 2, "model.vision.image_size=-64 " + RANGE),
    (train("model.vision.mlp_ratio=0"), 2, "model.vision.mlp_ratio=0.0 " + RANGE),
    (train("model.text.vocab_size=0"), 2, "model.text.vocab_size=0 " + RANGE),
    (train("model.text.context_length=0"), 2, "model.text.context_length=0 " + RANGE),
    (train("model.max_logit_scale=-1"), 2, "model.max_logit_scale=-1.0 " + RANGE),
    (train("name=" + "x" * 5000), 2, "(5000 characters) must be a plain directory name"),
    (train("name=a/b"), 2, "name='a/b' (3 characters) must be a plain directory name"),
    (train("name=' '"), 2, "must be a plain directory name"),
    (train("train.steps=["), 2, "override 'train.steps=[' line 1, column 2: not valid YAML"),
    (train("train={a: 1"), 2, "not valid YAML"),
    (train("train.steps"), 2, "must look like key=value"),
    (train("train.stpes=3"), 2, "unknown config key 'train.stpes'"),
    (train("train.steps=lots"), 2, "train.steps must be int"),
    (train("task=foo"), 2, "task='foo' is not one of contrastive, vlm"),
    (["train", "{tmp}/bad.yaml"], 2, "bad.yaml line 4, column 5: not valid YAML"),
    (["train", "{tmp}/list.yaml"], 2, "must hold a YAML mapping"),
    (["train", "{tmp}/missing.yaml"], 2, "does not exist"),
    (train("stage2.batch_size=0", config=V), 2, "stage2.batch_size=0 " + RANGE),
    (train("stage1.lr=-1", config=V), 2, "stage1.lr=-1.0 " + RANGE),
    (train("stage2.lora_rank=-1", config=V), 2, "stage2.lora_rank=-1 " + RANGE),
    (train("model.lm.heads=0", config=V), 2, "model.lm.heads=0 " + RANGE),
    (train("model.lm.kv_heads=0", config=V), 2, "model.lm.kv_heads=0 " + RANGE),
    (train("data.max_length=0", config=V), 2, "data.max_length=0 " + RANGE),
    (train("data.eval_size=0", config=V), 2, "data.eval_size=0 " + RANGE),
    (train("model.shuffle_factor=0", config=V), 2, "model.shuffle_factor=0 " + RANGE),
    (["train", T, "--stage", "3"], 2, "argument --stage: invalid choice"),
    (["train"], 2, "the following arguments are required: config"),
]
MODELS = [
    (["eval", "{run}", "--retrieval-size", "0"], 2, "argument --retrieval-size: 0 is out of range: it must be >= 1"),
    (["eval", "{run}", "--classify-size", "-1"], 2, "argument --classify-size: -1 " + RANGE),
    (["eval", "{run}", "--vqa-size", "0"], 2, "argument --vqa-size: 0 " + RANGE),
    (["eval", "{run}", "--max-pixels", "0"], 2, "argument --max-pixels: 0 " + RANGE),
    (["eval", "{run}", "--ood-per-class", "-1"], 2, "argument --ood-per-class: -1 " + RANGE),
    (["eval", "{run}", "--retrieval-size", "abc"], 2, "'abc' is not an integer"),
    (["eval", "{run}", "--task", "nope"], 2, "argument --task: invalid choice"),
    (["eval", "{tmp}/nowhere"], 2, "does not exist"),
    (["classify", "{run}", "{img}", "--labels", ""], 2, "argument --labels: must not be empty or only whitespace"),
    (["classify", "{run}", "{img}", "--labels", "   "], 2, "argument --labels: must not be empty"),
    (["classify", "{run}", "{img}", "--labels", "a,,b"], 2, "holds an empty label"),
    (["classify", "{run}", "{img}", "--labels", "a, "], 2, "holds an empty label"),
    (["classify", "{run}", "{img}", "--labels", "a"], 2, "at least two"),
    (["classify", "{run}", "{img}", "--labels", "a,b", "--templates", "photo"], 2, "needs a {}"),
    (["classify", "{run}", "{tmp}/nope.png", "--labels", "a,b"], 2, "does not exist"),
    (["classify", "{run}", "{tmp}/text.png", "--labels", "a,b"], 2, "not a readable image"),
    (["classify", "{run}", "--labels", "a,b"], 2, "the following arguments are required: images"),
    (["embed", "{run}", "--texts", "{tmp}/t.txt", "--out", "{tmp}/x.npy", "--batch-size", "0"], 2, "argument --batch-size: 0 " + RANGE),
    (["embed", "{run}", "--texts", "{tmp}/t.txt", "--out", "{tmp}/x.npy", "--batch-size", "-3"], 2, "argument --batch-size: -3"),
    (["embed", "{run}", "--texts", "{tmp}/missing.txt", "--out", "{tmp}/x.npy"], 2, "does not exist"),
    (["embed", "{run}", "--texts", "{tmp}/blank.txt", "--out", "{tmp}/x.npy"], 2, "has no non-empty lines"),
    (["embed", "{run}", "--out", "{tmp}/x.npy"], 2, "one of the arguments --images --texts is required"),
    (["embed", "{run}", "--images", "{tmp}/empty", "--out", "{tmp}/x.npy"], 2, "holds no image files"),
    (["embed", "{run}", "--images", "{tmp}/nodir", "--out", "{tmp}/x.npy"], 2, "does not exist"),
    (["info", "{tmp}/nowhere"], 2, "does not exist"),
    (["info", "{tmp}/empty"], 2, "neither a checkpoint"),
    (["info"], 2, "the following arguments are required: checkpoint"),
    (["convert", "{run}", "{tmp}/out", "--to", "onnx"], 2, "argument --to: invalid choice"),
    (["convert", "{run}", "{tmp}/out"], 2, "the following arguments are required: --to"),
    (["convert", "{tmp}/nowhere", "{tmp}/out", "--to", "vlfm"], 2, "does not exist"),
]
DATA = [
    (["data", "shard", "--world", "0", "--out", "{tmp}/s"], 2, "argument --world: 0 " + RANGE),
    (["data", "shard", "--world", "10", "--image-size", "16", "--out", "{tmp}/s"], 2, "argument --image-size: 16 is out of range: it must be >= 32"),
    (["data", "shard", "--world", "10", "--maxcount", "0", "--out", "{tmp}/s"], 2, "argument --maxcount: 0 " + RANGE),
    (["data", "shard", "--world", "10", "--max-pixels", "0", "--out", "{tmp}/s"], 2, "argument --max-pixels: 0 " + RANGE),
    (["data", "shard", "--world", "x", "--out", "{tmp}/s"], 2, "'x' is not an integer"),
    (["data", "shard", "--out", "{tmp}/s"], 2, "give a SOURCE"),
    (["data", "shard", "{tmp}/t.txt", "--out", "{tmp}/s"], 2, "caption files must be .csv, .tsv or .jsonl"),
    (["data", "shard", "{tmp}/bad.jsonl", "--out", "{tmp}/s"], 2, "bad.jsonl line 2 is not valid JSON"),
    (["data", "shard", "{tmp}/nocol.csv", "--out", "{tmp}/s"], 2, "lacks column(s) caption"),
    (["data", "shard", "{tmp}/short.csv", "--out", "{tmp}/s"], 2, "row 1 has no filepath or caption value"),
    (["data", "shard", "{tmp}/binary.csv", "--out", "{tmp}/s"], 2, "is not UTF-8 text"),
    (["data"], 2, "the following arguments are required: shard"),
]
ADAPT = [
    (["adapt", "{run}", "--dataset", "shapes", "--out", "{tmp}/a", "--steps", "-1"], 2, "argument --steps: -1 " + RANGE),
    (["adapt", "{run}", "--dataset", "shapes", "--out", "{tmp}/a", "--steps", "0"], 2, "argument --steps: 0 " + RANGE),
    (["adapt", "{run}", "--dataset", "shapes", "--out", "{tmp}/a", "--lora-rank", "-2"], 2, "argument --lora-rank: -2 is out of range: it must be >= 0"),
    (["adapt", "{run}", "--dataset", "shapes", "--out", "{tmp}/a", "--lora-alpha", "0"], 2, "argument --lora-alpha: 0 " + RANGE),
    (["adapt", "{run}", "--dataset", "shapes", "--out", "{tmp}/a", "--max-pixels", "0"], 2, "argument --max-pixels: 0 " + RANGE),
    (["adapt", "{run}", "--dataset", "shapes", "--out", "{tmp}/a", "--batch-size", "0"], 2, "argument --batch-size: 0 " + RANGE),
    (["adapt", "{run}", "--dataset", "shapes", "--out", "{tmp}/a", "--lr", "-1"], 2, "argument --lr: -1 is out of range: it must be > 0"),
    (["adapt", "{run}", "--dataset", "shapes", "--out", "{tmp}/a", "--lr", "nan"], 2, "argument --lr: nan " + RANGE),
    (["adapt", "{run}", "--dataset", "shapes", "--out", "{tmp}/a", "--mix", "0,2"], 2, "argument --mix: 2 is out of range: it must be in [0, 1]"),
    (["adapt", "{run}", "--dataset", "shapes", "--out", "{tmp}/a", "--mix", "a"], 2, "argument --mix: 'a' is not a number"),
    (["adapt", "{run}", "--dataset", "shapes", "--out", "{tmp}/a", "--seed", "-1"], 2, "argument --seed: -1 " + RANGE),
    (["adapt", "{run}", "--dataset", "{tmp}/nodir", "--out", "{tmp}/a"], 2, "nodir"),
    (["adapt", "{run}", "--out", "{tmp}/a"], 2, "the following arguments are required: --dataset"),
]
SEARCH = [
    (["index", "build", "{run}", "--images", "{tmp}/images", "--out", "{tmp}/i", "--batch-size", "0"], 2, "argument --batch-size: 0 " + RANGE),
    (["index", "build", "{run}", "--images", "{tmp}/images", "--out", "{tmp}/i", "--hnsw-m", "0"], 2, "argument --hnsw-m: 0 " + RANGE),
    (["index", "build", "{run}", "--images", "{tmp}/images", "--out", "{tmp}/i", "--nlist", "0"], 2, "argument --nlist: 0 " + RANGE),
    (["index", "build", "{run}", "--images", "{tmp}/images", "--out", "{tmp}/i", "--pq-m", "-1"], 2, "argument --pq-m: -1 " + RANGE),
    (["index", "build", "{run}", "--images", "{tmp}/images", "--out", "{tmp}/i", "--kind", "lsh"], 2, "argument --kind: invalid choice"),
    (["index", "build", "{run}", "--out", "{tmp}/i"], 2, "one of the arguments --images --captions is required"),
    (["index", "build", "{run}", "--images", "{tmp}/empty", "--out", "{tmp}/i"], 2, "holds no image files"),
    (["index", "build", "{run}", "--captions", "{tmp}/nocol.csv", "--out", "{tmp}/i"], 2, "lacks column(s) caption"),
    (["index", "add", "{tmp}/nowhere", "--images", "{tmp}/images"], 2, "is not an index (no meta.sqlite)"),
    (["index", "add", "{tmp}/trunc_faiss", "--images", "{tmp}/images"], 2, "index.faiss is truncated or not a FAISS index"),
    (["index", "add", "{tmp}/garbage_sqlite", "--images", "{tmp}/images"], 2, "meta.sqlite is not a readable index database"),
    (["index", "add", "{idx}", "--images", "{tmp}/images", "--max-pixels", "-1"], 2, "argument --max-pixels: -1 " + RANGE),
    (["index"], 2, "the following arguments are required: build|add"),
    (["search", "{idx}", ""], 2, "argument text: must not be empty or only whitespace"),
    (["search", "{idx}", "   "], 2, "argument text: must not be empty"),
    (["search", "{idx}", "a red circle", "-k", "0"], 2, "argument -k: 0 is out of range: it must be >= 1"),
    (["search", "{idx}", "a red circle", "-k", "-1"], 2, "argument -k: -1 " + RANGE),
    (["search", "{idx}", "a red circle", "-k", "1.5"], 2, "argument -k: '1.5' is not an integer"),
    (["search", "{idx}"], 2, "give a text query or --image"),
    (["search", "{idx}", "a red circle", "--image", "{img}"], 2, "give a text query or --image"),
    (["search", "{idx}", "--image", "{tmp}/nope.png"], 2, "does not exist"),
    (["search", "{tmp}/nowhere", "a red circle"], 2, "is not an index (no meta.sqlite)"),
    (["search", "{tmp}/trunc_faiss", "a red circle"], 2, "trunc_faiss/index.faiss is truncated or not a FAISS index"),
    (["search", "{tmp}/garbage_faiss", "a red circle"], 2, "garbage_faiss/index.faiss is truncated or not a FAISS index"),
    (["search", "{tmp}/trunc_sqlite", "a red circle"], 2, "trunc_sqlite/meta.sqlite is not a readable index database"),
    (["search", "{tmp}/garbage_sqlite", "a red circle"], 2, "garbage_sqlite/meta.sqlite is not a readable index database"),
    (["search", "{tmp}/empty_sqlite", "a red circle"], 2, "empty_sqlite/meta.sqlite is not a readable index database"),
]
CHAT = [
    (["chat", "{run}", "--image", "{img}", "--max-new-tokens", "0"], 2, "argument --max-new-tokens: 0 " + RANGE),
    (["chat", "{run}", "--image", "{img}", "--temperature", "-1"], 2, "argument --temperature: -1 is out of range: it must be >= 0"),
    (["chat", "{run}", "--image", "{img}", "--temperature", "nan"], 2, "argument --temperature: nan " + RANGE),
    (["chat", "{run}", "--image", "{img}", "--top-p", "0"], 2, "argument --top-p: 0 is out of range: it must be in (0, 1]"),
    (["chat", "{run}", "--image", "{img}", "--top-p", "1.5"], 2, "argument --top-p: 1.5 " + RANGE),
    (["chat", "{run}", "--scene", "-1"], 2, "argument --scene: -1 " + RANGE),
    (["chat", "{run}", "--image", "{img}", "--prompt", " "], 2, "argument --prompt: must not be empty"),
    (["chat", "{run}", "--image", "{img}", "--seed", "-1"], 2, "argument --seed: -1 " + RANGE),
    (["chat", "{run}"], 2, "one of the arguments --image --scene is required"),
    (["chat", "{run}", "--image", "{img}", "--prompt", "hi"], 2, "chat needs a vision-language model"),
]
ROWS = TRAIN + MODELS + DATA + ADAPT + SEARCH + CHAT


def fill(text: str, places: dict[str, str]) -> str:
    for name, value in places.items():
        text = text.replace("{" + name + "}", value)
    return text


@pytest.fixture(scope="module")
def places(tmp_path_factory, trained_run):
    """The files the rows name: an image, broken inputs, and a tiny index with broken copies."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    (tmp / "images").mkdir()
    image = render(Scene((Obj("red", "circle", "big", 0.5, 0.5),), background=1), 32)
    image.save(tmp / "images" / "a.png")
    image.rotate(90).save(tmp / "images" / "b.png")
    (tmp / "empty").mkdir()
    (tmp / "text.png").write_text("hello")
    (tmp / "t.txt").write_text("a red circle\n")
    (tmp / "blank.txt").write_text("\n  \n")
    (tmp / "bad.yaml").write_text("name: x\ntrain:\n  steps: [1\n  lr: 2\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "bad.jsonl").write_text('{"filepath": "a.png", "caption": "x"}\n{"filepath": \n')
    (tmp / "nocol.csv").write_text("filepath,text\na.png,x\n")
    (tmp / "short.csv").write_text("filepath,caption\na.png\n")
    (tmp / "binary.csv").write_bytes(b"filepath,caption\n\xff\xfe,x\n")
    idx = tmp / "idx"
    assert main(["index", "build", str(trained_run), "--images", str(tmp / "images"), "--out", str(idx)]) == 0
    for name in ("trunc_faiss", "garbage_faiss", "trunc_sqlite", "garbage_sqlite", "empty_sqlite"):
        shutil.copytree(idx, tmp / name)
    faiss_bytes, sqlite_bytes = (idx / "index.faiss").read_bytes(), (idx / "meta.sqlite").read_bytes()
    (tmp / "trunc_faiss" / "index.faiss").write_bytes(faiss_bytes[: len(faiss_bytes) // 2])
    (tmp / "garbage_faiss" / "index.faiss").write_bytes(b"not a faiss index at all" * 10)
    (tmp / "trunc_sqlite" / "meta.sqlite").write_bytes(sqlite_bytes[:200])
    (tmp / "garbage_sqlite" / "meta.sqlite").write_bytes(b"garbage" * 100)
    (tmp / "empty_sqlite" / "meta.sqlite").write_bytes(b"")
    return {"run": str(trained_run), "tmp": str(tmp), "idx": str(idx), "img": str(tmp / "images" / "a.png")}


def test_the_table_covers_every_subcommand():
    assert len(ROWS) >= 90
    assert {argv[0] for argv, _, _ in ROWS} >= {"train", "eval", "classify", "embed", "info", "convert", "data", "adapt",
                                               "index", "search", "chat"}  # fmt: skip


@pytest.mark.parametrize("argv, code, message", ROWS, ids=[" ".join(argv)[:60] for argv, _, _ in ROWS])
def test_malformed_invocation(capsys, places, argv, code, message):
    capsys.readouterr()
    try:
        found = main([fill(part, places) for part in argv])
    except SystemExit as exit:  # argparse: usage, then one error line
        found = exit.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert found == code and lines and fill(message, places) in lines[-1], (found, err)
