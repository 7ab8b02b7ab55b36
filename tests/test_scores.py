"""The score matrices (`evaluation/scores.py`): every validation and test record under every adapter, checked against one
record at a time; evaluation as a lookup in them; and the test matrix read by no decision."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run_config

from gradientspace.cli import main
from gradientspace.config import config_from_run
from gradientspace.evaluation.scores import Scores, evaluation_records
from gradientspace.experts.strategies import Choice
from gradientspace.routing.model import StrategyModel

pytestmark = pytest.mark.heavy(seconds=40)
STRATEGIES = ["routed", "single", "single-continued"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scores")
    config = tiny_run_config(
        root,
        STRATEGIES,
        experts="keep_min_records: 1, keep_confidence: 0.5",
        evaluate="limit: 6, generate_per_domain: 0, latency_prompts: 0",
    )
    assert main(["run", str(config)]) == 0
    return root / "run"


def adapter_folders(run: Path) -> set[str]:
    """Every adapter a strategy trained or blended (not the warm-up, nor training checkpoints)."""
    return {
        str(p.parent.relative_to(run))
        for p in run.glob("**/adapter_model.safetensors")
        if ".trainer-" not in str(p) and p.parent.name != "warmup"
    }


def test_every_record_is_scored_under_every_adapter_as_one_record_alone_would_be(run_dir):
    config = config_from_run(run_dir)
    engine = StrategyModel(config, STRATEGIES)
    from gradientspace.runner import Run

    splits = {"validation": Run(config).validation, "test": evaluation_records(config)}
    for split, records in splits.items():
        scores = Scores(run_dir / "scores" / split)
        assert scores.info["ids"] == [r.id for r in records] and scores.nll.shape == (
            len(records),
            len(scores.info["adapters"]),
        )
        assert set(scores.info["adapters"]) == adapter_folders(run_dir)
        for column, folder in enumerate(scores.info["adapters"]):
            adapter = engine.load_folder(run_dir / folder)
            alone = [
                engine.nll_for_choices([Choice({adapter: 1.0}, 0, 1.0)], [record], batch_size=1)[0]
                for record in records
            ]
            np.testing.assert_allclose(scores.nll[:, column], alone, rtol=0, atol=1e-5, err_msg=f"{split} {folder}")


def test_a_rank_with_no_records_scores_an_empty_shard_of_the_same_widths(run_dir):
    """On 8 ranks a split of fewer than 8 records leaves some ranks nothing to score: their shard holds every array with
    no rows and the widths of the others', so the gathered matrices stack."""
    from gradientspace.evaluation.scores import score_shard
    from gradientspace.runner import Run

    run = Run(config_from_run(run_dir))
    records = evaluation_records(run.config)
    one, empty = (score_shard(run, STRATEGIES, "test", shard) for shard in (records[:1], []))
    for name in ("nll", "hidden", "embedding", "sketch"):
        assert one[name].shape[0] == 1 and empty[name].shape == (0, *one[name].shape[1:]), name
    assert empty["routers"].keys() == one["routers"].keys() == {"routed"}
    assert empty["routers"]["routed"].shape == (0, one["routers"]["routed"].shape[1])
    assert all(served == [] for served in empty["served"].values())


