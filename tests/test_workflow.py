"""`gradientspace run` end to end on tiny-random: every stage, every strategy, resume, generate."""

import json

import pytest
import torch
from conftest import tiny_run_config

from gradientspace.cli import main
from gradientspace.config import load_config
from gradientspace.evaluation import evaluate as evaluation
from gradientspace.routing import ensemble

pytestmark = pytest.mark.heavy(seconds=160)  # one whole `run` shared by the file

STRATEGIES = [
    "routed",
    "single",
    "single-wide",
    "gradient-oracle",
    "oracle",
    "random-clusters",
    "embedding-clusters",
    "projection-clusters",
    "elrea-ensemble",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    # every expert served (`keep: all`): the ensemble and the figures need several adapters; test_keep.py covers the keep rule
    config = tiny_run_config(
        root,
        STRATEGIES,
        experts="branch_epochs: 2, snapshot_epochs: [1], keep: all",
        evaluate="limit: 8, generate_per_domain: 1, max_new_tokens: 4, latency_prompts: 1, humaneval_problems: 1",
    )
    from gradientspace.models import loading

    real = loading.load_base_model
    loads = []

    def counted(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:  # every base-model load of the whole run, whoever asks
        patch.setattr(loading, "load_base_model", counted)
        assert main(["run", str(config)]) == 0
    (root / "base-loads.json").write_text(json.dumps(loads))
    return config, root / "run"


def test_a_run_loads_the_base_once(finished_run):
    """One base model per process: the warm-up, every adapter of every shape (`single-wide`'s wider LoRA included) and
    then the one adapter bank (keep, thresholds, centroids, score matrices, evaluation) wrap it in turn."""
    config, run = finished_run
    assert json.loads((run.parent / "base-loads.json").read_text()) == ["tiny-random"]


def test_run_writes_every_stage(finished_run):
    _, run = finished_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(entry["done"] for entry in manifest["stages"].values())
    results = json.loads((run / "eval.json").read_text())
    for strategy in STRATEGIES:
        overall = results[strategy]["overall"]
        assert overall["n"] == 8 and 0 < overall["nll"] < 20
        assert results["latency"][strategy]["first_token_ms"] > 0
    assert (
        "exact_match" in results["routed"]["math"]
        and "exact_match" in results["routed"]["overall"]
        and "rouge_l" in results["routed"]["overall"]
    )
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

    from gradientspace.data.loading import load_records
    from gradientspace.data.tokens import collate, tokenize
    from gradientspace.gradients.engine import per_sample_mean_loss
    from gradientspace.models.loading import load_base_model, load_tokenizer
    from gradientspace.routing.model import StrategyModel

    config_path, run = finished_run
    config = load_config(config_path)
    records, _ = load_records("mix4-packaged:test", limit=3, per_source=5)
    tokenizer = load_tokenizer("tiny-random")
    model = PeftModel.from_pretrained(
        load_base_model("tiny-random", torch.device("cpu")), str(run / "strategies" / "single" / "0")
    ).eval()
    examples = tokenize(records, tokenizer, 96)
    with torch.no_grad():
        expected = [
            float(per_sample_mean_loss(model(input_ids=i, attention_mask=m).logits, l))
            for i, m, l in (collate([e], tokenizer.pad_token_id) for e in examples)
        ]
    engine = StrategyModel(config, ["single", "elrea-ensemble"])
    assert engine.nll("single", records) == pytest.approx(expected, rel=1e-5)
    choices, _ = engine.choose("elrea-ensemble", records)
    for choice in choices:
        assert sum(choice.weights.values()) == pytest.approx(1.0) and len(choice.weights) > 1


def test_run_resumes_without_retraining(finished_run, monkeypatch):
    config, run = finished_run

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    import gradientspace.clustering.stages as stages
    import gradientspace.experts.adapters as adapters

    monkeypatch.setattr(adapters, "train_adapter", must_not_run)
    monkeypatch.setattr(stages, "run_gradient_pass", must_not_run)
    monkeypatch.setattr(evaluation, "evaluate_strategies", must_not_run)
    monkeypatch.setattr(ensemble, "compute_elrea_centroids", must_not_run)
    assert main(["run", str(config)]) == 0


def test_generate_command(finished_run, capsys):
    _, run = finished_run
    assert main(["generate", str(run), "--prompt", "What is 2 + 3?", "--max-new-tokens", "3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == {"id", "model", "expert", "probability", "fallback", "text"} and 0 < line["probability"] <= 1
    assert main(["generate", str(run), "--prompt", "x", "--threshold", "1.01", "--max-new-tokens", "2"]) == 0
    below = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert below["expert"] == -1 and below["fallback"] == "below_threshold"  # the fall-back answered


def test_the_label_oracle_says_a_label_it_has_no_expert_for_is_why_the_fall_back_answered(
    finished_run, tmp_path, capsys
):
    _, run = finished_run
    prompts = tmp_path / "labelled.jsonl"
    rows = [
        {"id": "known", "instruction": "What is 2 + 3?", "source": "math"},
        {"id": "new", "instruction": "Name a colour.", "source": "poetry"},
    ]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    command = ["generate", str(run), "--data", str(prompts), "--strategy", "oracle", "--max-new-tokens", "2"]
    assert main(command) == 0
    lines = {line["id"]: line for line in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    groups = json.loads((run / "strategies" / "oracle" / "partition.json").read_text())["groups"]
    assert lines["known"]["expert"] == groups.index("math") and lines["known"]["fallback"] is None
    assert lines["known"]["model"] != lines["new"]["model"]  # its own expert, not the fall-back
    assert lines["new"]["expert"] == -1 and lines["new"]["fallback"] == "unknown_label"


def test_generate_reads_a_file_through_the_column_mapping(finished_run, tmp_path, capsys):
    _, run = finished_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"key": "q1", "question": "What is 2 + 3?"})
        + "\n"
        + json.dumps({"key": "q2", "question": "Name a colour."})
        + "\n"
    )
    assert main(["generate", str(run), "--data", str(prompts), "--max-new-tokens", "2"]) == 2
    assert "prompts.jsonl:1: missing field `instruction`" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                str(run),
                "--data",
                str(prompts),
                "--max-new-tokens",
                "2",
                "--set",
                "data.columns={instruction: question, id: key}",
            ]
        )
        == 0
    )
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.strip().splitlines()] == ["q1", "q2"]


