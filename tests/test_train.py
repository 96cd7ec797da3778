import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY, tiny_config
from vlfm.config import TrainConfig
from vlfm.train import RunExistsError, run
from vlfm.train.loop import lr_factor


def test_run_directory_contents(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"model", "checkpoints", "metrics.jsonl", "eval.json", "config.yaml", "curves.png", "similarity.png", "train.log"} <= names
    metrics = json.loads((trained_run / "eval.json").read_text())
    for key in ("zeroshot_top1", "zeroshot_top5", "t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "t2i_r1_strict"):
        assert 0.0 <= metrics[key] <= 1.0
    lines = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6]
    # a checkpoint every 3 steps, the last two kept, each complete
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]


def test_training_reduces_the_loss(tmp_path):
    config = tiny_config(tmp_path, "train.steps=100", "train.lr=3e-3", "train.save_every=0", "data.eval_size=0",
                         "data.classify_size=0")
    run(config)
    losses = [json.loads(line)["loss"] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 50 and sum(losses[-5:]) / 5 < 0.85 * losses[0]


def test_existing_run_is_not_overwritten(trained_run):
    from vlfm.config import load_config

    config = load_config(None, TINY + [f"output_dir={trained_run.parent}", f"name={trained_run.name}"])
    with pytest.raises(RunExistsError, match="--resume"):
        run(config)


def test_lr_schedule():
    config = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1) and lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.55) and lr_factor(110, config) == pytest.approx(0.1)


def vlfm_train(tmp_path, name, *extra):
    args = [sys.executable, "-m", "vlfm.cli", "train", str(tmp_path / "empty.yaml")]
    for o in TINY + [f"output_dir={tmp_path}", f"name={name}", "train.steps=40", "train.save_every=5",
                     "data.eval_size=0", "data.classify_size=0", *extra]:
        args += ["-o", o]
    return args


