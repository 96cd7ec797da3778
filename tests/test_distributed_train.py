"""`vlfm train` under torchrun (2 processes, gloo on CPU): the run directory, weights equal to one process on the
same global batch, FSDP checkpoints that resume in one process, and clear failures for bad launches."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import TINY, tiny_config
from vlfm.config import ConfigError
from vlfm.io import UsageError
from vlfm.train import run

# One process and two ranks reduce the same sums in a different order: measured max difference 3e-7 after 6 steps.
TOLERANCE = 1e-5
QUICK = ["data.classify_size=0", "train.steps=6", "train.precision=fp32"]  # compared in fp32: within 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, name, *overrides, processes=2, flags=()):
    (tmp_path / "empty.yaml").write_text("{}\n")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port()), "-m", "vlfm.cli", "train", str(tmp_path / "empty.yaml")]
    for override in TINY + QUICK + [f"output_dir={tmp_path}", f"name={name}", *overrides]:
        args += ["-o", override]
    args += list(flags)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def logged_steps(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("single"), *QUICK)
    run(config)
    return config.run_dir


GRADCACHE_LOCAL = ["train.batch_size=16", "train.grad_accum=2", "train.gradcache=true", "distributed.local_loss=true"]


@pytest.mark.parametrize("strategy, extra", [("ddp", []), ("fsdp", []), ("ddp", GRADCACHE_LOCAL)],
                         ids=["ddp", "fsdp", "ddp-gradcache-local-loss"])
def test_two_ranks_train_like_one_process(tmp_path, single, strategy, extra, caplog):
    """The global batch of 32 (16 rows a rank; with GradCache 2 micro-batches of 8 a rank) gives the weights
    and logged losses of one process on batch 32."""
    result = torchrun(tmp_path, strategy, f"distributed.strategy={strategy}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / strategy
    assert {"model", "checkpoints", "eval.json", "metrics.jsonl", "config.yaml", "train.log", "curves.png"} <= {p.name for p in run_dir.iterdir()}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged_steps(run_dir) == [2, 4, 6]  # rank 0 alone writes
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert max_difference(weights(run_dir), weights(single)) <= TOLERANCE
    reference = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx([r["loss"] for r in reference if "loss" in r], abs=1e-5)
    state = json.loads((run_dir / "checkpoints" / "step_00000006" / "train_state.json").read_text())
    assert state["samples_seen"] == 6 * 32
    if strategy == "fsdp":  # the gathered checkpoint of step 3 resumes in one process and reaches the same weights
        final = weights(run_dir)
        for later in ("model", "checkpoints/step_00000006", "eval.json"):
            shutil.rmtree(run_dir / later) if (run_dir / later).is_dir() else (run_dir / later).unlink()
        with caplog.at_level("INFO", logger="vlfm"):
            run(tiny_config(tmp_path, *QUICK, name=strategy), resume=True)
        assert logged_steps(run_dir) == [2, 4, 6]  # the rows after step 3 dropped, then logged again
        assert "resumed from" in caplog.text and "step_00000003" in caplog.text  # not from scratch
        assert max_difference(weights(run_dir), final) <= TOLERANCE


def test_world_size_must_divide_the_global_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="global batch of 32 does not split over 3 processes"):
        run(tiny_config(tmp_path))


def test_missing_rendezvous_fails_fast_with_the_variables(tmp_path, monkeypatch, capsys):
    from vlfm.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UsageError, match="MASTER_ADDR, MASTER_PORT not set in the environment; launch with `torchrun"):
        run(tiny_config(tmp_path))
    capsys.readouterr()
    overrides = [part for o in TINY + [f"output_dir={tmp_path}", "name=cli"] for part in ("-o", o)]
    assert main(["train", "configs/shapes-clip.yaml", *overrides]) == 2  # the CLI says it in one line, no traceback
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "MASTER_ADDR, MASTER_PORT not set" in err and "torchrun --nproc-per-node" in err


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradcache_and_chunked_loss_step_like_one_big_batch(tmp_path, kind):
    """One step of 4 x 8 with GradCache (and of 32 with a chunked loss) equals one plain step of 32: the loss
    sees the same 32 pairs and repeated captions stay positives across micro-batches."""
    common = [f"model.kind={kind}", "train.steps=1", "train.warmup_steps=1", "train.save_every=0", "data.eval_size=0",
              "data.classify_size=0", "train.multi_positive=true", "train.precision=fp32"]
    plain = tiny_config(tmp_path, *common, name="plain")
    cached = tiny_config(tmp_path, *common, "train.batch_size=8", "train.grad_accum=4", "train.gradcache=true", name="cached")
    chunked = tiny_config(tmp_path, *common, "train.loss_chunk=12", name="chunked")
    accumulated = tiny_config(tmp_path, *common, "train.batch_size=8", "train.grad_accum=4", name="accumulated")
    for config in (plain, cached, chunked, accumulated):
        run(config)
    assert max_difference(weights(cached.run_dir), weights(plain.run_dir)) <= 1e-5
    assert max_difference(weights(chunked.run_dir), weights(plain.run_dir)) <= 1e-5
    # plain accumulation (each micro-batch its own negatives) is a different step: the comparison can tell
    assert max_difference(weights(accumulated.run_dir), weights(plain.run_dir)) > 1e-4


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(tmp_path, single):
    shutil.copytree(single, tmp_path / "resumed")
    for later in ("model", "checkpoints/step_00000006"):
        shutil.rmtree(tmp_path / "resumed" / later)
    result = torchrun(tmp_path, "resumed", "distributed.strategy=fsdp", flags=["--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert logged_steps(tmp_path / "resumed") == [2, 4, 6]  # the rows after step 3 dropped, then logged again
    assert "resumed from" in (tmp_path / "resumed" / "train.log").read_text()  # from step 3, not from scratch
    # equal weights after a resume need the optimizer's moments too: each rank loaded its shard of them
    assert max_difference(weights(tmp_path / "resumed"), weights(single)) <= TOLERANCE