def test_batched_generation_equals_one_prompt_at_a_time(finished_run):
    """Left-padded batches per adapter decode the same tokens as the batch-1 greedy loop."""
    from gradientspace.data.loading import load_records
    from gradientspace.routing.model import StrategyModel

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


REPORT_FACTS = """({
  external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href')).filter(u => !u.startsWith('data:')),
  results: (() => { const t = [...document.querySelectorAll('h2')].find(h => h.textContent === 'Results').nextElementSibling;
                    return {tag: t.tagName, rows: t.rows ? t.rows.length : 0, text: t.innerText, box: t.getBoundingClientRect().toJSON()}; })(),
  images: [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, box: i.getBoundingClientRect().toJSON()})),
  clusters: [...document.querySelectorAll('details')].map(d => ({summary: d.querySelector('summary').innerText, prompts: d.querySelectorAll('.prompt').length,
                                                                serves: d.querySelector('p').innerText})),
})"""


def test_an_nll_only_evaluation_decodes_nothing_and_scores_as_the_evaluation_did(finished_run, monkeypatch):
    """`answers=False` (bench/experts.py's validation scoring of the ensemble): the run's own model, no answer decoded,
    no HumanEval or latency, and the NLL per record the evaluation gave (the run asks for all three answers)."""
    from conftest import opened_run

    from gradientspace.models import loading
    from gradientspace.routing.model import StrategyModel

    _, run = finished_run
    command = opened_run(run)
    command.base_model()  # loaded before counting: the scoring below must load no second one
    loads = []
    monkeypatch.setattr(loading, "load_base_model", lambda *args, **kwargs: loads.append(args[0]))

    def must_not_decode(*args, **kwargs):
        raise AssertionError("an NLL-only evaluation decoded")

    monkeypatch.setattr(StrategyModel, "generate", must_not_decode)
    monkeypatch.setattr(evaluation, "humaneval", must_not_decode)
    monkeypatch.setattr(evaluation, "latency", must_not_decode)
    strategies = ["routed", "elrea-ensemble"]
    results = evaluation.evaluate_strategies(command, strategies, write=False, answers=False)
    evaluated = json.loads((run / "eval.json").read_text())
    assert loads == [] and results["latency"] == {}
    for strategy in strategies:
        assert results["per_record"][strategy]["nll"] == pytest.approx(
            evaluated["per_record"][strategy]["nll"], abs=1e-4
        )
        assert all(row["generated"] == 0 and "humaneval_pass@1" not in row for row in results[strategy].values())


