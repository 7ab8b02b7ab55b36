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
