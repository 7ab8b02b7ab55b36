from pathlib import Path

import pytest

from gradientspace.config import ConfigError, config_keys, key_default, key_help, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: tiny-random\nsketch:\n  rank: 8\ncluster:\n  k: auto\n")
    config = load_config(path, {"sketch.rank": "12", "gradients.tokens": "instruction"})
    assert config.model.name == "tiny-random"
    assert config.sketch.rank == 12  # CLI strings are parsed
    assert config.cluster.k == "auto"
    assert config.gradients.tokens == "instruction"
    assert config.model.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize(
    "text, key",
    [
        ("sketch:\n  rnak: 8\n", "sketch.rnak"),
        ("modle:\n  name: x\n", "modle"),
        ("sketch:\n  rank: eight\n", "sketch.rank"),
        ("gradients:\n  tokens: all\n", "gradients.tokens"),
        ("cluster:\n  k: 1\n", "cluster.k"),
        ("cluster:\n  k: many\n", "cluster.k"),
    ],
)
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


def test_relative_paths_in_a_yaml_are_read_against_its_folder(tmp_path, monkeypatch):
    """A config in another folder means the same from any working directory; flags stay where the user stands."""
    folder = tmp_path / "project" / "configs"
    (folder / "local-model").mkdir(parents=True)
    path = folder / "c.yaml"
    path.write_text(
        "out: ../runs/a\ndata: {path: train.jsonl}\nevaluate: {data: /abs/test.jsonl}\nmodel: {name: local-model}\n"
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(path.relative_to(tmp_path))
    assert config.out == str(Path("project/runs/a"))
    assert config.data.path == str(Path("project/configs/train.jsonl"))
    assert config.evaluate.data == "/abs/test.jsonl"
    assert config.model.name == str(Path("project/configs/local-model"))  # a folder that exists there
    overridden = load_config(path, {"out": "here", "data.path": "mine.jsonl"})
    assert (overridden.out, overridden.data.path) == ("here", "mine.jsonl")


def test_recipes_aliases_and_hub_ids_in_a_yaml_are_not_paths(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir()
    path.write_text(
        "data: {path: mix4-packaged}\nevaluate: {data: 'mix4-packaged:test'}\nmodel: {name: HuggingFaceTB/SmolLM2-135M}\n"
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("sub/c.yaml")
    assert (config.data.path, config.evaluate.data) == ("mix4-packaged", "mix4-packaged:test")
    assert config.model.name == "HuggingFaceTB/SmolLM2-135M"
    assert load_config("sub/c.yaml", {"model.name": "smollm2-135m"}).model.name == "smollm2-135m"


def test_every_key_has_help_and_path_keys_say_how_they_resolve():
    keys = dict(config_keys())
    assert {"out", "data.path", "evaluate.data", "serve.port", "cluster.k"} <= set(keys)
    assert all(item.metadata.get("help") for item in keys.values()), [
        k for k, i in keys.items() if not i.metadata.get("help")
    ]
    for key in ("out", "data.path", "evaluate.data"):
        assert "YAML file's folder" in key_help(key)
    assert "Must be at least 1." in key_help("data.max_length")
    assert (key_default("model.target_modules"), key_default("data.limit"), key_default("out")) == (
        "[q_proj, k_proj, v_proj, o_proj]",
        "null",
        "runs/default",
    )


def test_a_config_file_with_a_byte_order_mark_loads(tmp_path):
    """Notepad saves UTF-8 with a byte-order mark; the first key must not become `\\ufeffseed`."""
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfseed: 3\nmodel: {name: tiny-random}\n")
    assert load_config(path).seed == 3
