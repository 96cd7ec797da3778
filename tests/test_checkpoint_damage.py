"""Verified checkpoints: every kind of damage to a checkpoint's files is one line naming the file (exit 2), never
a traceback and never silently NaN weights; resume falls back to the newest intact checkpoint; a full disk
leaves the previous checkpoint intact."""

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlfm
from vlfm.adapt.lora import add_lora, load_adapter, save_adapter
from vlfm.checkpoint import (
    latest_intact_checkpoint,
    load_training_checkpoint,
    make_room,
    prune_checkpoints,
    resolve,
    save_training_checkpoint,
    verify_checkpoint,
)
from vlfm.cli import main
from vlfm.config import LMConfig, ModelConfig, TextConfig, VisionConfig
from vlfm.interop.hf_lm import export_hf_lm
from vlfm.io import CheckpointError
from vlfm.models.lm import LanguageModel
from vlfm.models.two_tower import TwoTowerModel


# --- the damage ------------------------------------------------------------------------------------------
def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zeroed(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbled(path: Path) -> None:
    """The same size, a run of bytes in the middle replaced (valid JSON no more)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 12] = b'\xff"}{]garbled'
    path.write_bytes(bytes(data))


def header_byte_flipped(path: Path) -> None:
    """One byte of a safetensors header (its JSON) flipped: the file no longer parses."""
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF
    path.write_bytes(bytes(data))


def data_byte_flipped(path: Path) -> None:
    """One bit of the last tensor's bytes flipped: a finite value changes; only the sha256 tells."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def overwritten(path: Path) -> None:
    """A few KiB of tensor bytes overwritten (0xFF...: they read as NaN)."""
    data = bytearray(path.read_bytes())
    data[-5000:-1000] = b"\xff" * 4000
    path.write_bytes(bytes(data))


def extra_byte(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"x")


def unlisted(path: Path) -> None:
    """The manifest misses the file (written or replaced after the checkpoint)."""
    manifest = path.parent / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["files"][path.name]
    manifest.write_text(json.dumps(data))


def missing(path: Path) -> None:
    path.unlink()


# (file, damage): what loading a model directory meets; a flipped data byte is left to checksums (below).
MODEL_DAMAGE = [
    ("model.safetensors", truncated), ("model.safetensors", zeroed), ("model.safetensors", header_byte_flipped),
    ("model.safetensors", overwritten), ("model.safetensors", extra_byte), ("model.safetensors", empty),
    ("config.json", truncated), ("config.json", garbled), ("config.json", empty),
    ("tokenizer.json", truncated), ("tokenizer.json", garbled), ("tokenizer.json", empty),
    ("preprocess.json", truncated), ("preprocess.json", garbled), ("preprocess.json", empty),
    ("tokenizer_config.json", garbled),
]  # fmt: skip
# What only the manifest can tell.
MANIFEST_DAMAGE = [("model.safetensors", unlisted), ("preprocess.json", missing), ("config.json", extra_byte)]
# What resume meets in the newest training checkpoint.
RESUME_DAMAGE = [
    ("model.safetensors", truncated), ("model.safetensors", zeroed), ("model.safetensors", data_byte_flipped),
    ("model.safetensors", overwritten), ("model.safetensors", extra_byte),
    ("optimizer.safetensors", truncated), ("optimizer.safetensors", zeroed),
    ("optimizer.safetensors", data_byte_flipped), ("optimizer.safetensors", overwritten),
    ("optimizer.safetensors", header_byte_flipped),
    ("train_state.json", truncated), ("train_state.json", garbled), ("train_state.json", empty),
    ("train_state.json", missing), ("config.json", garbled), ("tokenizer.json", truncated),
    ("preprocess.json", empty), ("optimizer.safetensors", unlisted),
]  # fmt: skip


def ids(cases):
    return [f"{name}-{damage.__name__}" for name, damage in cases]


# --- loading: vlfm info / eval / classify ----------------------------------------------------------------
@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def commands(directory: Path, tmp_path: Path, image: Path) -> dict[str, list[str]]:
    return {
        "info": ["info", str(directory)],
        "eval": ["eval", str(directory), "--csv", str(tmp_path / "eval.csv"), "--classify-size", "4",
                 "--retrieval-size", "8", "--out", str(tmp_path / "eval.json")],
        "classify": ["classify", str(directory), str(image), "--labels", "a red circle,a blue square"],
    }  # fmt: skip


def assert_one_line(capsys, code: int, command: str, name: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"vlfm {command}: error:")]
    assert len(errors) == 1 and name in errors[0], err


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize(("name", "damage"), MODEL_DAMAGE, ids=ids(MODEL_DAMAGE))
def test_damaged_model_is_one_line_for_every_command(trained_run, tmp_path, image, capsys, name, damage, manifest):
    directory = shutil.copytree(trained_run / "model", tmp_path / "model")
    if not manifest:  # a checkpoint saved before manifests: each file's own reader must name the damage
        (directory / "manifest.json").unlink()
    damage(directory / name)
    for command, argv in commands(directory, tmp_path, image).items():
        assert_one_line(capsys, main(argv), command, name)
    assert not (tmp_path / "eval.json").exists()  # nothing scored with damaged weights


