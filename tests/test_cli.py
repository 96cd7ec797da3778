import json
import subprocess
import sys

import numpy as np
import pytest

from vlfm.cli import main
from vlfm.data.draw import render
from vlfm.data.shapes import Obj, Scene


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err
    return err


def test_cli_errors_are_one_line(capsys, tmp_path, trained_run):
    one_line_error(capsys, ["train", "configs/shapes-clip.yaml", "-o", "train.stpes=3"], "unknown config key 'train.stpes'")
    one_line_error(capsys, ["train", "configs/missing.yaml"], "does not exist")
    one_line_error(capsys, ["classify", str(trained_run), str(tmp_path / "nope.png"), "--labels", "a,b"], "does not exist")
    (tmp_path / "text.png").write_text("hello")
    one_line_error(capsys, ["classify", str(trained_run), str(tmp_path / "text.png"), "--labels", "a,b"], "not a readable image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"architecture": "vlfm.TwoTowerModel", "model": {}}))
    one_line_error(capsys, ["info", str(tmp_path / "empty")], "no model.safetensors")
    one_line_error(capsys, ["eval", str(tmp_path / "nowhere")], "does not exist")


def test_cli_exit_code_from_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vlfm.cli", "info", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "neither a checkpoint" in result.stderr


def test_classify_embed_info(capsys, tmp_path, trained_run):
    image = render(Scene((Obj("red", "circle", "big", 0.5, 0.5),), background=1), 32)
    image.save(tmp_path / "a.png")
    assert main(["classify", str(trained_run), str(tmp_path / "a.png"), "--labels", "a red circle,a blue square,a green star"]) == 0
    out = capsys.readouterr().out
    probabilities = [float(line.split()[-1]) for line in out.splitlines()[1:]]
    assert len(probabilities) == 3 and sum(probabilities) == pytest.approx(1.0, abs=2e-3)

    folder = tmp_path / "images"
    folder.mkdir()
    image.save(folder / "0.png")
    image.rotate(90).save(folder / "1.png")
    (folder / "2.png").write_bytes(b"corrupt")
    assert main(["embed", str(trained_run), "--images", str(folder), "--out", str(tmp_path / "e.npy")]) == 0
    embeddings = np.load(tmp_path / "e.npy")
    assert embeddings.shape == (2, 32) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    assert (tmp_path / "e.txt").read_text().splitlines()[1].endswith("1.png")

    (tmp_path / "t.txt").write_text("a red circle\n\na blue square\n")
    assert main(["embed", str(trained_run), "--texts", str(tmp_path / "t.txt"), "--out", str(tmp_path / "t.npy")]) == 0
    assert np.load(tmp_path / "t.npy").shape == (2, 32)

    capsys.readouterr()
    assert main(["info", str(trained_run)]) == 0
    assert "kind: clip" in capsys.readouterr().out


def test_eval_writes_eval_json(capsys, trained_run):
    (trained_run / "eval.json").unlink()
    assert main(["eval", str(trained_run), "--retrieval-size", "40", "--classify-size", "10", "--ood-per-class", "1"]) == 0
    metrics = json.loads((trained_run / "eval.json").read_text())
    assert {"zeroshot_top1", "zeroshot_top5", "t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5"} <= set(metrics)
    # out of domain beside in domain: 30-way zero-shot and class-name search on the independent renderer
    assert {"ood_zeroshot_top1", "ood_t2i_p1", "ood_t2i_p10", "single_t2i_p10"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("ood_zeroshot_top1", "ood_t2i_p10", "single_t2i_p10"))
