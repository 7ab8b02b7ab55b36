import pytest
import torch

from gradientspace.evaluation.evaluate import answers_match, final_number, rouge_l, run_humaneval_case
from gradientspace.routing.router import stratified_split, train_router
from gradientspace.experts.strategies import ROUTER_UNSURE


def test_final_number():
    assert final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert final_number("The answer is 12.0 apples") == "12"
    assert final_number("the result: -3.5, then 8") == "8"
    assert final_number("no digits") is None


def test_answers_match_by_number_for_math_and_by_first_line_otherwise():
    assert answers_match("math", "so it is 42 in total", "... #### 42")
    assert not answers_match("math", "41", "#### 42")
    assert answers_match("classification", " Yes.\nBecause the question is fine.", "yes")
    assert not answers_match("classification", "No.", "Yes.")
    assert not answers_match("answer_generation", "", "1:00 PM.")
    assert answers_match("answer_generation", "1:00  pm", "1:00 PM.")


def test_rouge_l_against_hand_computed_values():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "a c") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # LCS 2: precision 2/4, recall 2/2
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("The cats sat.", "the cat sat") == 1.0  # rouge_score's tokeniser and stemmer


PROBLEM = {"task_id": "test/0", "prompt": "def add(a, b):\n", "entry_point": "add", "test": "def check(f):\n    assert f(2, 3) == 5\n"}


def test_humaneval_runner_passes_fails_and_times_out():
    assert run_humaneval_case(PROBLEM, "    return a + b\n")
    assert run_humaneval_case(PROBLEM, "```python\ndef add(a, b):\n    return b + a\n```")
    assert not run_humaneval_case(PROBLEM, "    return a - b\n")
    assert not run_humaneval_case(PROBLEM, "    while True: pass\n", timeout=1.0)


def test_router_learns_separable_prompts_and_respects_threshold():
    topics = {0: "Solve for x in the equation {} x + 3 = 10.", 1: "Write a poem about the sea at dawn number {}.",
              2: "Write a Python function that sorts list number {}."}
    texts = [topics[i % 3].format(i) for i in range(60)]
    labels = [i % 3 for i in range(60)]
    router, details = train_router(texts, labels, 3, torch.device("cpu"), epochs=100, learning_rate=1e-2,
                                   validation_fraction=0.25, threshold=0.0, seed=0)
    assert details["heldout_samples"] == 15 and details["heldout_accuracy"] == 1.0
    experts, probabilities = router.route(["Write a poem about mountains."])
    assert experts == [1] and 0 < probabilities[0] <= 1
    router.threshold = 1.01
    assert router.route(["Write a poem about mountains."])[0] == [ROUTER_UNSURE]


def test_stratified_split_keeps_every_group():
    train, held = stratified_split([0] * 10 + [1] * 5, 0.2, seed=0)
    assert len(held) == 3 and sorted(train + held) == list(range(15))
