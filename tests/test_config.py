import pytest

from gradientspace.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: tiny-random\nsketch:\n  rank: 8\ncluster:\n  k: auto\n")
    config = load_config(path, {"sketch.rank": "12", "gradients.tokens": "instruction"})
    assert config.model.name == "tiny-random"
    assert config.sketch.rank == 12  # CLI strings are parsed
    assert config.cluster.k == "auto"
    assert config.gradients.tokens == "instruction"
    assert config.model.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("text, key", [
    ("sketch:\n  rnak: 8\n", "sketch.rnak"),
    ("modle:\n  name: x\n", "modle"),
    ("sketch:\n  rank: eight\n", "sketch.rank"),
    ("gradients:\n  tokens: all\n", "gradients.tokens"),
    ("cluster:\n  k: 1\n", "cluster.k"),
    ("cluster:\n  k: many\n", "cluster.k"),
])
def test_bad_keys_and_values_are_named(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_list_override_from_comma_string():
    assert load_config(None, {"model.target_modules": "q_proj,v_proj"}).model.target_modules == ["q_proj", "v_proj"]


def test_optional_fields_parse_cli_strings():
    config = load_config(None, {"sketch.internal_rank": "48", "data.limit": "5", "cluster.projection_dim": "null"})
    assert config.sketch.internal_rank == 48 and config.data.limit == 5 and config.cluster.projection_dim is None
    with pytest.raises(ConfigError, match="data.limit"):
        load_config(None, {"data.limit": "many"})


def test_all_linear_from_yaml_and_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  target_modules: all-linear\n  dtype: bfloat16\n")
    assert load_config(path).model.target_modules == ["all-linear"]
    assert load_config(path).model.dtype == "bfloat16"
    assert load_config(None, {"model.target_modules": "all-linear"}).model.target_modules == ["all-linear"]
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        load_config(None, {"model.dtype": "float8"})


def test_a_config_file_with_a_byte_order_mark_loads(tmp_path):
    """Notepad saves UTF-8 with a byte-order mark; the first key must not become `\\ufeffseed`."""
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfseed: 3\nmodel: {name: tiny-random}\n")
    assert load_config(path).seed == 3
