import pytest
import torch

from gradientspace.config import EvalConfig
from gradientspace.evaluation.evaluate import run_humaneval_case
from gradientspace.evaluation.metrics import METRICS, final_number, rouge_l
from gradientspace.experts.strategies import ROUTER_UNSURE
from gradientspace.routing.router import stratified_split, train_router


def test_final_number():
    assert final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert final_number("The answer is 12.0 apples") == "12"
    assert final_number("the result: -3.5, then 8") == "8"
    assert final_number("no digits") is None


def test_exact_match_by_number_in_numeric_domains_and_by_first_line_otherwise():
    exact, settings = METRICS["exact_match"], EvalConfig()  # numeric_domains: [math]
    match = lambda domain, prediction, reference: exact.score(prediction, reference, domain, settings) == 1.0
    assert match("math", "so it is 42 in total", "... #### 42")
    assert not match("math", "41", "#### 42")
    assert match("classification", " Yes.\nBecause the question is fine.", "yes")
    assert not match("classification", "No.", "Yes.")
    assert not match("answer_generation", "", "1:00 PM.")
    assert match("answer_generation", "1:00  pm", "1:00 PM.")
    # which domains are numeric is configuration, not a name in the code
    arithmetic = EvalConfig(numeric_domains=["arithmetic"])
    assert (
        exact.score("it is 42", "#### 42", "arithmetic", arithmetic) == 1.0
        and exact.score("it is 42", "#### 42", "math", arithmetic) == 0.0
    )
    assert not METRICS["rouge_l"].applies("arithmetic", arithmetic) and METRICS["rouge_l"].applies("math", arithmetic)


def test_a_metric_added_to_the_registry_is_scored_and_tabled(monkeypatch):
    from gradientspace.evaluation import metrics
    from gradientspace.evaluation.evaluate import markdown_table

    class AnswerLength(metrics.Metric):
        name, title, help = "length", "answer length", "characters of the answer, over 100"

        def score(self, prediction, reference, domain, settings):
            return min(len(prediction) / 100, 1.0)

    monkeypatch.setitem(metrics.METRICS, "length", AnswerLength())
    results = {
        "domains": ["a"],
        "metrics": ["length"],
        "latency": {"s": {"routing_ms": 1.0, "first_token_ms": 2.0, "tokens_per_second": 3.0}},
        "s": {"a": {"nll": 1.5}, "overall": {"nll": 1.5, "length": 0.25}},
    }
    table = markdown_table(results, ["s"])
    assert "| answer length |" in table and "| 0.250 |" in table and "exact match" not in table


def test_the_markdown_table_shows_data_labels_as_inert_text():
    from gradientspace.evaluation.evaluate import markdown_table

    label = "<script>alert(1)</script>|x\ny"
    results = {
        "domains": [label],
        "metrics": [],
        "latency": {"s": {"routing_ms": None, "first_token_ms": None, "tokens_per_second": None}},
        "s": {label: {"nll": 1.5}, "overall": {"nll": 1.5}},
    }
    header = markdown_table(results, ["s"]).splitlines()[0]
    assert "<script>" not in header and "&lt;script&gt;alert(1)&lt;/script&gt;\\|x y NLL" in header
    import re

    cells = re.split(r"(?<!\\)\|", header)[1:-1]  # split on the bars that are not escaped
    assert (
        len(cells) == 6
    )  # the strategy, the label's NLL, the overall NLL, three timings: the label did not split the row


def test_rouge_l_against_hand_computed_values():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "a c") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # LCS 2: precision 2/4, recall 2/2
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("The cats sat.", "the cat sat") == 1.0  # rouge_score's tokeniser and stemmer


PROBLEM = {
    "task_id": "test/0",
    "prompt": "def add(a, b):\n",
    "entry_point": "add",
    "test": "def check(f):\n    assert f(2, 3) == 5\n",
}


def test_humaneval_runner_passes_fails_and_times_out():
    assert run_humaneval_case(PROBLEM, "    return a + b\n")
    assert run_humaneval_case(PROBLEM, "```python\ndef add(a, b):\n    return b + a\n```")
    assert not run_humaneval_case(PROBLEM, "    return a - b\n")
    assert not run_humaneval_case(PROBLEM, "    while True: pass\n", timeout=1.0)


def test_router_learns_separable_prompts_and_respects_threshold():
    topics = {
        0: "Solve for x in the equation {} x + 3 = 10.",
        1: "Write a poem about the sea at dawn number {}.",
        2: "Write a Python function that sorts list number {}.",
    }
    texts = [topics[i % 3].format(i) for i in range(60)]
    labels = [i % 3 for i in range(60)]
    router, details = train_router(
        texts,
        labels,
        3,
        torch.device("cpu"),
        epochs=100,
        learning_rate=1e-2,
        validation_fraction=0.25,
        threshold=0.0,
        seed=0,
    )
    assert details["heldout_samples"] == 15 and details["heldout_accuracy"] == 1.0
    experts, probabilities, picks = router.route(["Write a poem about mountains."])
    assert experts == [1] == picks and 0 < probabilities[0] <= 1
    router.threshold = 1.01
    experts, _, picks = router.route(["Write a poem about mountains."])
    assert experts == [ROUTER_UNSURE] and picks == [1]  # the fall-back answers; the router's pick is still told


def test_routers_sharing_the_packaged_encoder_embed_the_same_prompts_once(monkeypatch):
    """Every routed strategy's router, then every strategy's choice, asks about the same prompts: embedded once, the same
    rows as embedding them afresh; other prompts are embedded anew."""
    from gradientspace.models import encoder
    from gradientspace.models.encoder import embed_texts
    from gradientspace.routing import router as routing

    calls = []
    monkeypatch.setattr(
        encoder, "embed_texts", lambda texts, *a, **k: calls.append(texts) or embed_texts(texts, *a, **k)
    )
    encoder._embedded.cache_clear()
    heads = [torch.nn.Linear(384, 3), torch.nn.Linear(384, 2)]
    routers = [routing.Router(head, 0.0) for head in heads]
    prompts = ["Solve 2 x + 3 = 7.", "Write a haiku about rain."]
    first, second = (r.probabilities(prompts) for r in routers)
    assert len(calls) == 1
    expected = embed_texts(prompts, torch.device("cpu"))
    with torch.no_grad():
        for head, got in zip(heads, (first, second)):
            assert torch.allclose(got, torch.softmax(head(expected), dim=1), atol=1e-6)
        routers[0].probabilities(prompts[:1])
    assert len(calls) == 2
    routers[1].probabilities(prompts)  # the first prompts are still kept: a run asks about its splits in turn
    assert len(calls) == 2


def test_stratified_split_keeps_every_group():
    train, held = stratified_split([0] * 10 + [1] * 5, 0.2, seed=0)
    assert len(held) == 3 and sorted(train + held) == list(range(15))
