"""The full presets on the built-in world, with the quality bars the README promises (minutes each: slow)."""

import pytest

from vlfm.config import load_config
from vlfm.train import run


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["shapes-clip", "shapes-siglip"])
def test_preset_reaches_the_bars(preset, tmp_path):
    metrics = run(load_config(f"configs/{preset}.yaml", [f"output_dir={tmp_path}"]))
    assert metrics["zeroshot_top1"] >= 0.90, metrics  # colour+shape combinations never seen in training
    assert metrics["t2i_r1"] >= 0.90, metrics  # 1,000 held-out scenes, any scene carrying the caption counts
