"""`gradientspace run` end to end on tiny-random: every stage, every strategy, resume, generate."""

import json

import pytest
import torch

from gradientspace import workflow
from gradientspace.cli import main
from gradientspace.config import load_config

from conftest import tiny_run_config

STRATEGIES = ["routed", "single", "oracle", "random-clusters", "embedding-clusters", "projection-clusters", "elrea-ensemble"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    config = tiny_run_config(root, STRATEGIES, experts="snapshot_epochs: [1]",
                             evaluate="limit: 8, generate_per_domain: 1, max_new_tokens: 4, latency_prompts: 1, humaneval_problems: 1")
    assert main(["run", str(config)]) == 0
    return config, root / "run"


def test_run_writes_every_stage(finished_run):
    _, run = finished_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(entry["done"] for entry in manifest["stages"].values())
    results = json.loads((run / "eval.json").read_text())
    for strategy in STRATEGIES:
        overall = results[strategy]["overall"]
        assert overall["n"] == 8 and 0 < overall["nll"] < 20
        assert results["latency"][strategy]["first_token_ms"] > 0
    assert "exact_match" in results["routed"]["math"] and "exact_match" in results["routed"]["overall"] and "rouge_l" in results["routed"]["overall"]
    assert "humaneval_pass@1" in results["routed"]["code"]
    # the ensemble pays a gradient per prompt; single pays no routing at all
    assert results["latency"]["elrea-ensemble"]["routing_ms"] > results["latency"]["single"]["routing_ms"]
    assert manifest["router"]["routed"]["heldout_accuracy"] is not None
    for figure in ("sketch_map", "composition", "energy_curve", "nll_by_domain", "latency", "training_loss"):
        assert (run / "report" / f"{figure}.png").stat().st_size > 1000
    groups = json.loads((run / "experts" / "partition.json").read_text())["groups"]
    for group in groups:
        assert (run / "experts" / group / "adapter_config.json").exists()
        assert (run / "experts" / group / "epoch-1" / "adapter_model.safetensors").exists()


def test_expert_folders_load_with_plain_peft_and_match_single_nll(finished_run):
    """The `single` strategy's NLL equals scoring its adapter folder loaded by PeftModel.from_pretrained."""
    from peft import PeftModel

    from gradientspace.data import collate, load_records, tokenize
    from gradientspace.gradients import per_sample_mean_loss
    from gradientspace.inference import StrategyModel
    from gradientspace.models import load_base_model, load_tokenizer

    config_path, run = finished_run
    config = load_config(config_path)
    records, _ = load_records("mix4-packaged:test", limit=3, per_source=5)
    tokenizer = load_tokenizer("tiny-random")
    model = PeftModel.from_pretrained(load_base_model("tiny-random", torch.device("cpu")), str(run / "strategies" / "single" / "0")).eval()
    examples = tokenize(records, tokenizer, 96)
    with torch.no_grad():
        expected = [float(per_sample_mean_loss(model(input_ids=i, attention_mask=m).logits, l)) for i, m, l in (collate([e], tokenizer.pad_token_id) for e in examples)]
    engine = StrategyModel(config, ["single", "elrea-ensemble"])
    assert engine.nll("single", records) == pytest.approx(expected, rel=1e-5)
    choices, _ = engine.choose("elrea-ensemble", records)
    for choice in choices:
        assert sum(choice.weights.values()) == pytest.approx(1.0) and len(choice.weights) > 1


def test_run_resumes_without_retraining(finished_run, monkeypatch):
    config, run = finished_run

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    import gradientspace.experts as experts
    import gradientspace.pipeline as pipeline

    monkeypatch.setattr(experts, "train_adapter", must_not_run)
    monkeypatch.setattr(pipeline, "run_gradient_pass", must_not_run)
    monkeypatch.setattr(workflow, "evaluate_strategies", must_not_run)
    monkeypatch.setattr(workflow, "compute_elrea_centroids", must_not_run)
    assert main(["run", str(config)]) == 0


def test_generate_command(finished_run, capsys):
    _, run = finished_run
    assert main(["generate", str(run), "--prompt", "What is 2 + 3?", "--max-new-tokens", "3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == {"id", "expert", "probability", "text"} and 0 < line["probability"] <= 1
    assert main(["generate", str(run), "--prompt", "x", "--threshold", "1.01", "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["expert"] == -1  # below threshold: the warm-up adapter


def test_batched_generation_equals_one_prompt_at_a_time(finished_run):
    """Left-padded batches per adapter decode the same tokens as the batch-1 greedy loop."""
    from gradientspace.data import load_records
    from gradientspace.inference import StrategyModel

    config_path, _ = finished_run
    records, _ = load_records("mix4-packaged:test", limit=6, per_source=5)
    engine = StrategyModel(load_config(config_path), ["single", "routed"])
    for strategy in ("single", "routed"):
        batched = engine.generate(strategy, records, max_new_tokens=6, batch_size=4)
        alone = [engine.generate(strategy, [r], max_new_tokens=6)[0] for r in records]
        assert [g.text for g in batched] == [g.text for g in alone]
        assert [g.expert for g in batched] == [g.expert for g in alone]
        assert sum(g.new_tokens for g in batched) > len(records)
    assert len({len(engine.tokenizer(r.prompt_text)["input_ids"]) for r in records}) > 1  # padding was exercised
