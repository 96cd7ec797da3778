from pathlib import Path

import pytest

from vlfm.config import ConfigError, RunConfig, from_dict, load_config, to_dict


def test_presets_load():
    for name in ("shapes-clip", "shapes-siglip", "vit-b-32"):
        config = load_config(f"configs/{name}.yaml")
        assert config.name == name
        assert from_dict(RunConfig, to_dict(config)) == config  # dict round trip


def test_overrides_parse_yaml_values():
    config = load_config("configs/shapes-clip.yaml", ["train.steps=7", "model.vision.stem=patch", "train.lr=3e-4"])
    assert config.train.steps == 7 and config.model.vision.stem == "patch" and config.train.lr == 3e-4


def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match="'train.stpes'"):
        load_config(None, ["train.stpes=3"])
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        from_dict(RunConfig, {"bogus": 1})


@pytest.mark.parametrize("key", ["train.hard_negatives", "train.caption_positives"])
def test_retired_options_are_unknown_keys(key):
    """Retired (docs/experiments.md keeps their findings): a config that still sets one fails like any typo."""
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("configs/shapes-clip.yaml", [f"{key}=true"])


def test_wrong_type_and_choice():
    with pytest.raises(ConfigError, match="train.steps must be int"):
        load_config(None, ["train.steps=lots"])
    with pytest.raises(ConfigError, match="model.kind"):
        load_config(None, ["model.kind=align"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])
    # a section's own range checks come out as ConfigError too (the CLI's one-line error, exit code 2)
    with pytest.raises(ConfigError, match=r"world.colour_free_fraction=1.5 must be in \[0, 1\)"):
        load_config("configs/shapes-clip.yaml", ["data.world.colour_free_fraction=1.5"])
    with pytest.raises(ConfigError, match="world.colour_free_style='pink' is not one of"):
        load_config("configs/shapes-clip.yaml", ["data.world.colour_free_style=pink"])


def test_a_vlm_run_refuses_the_fields_its_stages_own():
    """A VLM run's steps, batch size and learning rates are per stage: `train.steps` is not silently ignored."""
    with pytest.raises(ConfigError, match="unknown config key 'train.steps'"):
        load_config("configs/shapes-vlm.yaml", ["train.steps=5"])
    with pytest.raises(ConfigError, match="unknown config key 'train.loss_chunk'"):
        load_config("configs/shapes-vlm.yaml", ["train.loss_chunk=8"])


def test_config_of_an_older_run_loads_with_its_keys_renamed(tmp_path):
    """A run directory's config.yaml from before the renames (grey_* and stage 2's curriculum / focus fields)."""
    import yaml

    from vlfm.config import VLMRunConfig

    old = yaml.safe_load(Path("configs/shapes-vlm.yaml").read_text())
    old["data"]["world"] = {"image_size": 64, "grey_fraction": 0.3, "grey_colours": "off_palette"}
    old["stage2"].pop("phases")
    old["stage2"].update(curriculum_steps=[300], focus_steps=150, focus_start=700, focus_kinds=["relation"])
    config = from_dict(VLMRunConfig, old)
    assert (config.data.world.colour_free_fraction, config.data.world.colour_free_style) == (0.3, "off_palette")
    assert to_dict(config)["stage2"]["phases"] == to_dict(load_config("configs/shapes-vlm.yaml"))["stage2"]["phases"]
