"""A real model of another family (Qwen2.5-Coder-0.5B-Instruct: Qwen2 architecture, its own vocabulary and template) through
the real pipeline: `cluster`, `train-experts` (the generalist) and `generate`, offline from PyPI packages.

One process drives the three through the Python API, which the commands call (tests/test_cli_help.py and
tests/test_workflow.py run the commands themselves): a 0.5 B model is loaded by the run once, not once per command."""

import pytest

from gradientspace import StrategyModel, cluster, load_config, train_experts
from gradientspace.data.records import Record
from gradientspace.models.loading import end_of_turn_ids, load_tokenizer
from gradientspace.runner import Run

pytestmark = [pytest.mark.slow, pytest.mark.heavy(seconds=30)]


def test_cluster_train_and_generate_on_qwen2(tmp_path):
    tokenizer = load_tokenizer("qwen2.5-coder-0.5b")
    # its end of turn is read off its own files: `<|im_end|>` from its template and generation config, never assumed
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tokenizer)
    assert len(tokenizer) > 150_000  # not SmolLM2's 49 152: the whole pipeline runs on another vocabulary
    config = load_config(
        None,
        {
            "out": str(tmp_path / "run"),
            "model.name": "qwen2.5-coder-0.5b",
            "model.lora_rank": 2,
            "model.target_modules": ["q_proj", "v_proj"],
            "data.path": "mix4-packaged",
            "data.per_source": 2,
            "data.max_length": 48,
            "data.validation_fraction": 0,
            "warmup.fraction": 0.5,
            "sketch.rank": 4,
            "cluster.k": 2,
            "experts.epochs": 1,
            "experts.strategies": ["single"],
        },
    )
    run = Run(config)
    clustered = cluster(run)
    assert len(clustered.labels) == 8 and set(clustered.labels) == {0, 1}
    assert (tmp_path / "run" / "clusters.jsonl").exists()
    trained = train_experts(run)
    assert (tmp_path / "run" / "strategies" / "single" / "0" / "adapter_model.safetensors").exists(), trained
    prompt = Record("prompt", [{"role": "user", "content": "Write a Python function that adds two numbers."}], "")
    (generation,) = StrategyModel(config, ["single"]).generate("single", [prompt], max_new_tokens=16)
    assert "def " in generation.text and "<|im_end|>" not in generation.text, generation.text
