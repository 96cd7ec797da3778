"""The full presets on the built-in world (minutes each: slow, run by CI and `make test-all`).

The floors are below what the presets reach here (CLIP: held-out zero-shot 0.90, t2i R@1 0.85; SigLIP: 0.88,
0.83; glyphs: 0.52-0.73, 0.87-0.88 over three runs; CI of 2026-11-30 on a 2-core CPU; LiT with its off-palette
scenes: 0.89-0.93, 0.91-0.92 over four runs at 1-2 threads) with room for run-to-run variation; they catch a
preset or training that breaks. The issue's target of 0.90 on both is not reliably reached yet by the CLIP and
SigLIP presets (see docs/architecture.md).
"""

from pathlib import Path

import numpy as np
import pytest

import vlfm
from vlfm.cli import main
from vlfm.config import load_config
from vlfm.data.shapes import ALL_LABELS, ShapesWorld
from vlfm.data.world_text import with_article
from vlfm.eval.tasks import evaluate_task
from vlfm.search import SearchIndex
from vlfm.train import run

# The assistant's VQA floor: measured 0.79 (all questions of 300 unseen scenes) with a 4500-step CLIP tower;
# stage 1 alone (projector only) gives 0.25-0.34, so a pipeline that stops learning in stage 2 fails it.
VQA_FLOOR = 0.55


@pytest.mark.parametrize(
    "preset",
    [  # minutes: each run's time in the CI of 2026-11-30 (tests/conftest.py: CI's time budget)
        pytest.param("shapes-clip", marks=pytest.mark.slow(minutes=10.5)),
        pytest.param("shapes-siglip", marks=pytest.mark.slow(minutes=9.5)),
        pytest.param("shapes-lit", marks=pytest.mark.slow(minutes=8.5)),
        pytest.param("shapes-glyphs", marks=pytest.mark.slow(minutes=9.5)),
    ],
)
def test_preset_learns_the_world(preset, tmp_path):
    config = load_config(f"configs/{preset}.yaml", [f"output_dir={tmp_path}"])
    metrics = run(config)
    assert metrics["zeroshot_seen_top1"] >= 0.90, metrics  # combinations seen in training
    assert metrics["zeroshot_top1"] >= (0.40 if preset == "shapes-glyphs" else 0.45), metrics  # unseen (chance 1/30)
    assert metrics["t2i_r1"] >= 0.75, metrics  # 1,000 held-out scenes, any scene carrying the caption counts
    if preset == "shapes-lit":
        # Words the world never uses, read through the locked MiniLM text tower. Measured: LiT 0.33 (colour
        # synonyms) and 0.34 (shape synonyms) against 0.15 and 0.20 for shapes-clip, whose tokenizer never saw them.
        assert metrics["zeroshot_unseen_colours_top1"] >= 0.25, metrics
        assert metrics["zeroshot_unseen_shapes_top1"] >= 0.25, metrics
        assert metrics["zeroshot_unseen_templates_top1"] >= 0.75, metrics
    if preset == "shapes-glyphs":
        # zero-shot on real handwriting (scikit-learn's digits) after training on rendered glyphs only; measured
        # 0.35 and 0.45 (two renderer versions), chance 0.10; the goal of 0.70 is not reached
        digits = evaluate_task(vlfm.load(config.run_dir), "zeroshot_classification", "digits")
        assert digits["top1"] >= 0.25, digits
    if preset == "shapes-clip":
        # text -> image search over 10,000 held-out scenes: "a red circle" must return scenes with a red circle
        # (measured: precision@10 1.0 for all 25 seen colour+shape queries)
        assert search_precision(config, tmp_path / "scenes", 10_000) >= 0.9


def search_precision(config, folder: Path, n: int) -> float:
    world = ShapesWorld(config.data.world)
    folder.mkdir()
    scenes = [world.scene("val", i) for i in range(n)]
    for i, scene in enumerate(scenes):
        world.render(scene).save(folder / f"{i:05d}.png")
    assert main(["index", "build", str(config.run_dir), "--images", str(folder), "--out", str(folder / "index")]) == 0
    labels = [label for label in ALL_LABELS if label in world.seen_labels]
    queries = vlfm.load(config.run_dir).embed_texts([with_article(label) for label in labels]).numpy()
    precision = []
    for label, hits in zip(labels, SearchIndex.open(folder / "index").search(queries, k=10)):
        colour, shape = label.split()
        objects = [scenes[int(Path(hit.path).stem)].objects for hit in hits]
        precision.append(np.mean([any(o.colour == colour and o.shape == shape for o in objs) for objs in objects]))
    return float(np.mean(precision))


@pytest.mark.slow(minutes=16)
def test_vlm_preset_answers_questions_about_new_scenes(tmp_path, capsys):
    """`make demo-vlm`'s path: a shortened LiT image tower, then the assistant's stages 0-2 on top of it."""
    # the Makefile's tower: grey colour-free scenes, not the preset's off-palette ones (relation 0.54 on those)
    tower = load_config("configs/shapes-lit.yaml", [f"output_dir={tmp_path}", "name=tower", "train.steps=1800",
                                                     "train.eval_every=0", "train.save_every=0",
                                                     "data.world.grey_fraction=0.3", "data.world.grey_colours=grey"])  # fmt: skip
    run(tower)
    config = load_config("configs/shapes-vlm.yaml", [f"output_dir={tmp_path}", "name=vlm",
                                                     f"model.vision_init={tower.run_dir}"])  # fmt: skip
    metrics = run(config)
    assert metrics["vqa_acc"] >= VQA_FLOOR, metrics  # every question of 300 scenes never trained on
    # chance is 0.5 (413 yes/no questions); 0.72-0.81 in four runs with the preset's focus phase, 0.48-0.55 without
    assert metrics["vqa_acc_relation"] >= 0.6, metrics
    capsys.readouterr()
    assert main(["chat", str(config.run_dir), "--scene", "1", "--save", str(tmp_path / "scene.png")]) == 0
    right, total = capsys.readouterr().out.strip().splitlines()[-1].split()[0].split("/")
    assert int(total) >= 5 and int(right) >= 0.4 * int(total)  # one scene: its questions, answers vs truth
