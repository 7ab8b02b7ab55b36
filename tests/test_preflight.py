"""The cheap checks: their boundaries, and that they create nothing."""

import pytest

from gradientspace.config import ConfigError, load_config
from gradientspace.data.tokens import template_overhead
from gradientspace.models.loading import ModelError, check_model_name, load_tokenizer
from gradientspace.preflight import check_max_length, check_output_dir


def test_max_length_boundary_is_the_chat_template_plus_two_tokens():
    tokenizer = load_tokenizer("tiny-random")
    empty = tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], tokenize=False
    )
    fixed = len(tokenizer(empty, add_special_tokens=False)["input_ids"])
    assert template_overhead(tokenizer) == fixed  # the naive count: an empty exchange, templated whole
    needed = template_overhead(tokenizer) + 2
    check_max_length(load_config(None, {"model.name": "tiny-random", "data.max_length": needed}), tokenizer)
    with pytest.raises(ConfigError, match=f"use at least {needed}"):
        check_max_length(load_config(None, {"model.name": "tiny-random", "data.max_length": needed - 1}), tokenizer)


def test_output_dir_check_creates_nothing(tmp_path):
    check_output_dir(str(tmp_path / "a" / "b" / "run"))
    assert list(tmp_path.iterdir()) == []


def test_model_names_from_the_hugging_face_cache_are_accepted_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    check_model_name("acme/tiny")
    check_model_name("tiny-random")
    with pytest.raises(ModelError, match="unknown model `acme/other`.*smollm2-135m, qwen2.5-coder-0.5b, tiny-random"):
        check_model_name("acme/other")
    with pytest.raises(ModelError, match="unknown model"):
        check_model_name("not a repo id!")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # downloads allowed: the hub decides
    check_model_name("acme/other")


def test_a_key_added_later_leaves_a_run_made_before_it_valid_while_at_its_default(tmp_path):
    """`model.quantization` came after runs existed: at its default a run that never set it is not another run (same
    stage keys, accepted by `run`), and set to something else it is."""
    import json
    from dataclasses import asdict

    from gradientspace.config import keyed
    from gradientspace.preflight import check_existing_run
    from gradientspace.runner import Run

    config = load_config(None, {"out": str(tmp_path / "run")})
    recorded = config.to_dict()
    del recorded["model"]["quantization"]  # the config as a run made before the key recorded it
    before = asdict(config.model)
    del before["quantization"]
    assert keyed(config.model) == before  # the stage keys hash the model section as they did
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(
        json.dumps({"config": recorded, "stages": {"data": {"done": True, "key": "k"}}})
    )
    check_existing_run(Run(config), overwrite=False)
    quantized = load_config(None, {"out": str(tmp_path / "run"), "model.quantization": "nf4"})
    assert "quantization" in keyed(quantized.model)
    with pytest.raises(ConfigError, match=r"model.quantization None → 'nf4'"):
        check_existing_run(Run(quantized), overwrite=False)


def test_every_key_hashes_the_model_section_through_keyed():
    """`asdict` of a model config would put a key added later into a stage's key even at its default, re-running every
    run made before it: the model section reaches every key through `config.keyed`."""
    import ast
    from pathlib import Path

    import gradientspace

    package = Path(gradientspace.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "func", None)
            called = getattr(name, "id", None) or getattr(name, "attr", None)
            if isinstance(node, ast.Call) and called == "asdict" and "model" in ast.unparse(node.args[0]):
                found.append(f"{path.relative_to(package)}:{node.lineno}")
    assert not found, found