@pytest.mark.parametrize(("name", "damage"), MANIFEST_DAMAGE, ids=ids(MANIFEST_DAMAGE))
def test_manifest_tells_what_the_files_cannot(trained_run, tmp_path, image, capsys, name, damage):
    directory = shutil.copytree(trained_run / "model", tmp_path / "model")
    damage(directory / name)
    for command, argv in commands(directory, tmp_path, image).items():
        assert_one_line(capsys, main(argv), command, name)


def test_intact_model_loads_and_an_eval_json_beside_it_is_no_damage(trained_run, tmp_path, image, capsys):
    directory = shutil.copytree(trained_run / "model", tmp_path / "model")
    (directory / "eval.json").write_text("{}")  # `vlfm eval` writes beside the checkpoint
    assert main(["info", str(directory)]) == 0
    assert main(["classify", str(directory), str(image), "--labels", "a red circle,a blue square"]) == 0
    assert main(["verify", str(directory)]) == 0


def test_nan_weights_are_refused_by_name(trained_run, tmp_path):
    model = vlfm.load(trained_run)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["visual.pos_embed"][0, 0, 0] = float("nan")
    model.save(tmp_path / "nan", state)  # a manifest that matches: only the finite check can tell
    with pytest.raises(CheckpointError, match="model.safetensors: tensor 'visual.pos_embed' holds NaN"):
        vlfm.load(tmp_path / "nan")


# --- vlfm verify -----------------------------------------------------------------------------------------
def test_verify_intact_run_and_old_checkpoint(trained_run, capsys):
    assert main(["verify", str(trained_run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all("intact (sizes and sha256 match manifest.json" in line for line in out)
    assert main(["verify", str(Path(__file__).parent / "data" / "checkpoint-v1")]) == 0
    assert "no manifest.json" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "damage"), [("model.safetensors", data_byte_flipped), ("config.json", garbled),
                                              ("optimizer.safetensors", overwritten), ("train_state.json", empty)])
def test_verify_names_each_damaged_file(trained_run, tmp_path, capsys, name, damage):
    run = shutil.copytree(trained_run, tmp_path / "run")
    damage(run / "checkpoints" / "step_00000006" / name)
    assert main(["verify", str(run)]) == 2
    out = capsys.readouterr().out.splitlines()
    bad = [line for line in out if "intact" not in line]
    assert len(bad) == 1 and f"step_00000006/{name}" in bad[0]
    assert sum("intact" in line for line in out) == 2  # model/ and step_00000003


def test_verify_lists_every_non_finite_tensor(trained_run, tmp_path, capsys):
    model = vlfm.load(trained_run)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["logit_scale"].fill_(float("inf"))
    state["visual.pos_embed"][0, 0, 0] = float("nan")
    model.save(tmp_path / "bad", state)
    assert main(["verify", str(tmp_path / "bad")]) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "'logit_scale'" in out[0] and "'visual.pos_embed'" in out[1]


def verify_lines(capsys, directory, code):
    assert main(["verify", str(directory)]) == code
    return capsys.readouterr().out.splitlines()


def test_hf_exports_and_lora_adapters_carry_a_manifest_verify_checks(trained_run, tmp_path, capsys):
    """`vlfm convert --to hf` (two towers and an LM) and a saved LoRA adapter are checked like vlfm checkpoints."""
    vision = VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, patch_bias=False,
                          class_token=True, pre_norm=True, pool="cls")  # what HF CLIP expresses
    text = TextConfig(vocab_size=60, context_length=12, width=32, layers=1, heads=2, eos_token_id=59)
    TwoTowerModel(ModelConfig(embed_dim=16, vision=vision, text=text)).save(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "clip"), "--to", "hf"]) == 0
    capsys.readouterr()
    export_hf_lm(LanguageModel(LMConfig(vocab_size=64, width=32, layers=1, heads=2, kv_heads=2, mlp_width=48)), tmp_path / "lm")
    module = vlfm.load(trained_run).visual
    add_lora(module, 2, 4, ["q_proj", "v_proj"])
    save_adapter(module, tmp_path / "adapter")
    for name, file in (("clip", "model.safetensors"), ("lm", "config.json"), ("adapter", "adapter.safetensors")):
        out = verify_lines(capsys, tmp_path / name, 0)
        assert len(out) == 1 and "intact (sizes and sha256 match manifest.json" in out[0], out
        truncated(tmp_path / name / file)
        out = verify_lines(capsys, tmp_path / name, 2)
        assert len(out) == 1 and f"{name}/{file}:" in out[0] and "(truncated)" in out[0], out
    with pytest.raises(CheckpointError, match=r"clip/model\.safetensors: \d+ bytes .*\(truncated\)"):
        vlfm.load(tmp_path / "clip")
    with pytest.raises(CheckpointError, match=r"adapter/adapter\.safetensors: \d+ bytes .*\(truncated\)"):
        load_adapter(vlfm.load(trained_run).visual, tmp_path / "adapter")


