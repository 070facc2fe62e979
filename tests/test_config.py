import pytest

from longloom.config import ConfigError, load_config, parse_overrides, resolve_split, validate_layout


def test_file_then_overrides_then_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hidden: 32, heads: 4}\ntrain: {steps: 7}\n")
    cfg = load_config(path, ["train.steps=9", "data.source=synthetic:recall", "checkpoint.async=false"])
    assert cfg.model.hidden == 32 and cfg.train.steps == 9
    assert cfg.data.source == "synthetic:recall"
    assert cfg.checkpoint.async_ is False
    assert cfg.model.layers == 2  # default
    assert "async: false" in cfg.to_yaml()


def test_unknown_key_names_full_path(tmp_path):
    with pytest.raises(ConfigError, match="model.hiden"):
        load_config(None, ["model.hiden=3"])
    path = tmp_path / "c.yaml"
    path.write_text("train: {stepz: 3}\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(path)


def test_bad_values_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="offload.activations"):
        load_config(None, ["offload.activations=1.5"])
    with pytest.raises(ConfigError, match="layer_pattern"):
        load_config(None, ["model.layer_pattern=SX"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.steps"])


def test_split_resolution_and_divisibility():
    cfg = load_config(None, ["launch.workers=8", "parallel.ulysses=2", "parallel.ring=2", "data.seq_len=64"])
    assert resolve_split(cfg) == (2, 2, 2)
    with pytest.raises(ConfigError, match="launch.workers"):
        resolve_split(load_config(None, ["launch.workers=3", "parallel.ulysses=2"]))
    with pytest.raises(ConfigError, match="must equal the number of workers"):
        resolve_split(load_config(None, ["launch.workers=4", "parallel.dp=1", "parallel.ulysses=2"]))
    with pytest.raises(ConfigError, match="data.seq_len=60 must be divisible by 2 \\* parallel.ring"):
        validate_layout(
            load_config(
                None, ["launch.workers=4", "parallel.ring=2", "parallel.ulysses=2", "data.seq_len=60"]
            )
        )
    with pytest.raises(ConfigError, match="parallel.ulysses=3"):
        validate_layout(
            load_config(None, ["launch.workers=3", "parallel.ulysses=3", "model.heads=4", "data.seq_len=96"])
        )


def test_kv_heads_that_neither_divide_nor_are_divided_by_ulysses():
    cfg = load_config(
        None,
        ["launch.workers=4", "parallel.ulysses=4", "model.heads=12", "model.kv_heads=6", "model.hidden=96"],
    )
    with pytest.raises(ConfigError, match="kv_heads=6 and parallel.ulysses=4"):
        validate_layout(cfg)