def test_the_routers_and_features_are_stored_per_record(run_dir):
    from gradientspace.data.tokens import tokenize
    from gradientspace.models.loading import load_base_model, load_tokenizer
    from gradientspace.runner import Run

    config = config_from_run(run_dir)
    base, tokenizer = load_base_model(config.model.name, torch.device("cpu")), load_tokenizer(config.model.name)
    records = {"validation": Run(config).validation, "test": evaluation_records(config)}
    for split in ("validation", "test"):
        folder = run_dir / "scores" / split
        scores = Scores(folder)
        n = len(scores.info["ids"])
        probabilities = np.load(folder / "router-routed.npy")
        router = scores.info["routers"]["routed"]
        assert probabilities.shape == (n, len(router["groups"])) and np.allclose(
            probabilities.sum(axis=1), 1, atol=1e-5
        )
        assert router["pick"] == probabilities.argmax(axis=1).tolist()
        assert router["threshold"] == json.loads((run_dir / "router" / "router.json").read_text())["threshold"]
        assert router["to_fallback"] == (probabilities.max(axis=1) < router["threshold"]).tolist()
        # a record the threshold sends away is served by the fall-back's column
        fallback = scores.info["fallback"]["routed"]
        assert all(c == fallback for c, away in zip(scores.info["served"]["routed"], router["to_fallback"]) if away)
        hidden = np.load(folder / "hidden.npy")
        assert hidden.shape == (n, base.config.hidden_size)
        record = records[split][-1]  # alone, unpadded: its prompt's last hidden states averaged over its tokens
        (example,) = tokenize([record], tokenizer, config.data.max_length, "instruction")
        alone = (
            base(input_ids=torch.tensor([example.input_ids]), output_hidden_states=True)
            .hidden_states[-1][0]
            .mean(dim=0)
        )
        np.testing.assert_allclose(hidden[-1], alone.detach().numpy(), rtol=1e-4, atol=1e-5)
        embedding = np.load(folder / "embedding.npy", mmap_mode="r")
        assert embedding.shape == (n, 384) and np.allclose(np.linalg.norm(embedding, axis=1), 1, atol=1e-4)
        sketch = np.load(folder / "sketch.npy")
        assert sketch.shape == (n, config.sketch.rank) and np.allclose(np.linalg.norm(sketch, axis=1), 1)


def test_evaluation_is_the_lookup_and_agrees_with_scoring_anew(run_dir):
    from gradientspace.evaluation.evaluate import evaluate_strategies

    config = config_from_run(run_dir)
    evaluation = json.loads((run_dir / "eval.json").read_text())
    scores = Scores(run_dir / "scores" / "test")
    anew = evaluate_strategies(
        replace(config, evaluate=replace(config.evaluate, latency_prompts=0)), STRATEGIES, write=False
    )
    for strategy in STRATEGIES:
        stored = evaluation["per_record"][strategy]["nll"]
        assert stored == [round(x, 5) for x in scores.strategy_nll(strategy)], strategy  # exactly the lookup
        np.testing.assert_allclose(
            anew["per_record"][strategy]["nll"], stored, rtol=0, atol=1e-5 + 1e-9, err_msg=strategy
        )


def decision_bytes(run: Path) -> dict[str, bytes]:
    """Every file a decision wrote: keep decisions, blends, routers and their thresholds."""
    paths = [p for p in run.glob("**/keep.json")] + [p for p in run.glob("**/blended/*")]
    paths += [p for p in run.glob("**/router/*") if p.is_file()] + [p for p in run.glob("router/*") if p.is_file()]
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(set(paths))}


def test_no_decision_reads_the_test_matrix(run_dir, tmp_path):
    """Delete the test matrix and garble what is left of it, make every decision again: the same bytes."""
    from gradientspace.commands import run_until

    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    before = decision_bytes(copy)
    assert {
        "router/router.json",
        "router/head.safetensors",
        "experts/keep.json",
        "strategies/single-continued/keep.json",
    } <= set(before)
    sealed = copy / "scores" / "test"
    shutil.rmtree(sealed)
    sealed.mkdir()
    for name in ("info.json", "nll.npy", "router-routed.npy"):
        (sealed / name).write_bytes(b"garbled")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"] = {
        name: entry
        for name, entry in manifest["stages"].items()
        if not name.startswith(("keep/", "router/", "threshold/"))
    }
    (copy / "manifest.json").write_text(json.dumps(manifest))
    config = config_from_run(copy)
    result = run_until(config, "router")
    assert set(result["kept"]) == {"routed", "single-continued"} and result["thresholds"]["routed"] is not None
    assert decision_bytes(copy) == before
    assert (sealed / "nll.npy").read_bytes() == b"garbled"