def test_sigkill_and_resume_gives_identical_weights(tmp_path):
    (tmp_path / "empty.yaml").write_text("{}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(vlfm_train(tmp_path, "straight"), check=True, capture_output=True, env=env)

    process = subprocess.Popen(vlfm_train(tmp_path, "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step_00000010" / "train_state.json"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert not (tmp_path / "killed" / "model").exists()

    subprocess.run(vlfm_train(tmp_path, "killed") + ["--resume"], check=True, capture_output=True, env=env)
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = {name: [json.loads(line)["step"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("straight", "killed")}  # fmt: skip
    assert steps["killed"] == steps["straight"] and steps["killed"][-1] == 40  # re-run steps are not logged twice


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    from vlfm.cli import main

    args = ["train", "configs/shapes-clip.yaml", *[f"-o{o}" for o in TINY], "-o", f"output_dir={tmp_path}", "-o",
            "name=nan", "-o", "train.steps=40", "-o", "train.save_every=2", "-o", "train.warmup_steps=0"]  # fmt: skip
    assert main(args + ["-o", "train.lr=0.01", "-o", "train.steps=2"]) == 0  # two good steps and a checkpoint
    good = load_file(str(tmp_path / "nan" / "checkpoints" / "step_00000002" / "model.safetensors"))
    capsys.readouterr()
    assert main(args + ["-o", "train.lr=1e6", "--resume"]) == 3
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # the rest is the progress bar
    assert len(errors) == 1 and "training diverged" in errors[0] and "non-finite loss" in errors[0], err
    assert "Traceback" not in err
    checkpoints = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    for name in checkpoints:  # whatever was saved is finite, and the step-2 checkpoint is still there
        state = load_file(str(tmp_path / "nan" / "checkpoints" / name / "model.safetensors"))
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()), name
    assert "step_00000002" in checkpoints or len(checkpoints) == 2
    again = load_file(str(tmp_path / "nan" / "checkpoints" / checkpoints[0] / "model.safetensors"))
    assert again.keys() == good.keys()
    final = load_file(str(tmp_path / "nan" / "model" / "model.safetensors"))  # the first run's: not overwritten
    assert all(torch.equal(final[k], good[k]) for k in good)


def test_training_from_a_caption_file_counts_corrupt_images(tmp_path):
    for i in range(40):
        Image.new("RGB", (36, 36), ((i * 37) % 255, (i * 91) % 255, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    rows = "".join(f"{i}.png,colour number {i}\n" for i in range(40))
    (tmp_path / "c.csv").write_text("filepath,caption\n" + rows + "bad.jpg,broken\n")
    config = tiny_config(tmp_path, f"data.source={tmp_path / 'c.csv'}", "train.steps=2", "model.text.vocab_size=400")
    run(config)
    assert "skipped 1 of 41 images" in (config.run_dir / "train.log").read_text()
    assert (config.run_dir / "model" / "model.safetensors").is_file()


def test_bf16_autocast_trains_on_cpu(tmp_path):
    config = tiny_config(tmp_path, "train.precision=bf16", "train.steps=3", "data.eval_size=0", "data.classify_size=0")
    run(config)
    losses = [json.loads(line)["loss"] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < loss < 20 for loss in losses)


def test_fp16_without_gpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        run(tiny_config(tmp_path, "train.precision=fp16", "train.steps=1"))


def test_augmented_batches_are_deterministic_crops(tmp_path):
    from vlfm.train.contrastive import ContrastiveTask

    plain = ContrastiveTask(tiny_config(tmp_path, "data.eval_size=0", "data.classify_size=0"), torch.device("cpu"))
    augmented = ContrastiveTask(tiny_config(tmp_path, "data.augment=true", "data.eval_size=0", "data.classify_size=0"),
                                torch.device("cpu"))
    a, b = augmented.batch(3, 0), augmented.batch(3, 0)
    assert torch.equal(a["images"], b["images"]) and a["images"].shape == (32, 3, 32, 32)
    p = plain.batch(3, 0)
    assert torch.equal(p["input_ids"], a["input_ids"])  # same samples and captions, only the pixels differ
    assert not torch.equal(p["images"], a["images"])


@pytest.mark.parametrize("pool", ["end", "last"])
def test_training_text_is_the_text_inference_sees(tmp_path, pool):
    """A tower pooled at the end reads the padding: training batches keep the whole context, so a caption's
    training features equal model.embed_texts'; other poolings trim the shared padding and still equal them."""
    from vlfm.train.contrastive import ContrastiveTask

    task = ContrastiveTask(tiny_config(tmp_path, "model.kind=siglip", "model.text.causal=false", f"model.text.pool={pool}",
                                       "data.eval_size=0", "data.classify_size=0"), torch.device("cpu"))
    task.model.eval()
    batch = task.batch(0, 0)
    context = task.config.model.text.context_length
    assert (batch["input_ids"].shape[1] == context) == (pool == "end")
    with torch.no_grad():
        trained = torch.nn.functional.normalize(task.model.encode_text(batch["input_ids"], batch["attention_mask"]), dim=-1)
    ids, mask = task.caption_ids[batch["caption"]], task.caption_mask[batch["caption"]]  # as model.embed_texts pads
    with torch.no_grad():
        full = torch.nn.functional.normalize(task.model.encode_text(ids, mask), dim=-1)
    torch.testing.assert_close(trained, full, atol=1e-5, rtol=0)


def test_training_state_records_the_data_position(trained_run):
    state = json.loads((trained_run / "checkpoints" / "step_00000006" / "train_state.json").read_text())
    assert state["step"] == 6 and state["samples_seen"] == 6 * 32
    assert len(state["torch_rng"]) > 100 and state["optimizer_param_groups"][0]["betas"] == [0.9, 0.98]


def test_resume_skips_a_damaged_checkpoint_and_goes_on_from_the_newest_intact_one(tmp_path, caplog):
    config = tiny_config(tmp_path, "data.eval_size=0", "data.classify_size=0")
    run(config)
    newest = config.run_dir / "checkpoints" / "step_00000006" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-4096:] = bytes(4096)  # a few KiB of tensor bytes overwritten: same size, other checksum
    newest.write_bytes(bytes(data))
    more = tiny_config(tmp_path, "data.eval_size=0", "data.classify_size=0", "train.steps=9")
    with caplog.at_level("INFO", logger="vlfm"):
        run(more, resume=True)
    assert "step_00000006" in caplog.text and "resumed from" in caplog.text
    assert f"resumed from {config.run_dir / 'checkpoints' / 'step_00000003'}" in caplog.text
    steps = [json.loads(line)["step"] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 9]  # the rows after step 3 were dropped and logged again


def test_compiled_blocks_train_like_eager_ones(tmp_path, caplog):
    """train.compile: every transformer block compiled in place; the losses and weights are those of the eager run
    (fp32, within the reordering of fused kernels) and the checkpoint keeps the weights' names."""
    quick = ["train.steps=3", "train.save_every=0", "data.eval_size=0", "data.classify_size=0", "train.precision=fp32"]
    eager, compiled = tiny_config(tmp_path, *quick, name="eager"), tiny_config(tmp_path, *quick, "train.compile=true",
                                                                              name="compiled")
    with caplog.at_level("INFO", logger="vlfm"):
        for config in (eager, compiled):
            run(config)
    assert "train.compile: 4 transformer blocks compiled" in caplog.text  # 2 image + 2 text blocks
    losses = [[json.loads(line)["loss"] for line in (c.run_dir / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for c in (eager, compiled)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], abs=1e-4)  # logged at steps 2 and 3
    want, got = (load_file(str(c.run_dir / "model" / "model.safetensors")) for c in (eager, compiled))
    assert got.keys() == want.keys() and max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-4
