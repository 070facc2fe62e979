import pytest

from longloom.config import ConfigError, load_config, parse_overrides
from longloom.training.split import resolve_split, validate_layout


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


def test_device_activations_refused_without_activation_offload_or_beyond_all_tokens():
    cfg = load_config(None, ["offload.activations=0.25", "offload.device_activations=0.75"])
    assert (cfg.offload.activation_share, cfg.offload.device_activations) == (0.25, 0.75)
    assert load_config(None, []).offload.device_activations == 0.0
    with pytest.raises(
        ConfigError, match=r"offload.device_activations=0.5 .* off \(offload.activations=false\)"
    ):
        load_config(None, ["offload.device_activations=0.5"])
    with pytest.raises(
        ConfigError, match=r"offload.activations=0.5 and offload.device_activations=0.75 add up to 1.25"
    ):
        load_config(None, ["offload.activations=0.5", "offload.device_activations=0.75"])
    with pytest.raises(ConfigError, match=r"offload.activations=true and offload.device_activations=0.1"):
        load_config(None, ["offload.activations=true", "offload.device_activations=0.1"])
    with pytest.raises(ConfigError, match="offload.device_activations"):
        load_config(None, ["offload.activations=0.5", "offload.device_activations=true"])


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


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.steps=true", r"'train.steps'=True.*a whole number >= 1"),
        ("launch.workers=false", r"'launch.workers'=False.*a whole number >= 1"),
        ("parallel.dp=true", r"'parallel.dp'=True.*a whole number >= 1 or 'auto'"),
        ("model.hidden=64.0", r"'model.hidden'=64.0.*a whole number"),
        ("train.lr=true", r"'train.lr'=True: true is a flag, not a number.*> 0"),
        ("checkpoint.async=1", r"'checkpoint.async'=1.*true or false"),
    ],
)
def test_flags_and_numbers_do_not_pass_for_each_other(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("offload.gpu_share=1.5", r"'offload.gpu_share'=1.5.*> 0 and <= 1 or 'auto'"),
        ("offload.gpu_share=0", r"'offload.gpu_share'=0.*> 0 and <= 1 or 'auto'"),
        ("parallel.ring=0", r"'parallel.ring'=0.*>= 1 or 'auto'"),
        ("parallel.dp=-2", r"'parallel.dp'=-2.*>= 1 or 'auto'"),
        ("train.lr=.nan", r"'train.lr'=nan.*finite number > 0"),
        ("train.betas=[0.9, 1.0]", r"'train.betas'=1.0.*< 1"),
        ("train.seed=-1", r"'train.seed'=-1.*>= 0"),
        ("model.rope_theta=0", r"'model.rope_theta'=0.*> 0"),
        ("launch.collective_timeout_s=.inf", r"'launch.collective_timeout_s'=inf"),
        ("train.output_dir=''", r"'train.output_dir'=''.*at least 1 character"),
    ],
)
def test_every_value_is_range_checked_at_load(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, [override])


def test_valid_edges_still_load():
    cfg = load_config(
        None, ["offload.gpu_share=1", "offload.activations=0.5", "parallel.ring=auto", "train.lr=1"]
    )
    assert cfg.offload.gpu_share == 1.0 and cfg.offload.activations == 0.5 and cfg.train.lr == 1.0
    assert load_config(None, ["offload.activations=true"]).offload.activation_share == 1.0


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  hidden: 64\n train: {steps: 3\n")
    with pytest.raises(ConfigError, match=r"broken.yaml' is not valid YAML: line 3, column 2"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'train.steps=\[1': the value is not valid YAML"):
        load_config(None, ["train.steps=[1"])


def _number_keys(schema: dict, definitions: dict, path: str = ""):
    """(dotted key, JSON schema) of every whole or real number a config takes, union members included."""
    if "$ref" in schema:
        schema = definitions[schema["$ref"].rsplit("/", 1)[-1]]
    for name, field in schema.get("properties", {}).items():
        key = f"{path}{name}"
        if "$ref" in field or "properties" in field:
            yield from _number_keys(field, definitions, f"{key}.")
            continue
        options = field.get("anyOf", [field])
        options += [item for option in options for item in option.get("prefixItems", [])]
        yield from ((key, option) for option in options if option.get("type") in ("integer", "number"))


def test_every_number_key_is_range_checked_at_load_time():
    from longloom.config import LongloomConfig

    schema = LongloomConfig.model_json_schema(by_alias=True)
    keys = list(_number_keys(schema, schema["$defs"]))
    assert len(keys) > 30
    lower = ("minimum", "exclusiveMinimum", "ge", "gt")
    unbounded = [key for key, option in keys if not any(bound in option for bound in lower)]
    assert not unbounded, f"number keys without a lower bound: {unbounded}"


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("offload.gpu_share=1.5", "> 0 and <= 1 or 'auto'"),
        ("launch.collective_timeout_s=1e300", "<= 86400"),
        ("launch.max_failures=100000", "<= 1000"),
        ("model.norm_eps=2", "< 1"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key_and_the_range(override, allowed):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}'") as error:
        load_config(None, [override])
    assert allowed in str(error.value)
