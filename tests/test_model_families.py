"""No model-family assumption: a tokenizer with another family's chat template (Llama 3 style) ends answers where its own
template does, and `generate` and `serve` run on it end to end."""

import json

import pytest
import torch
from conftest import tiny_run_config

from gradientspace.cli import main
from gradientspace.config import config_from_run
from gradientspace.data.records import Record
from gradientspace.data.tokens import prompt_text
from gradientspace.models.loading import end_of_turn_ids, load_tokenizer

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llama3_style_model(tmp_path_factory):
    """tiny-random's weights shape with a Llama-3-style tokenizer: its own special tokens, its end of turn `<|eot_id|>`,
    the end of text in the generation config (as Llama 3 ships it), and no `<|im_end|>` anywhere in its template."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama3-style")
    tokenizer = load_tokenizer("tiny-random")
    tokenizer.add_special_tokens(
        {
            "eos_token": "<|end_of_text|>",
            "additional_special_tokens": [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
        }
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_end_of_an_answer_comes_from_the_template_and_the_generation_config(llama3_style_model):
    tokenizer = load_tokenizer(str(llama3_style_model))
    from transformers import GenerationConfig

    eot, im_end = tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert end_of_turn_ids(tokenizer) == {tokenizer.eos_token_id, eot}  # <|eot_id|> read off the template
    assert im_end not in end_of_turn_ids(
        tokenizer
    )  # ChatML's marker is in the vocabulary, but this template never ends a turn with it
    assert end_of_turn_ids(tokenizer, GenerationConfig(eos_token_id=[7, 9])) == {tokenizer.eos_token_id, eot, 7, 9}
    chatml = load_tokenizer("tiny-random")
    assert end_of_turn_ids(chatml) == {chatml.eos_token_id, chatml.convert_tokens_to_ids("<|im_end|>")}
    assert tokenizer.unk_token_id not in end_of_turn_ids(tokenizer)
    prompt = prompt_text(tokenizer, Record("r", [{"role": "user", "content": "hi"}], "there"))
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and "<|im_start|>" not in prompt


def test_generate_and_serve_run_on_another_familys_template(llama3_style_model, tmp_path, capsys):
    from gradientspace.routing.model import StrategyModel

    config = tiny_run_config(
        tmp_path, ["single"], evaluate="limit: 4, generate_per_domain: 1, max_new_tokens: 4, latency_prompts: 1"
    )
    config.write_text(config.read_text().replace("name: tiny-random", f"name: {llama3_style_model}"))
    assert main(["run", str(config)]) == 0
    run = tmp_path / "run"
    model = StrategyModel(config_from_run(run), ["single"])
    tokenizer = model.tokenizer
    assert model.eos_ids == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    capsys.readouterr()
    assert (
        main(["generate", str(run), "--prompt", "What is 2 + 3?", "--strategy", "single", "--max-new-tokens", "4"]) == 0
    )
    assert capsys.readouterr().out.strip()

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from gradientspace.serving.server import build

    app, engine = build(config_from_run(run), strategy="single")
    try:
        with TestClient(app) as client:
            reply = client.post(
                "/v1/chat/completions",
                json={"model": "generalist", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
    finally:
        engine.close()
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.text)["choices"][0]["finish_reason"] in ("stop", "length")