# --- resume ----------------------------------------------------------------------------------------------
def training_run(trained_run, run: Path, steps: int = 2):
    """A run directory with checkpoints step_1 .. step_N of the trained model and an AdamW with state."""
    model = vlfm.load(trained_run).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        sum(p.square().sum() for p in model.parameters()).backward()
        optimizer.step()
        save_training_checkpoint(model, run / "checkpoints" / f"step_{step:08d}", optimizer,
                                 {"step": step, "history": {"train": [], "eval": []}})  # fmt: skip
    return model, optimizer


@pytest.mark.parametrize(("name", "damage"), RESUME_DAMAGE, ids=ids(RESUME_DAMAGE))
def test_resume_skips_a_damaged_checkpoint(trained_run, tmp_path, caplog, name, damage):
    model, optimizer = training_run(trained_run, tmp_path)
    newest = tmp_path / "checkpoints" / "step_00000002"
    damage(newest / name)
    with caplog.at_level(logging.WARNING, logger="vlfm"):
        found = latest_intact_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoints" / "step_00000001"
    assert any("step_00000002" in r.message and name in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match=name):
        load_training_checkpoint(model, newest, optimizer)
    state = load_training_checkpoint(model, found, optimizer)
    assert state["step"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(t).all() for s in optimizer.state.values() for t in s.values())


@pytest.mark.parametrize("damage", [truncated, data_byte_flipped])
def test_a_run_without_model_resolves_to_its_newest_intact_checkpoint(trained_run, tmp_path, caplog, damage):
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("model"))
    damage(run / "checkpoints" / "step_00000006" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="vlfm"):
        assert resolve(run) == run / "checkpoints" / "step_00000003"
    skipped = [r.message for r in caplog.records if "skipping checkpoint step_00000006" in r.message]
    assert len(skipped) == 1 and "step_00000006/model.safetensors" in skipped[0]
    loaded, older = vlfm.load(run), vlfm.load(run / "checkpoints" / "step_00000003")
    assert all(torch.equal(v, older.state_dict()[k]) for k, v in loaded.state_dict().items())
    damage(run / "checkpoints" / "step_00000003" / "model.safetensors")
    with pytest.raises(CheckpointError, match="every training checkpoint of .* is damaged"):
        resolve(run)


def test_resume_without_manifest_still_refuses_nan(trained_run, tmp_path):
    """A checkpoint saved before manifests: overwritten optimizer bytes are refused by the finite check."""
    model, optimizer = training_run(trained_run, tmp_path, steps=1)
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    (checkpoint / "manifest.json").unlink()
    assert latest_intact_checkpoint(tmp_path) == checkpoint
    overwritten(checkpoint / "optimizer.safetensors")
    assert latest_intact_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="optimizer.safetensors: tensor .* holds NaN"):
        load_training_checkpoint(model, checkpoint, optimizer)


def test_the_trained_runs_checkpoints_are_intact(trained_run):
    assert latest_intact_checkpoint(trained_run) == trained_run / "checkpoints" / "step_00000006"
    assert verify_checkpoint(trained_run / "checkpoints" / "step_00000003") == []


# --- a full disk -----------------------------------------------------------------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_training_checkpoint(trained_run, tmp_path, monkeypatch):
    model, optimizer = training_run(trained_run, tmp_path, steps=1)
    monkeypatch.setattr("vlfm.checkpoint.save_file", no_space)
    with pytest.raises(CheckpointError) as error:
        save_training_checkpoint(model, tmp_path / "checkpoints" / "step_00000002", optimizer, {"step": 2, "history": {}})
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message and "MiB free" in message
    assert "the previous checkpoint step_00000001 is intact" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]  # no temporary left
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_00000001") == []


def test_disk_full_saving_a_model_is_one_line(trained_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "copy"
    vlfm.load(trained_run).save(out)
    monkeypatch.setattr("vlfm.models.base.save_file", no_space)
    assert main(["convert", str(trained_run), str(out), "--to", "vlfm"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err and "already there is intact" in err
    assert verify_checkpoint(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_prune_never_removes_the_protected_checkpoint(trained_run, tmp_path):
    training_run(trained_run, tmp_path, steps=3)
    root = tmp_path / "checkpoints"
    (root / ".step_00000004.tmp").mkdir()  # what a save killed half-way leaves
    removed = prune_checkpoints(root, keep=1, protect=root / "step_00000001")
    assert sorted(p.name for p in removed) == [".step_00000004.tmp", "step_00000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000003"]


def test_make_room_prunes_all_but_the_last_intact_when_space_is_short(trained_run, tmp_path, monkeypatch):
    model, optimizer = training_run(trained_run, tmp_path, steps=3)
    root = tmp_path / "checkpoints"
    needed = make_room(root, model, optimizer, protect=root / "step_00000002")
    assert needed > (root / "step_00000001" / "model.safetensors").stat().st_size
    assert len(list(root.iterdir())) == 3  # enough space: nothing removed
    monkeypatch.setattr("vlfm.checkpoint.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, needed - 1))
    make_room(root, model, optimizer, protect=root / "step_00000002")
    assert [p.name for p in root.iterdir()] == ["step_00000002"]