def test_report_html_in_headless_chromium(finished_run):
    """report.html loads with no console errors, no external resources, and its screenshot shows the table and every figure."""
    from chromium import chromium, load_page, region_std

    if chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    _, run = finished_run
    page = load_page(run / "report.html", REPORT_FACTS)
    facts = page.facts
    assert page.errors == [] and facts["external"] == []
    assert facts["results"]["tag"] == "TABLE" and facts["results"]["rows"] == 1 + len(STRATEGIES)
    assert all(strategy in facts["results"]["text"] for strategy in STRATEGIES)
    figures = sorted(p.stem for p in (run / "report").glob("*.png"))
    assert sorted(image["alt"] for image in facts["images"]) == figures and len(figures) == 6
    for image in facts["images"]:
        assert image["width"] > 0, image["alt"]
        assert region_std(page.screenshot, image["box"]) > 5, f"{image['alt']} is blank in the screenshot"
    assert region_std(page.screenshot, facts["results"]["box"]) > 5
    groups = json.loads((run / "experts" / "partition.json").read_text())["groups"]
    assert len(facts["clusters"]) == len(groups)
    for cluster in facts["clusters"]:
        assert cluster["prompts"] >= 1 and "expert experts/" in cluster["serves"]


def test_evaluate_reruns_exactly_when_its_inputs_change(finished_run, tmp_path, monkeypatch, capsys):
    """The evaluation's key covers the strategies and the test data's content; `run` re-evaluates after another `evaluate`."""
    config, run = finished_run
    calls = []

    def evaluated(command, strategies, scores=None):  # the real one is tested above; this is about when it runs
        calls.append((command.config.evaluate.data, list(strategies)))
        return json.loads((run / "eval.json").read_text())

    monkeypatch.setattr(evaluation, "evaluate_strategies", evaluated)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"instruction": "2 + 2?", "output": "4", "source": "math"}) + "\n")
    assert main(["evaluate", str(run), "--data", str(other), "--strategies", "single"]) == 0
    assert main(["evaluate", str(run), "--data", str(other), "--strategies", "single"]) == 0
    assert "skip evaluate: done" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--data", str(other), "--strategies", "single,oracle"]) == 0
    other.write_text(json.dumps({"instruction": "3 + 3?", "output": "6", "source": "math"}) + "\n")
    assert main(["evaluate", str(run), "--data", str(other), "--strategies", "single,oracle"]) == 0
    assert (
        "re-run evaluate: test data, stage scores/test changed" in capsys.readouterr().out
    )  # and the matrix it looks up
    assert main(["run", str(config)]) == 0
    printed = capsys.readouterr().out
    assert calls == [
        (str(other), ["single"]),
        (str(other), ["single", "oracle"]),
        (str(other), ["single", "oracle"]),
        ("mix4-packaged:test", STRATEGIES),
    ]
    timed = next(line for line in printed.splitlines() if "seconds per stage run now:" in line)
    assert (
        "seconds per stage run now: scores/test" in timed
        and "evaluate" in timed
        and "skipped (done earlier, same inputs): data, warmup" in printed
    )
