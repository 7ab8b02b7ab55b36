"""Answer metrics on decoded test prompts: the registry `evaluate` reads.

Each metric scores one decoded answer against its reference, in the domains it applies to; the
evaluation averages it per domain and overall. `evaluate.metrics` picks which run, and a new metric
is one `Metric` subclass here and one entry in `METRICS` (its column then appears in `eval.md` and
the report). Which domains hold numeric answers is configuration (`evaluate.numeric_domains`), not
a domain name written here.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

from gradientspace.config import LIST_CHOICES, EvalConfig

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """GSM8K-style final answer: after `####` when present, else the last number in the text."""
    tail = text.split("####")[-1] if "####" in text else text
    numbers = NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    value = value.replace(",", "")
    try:
        number = float(value)
    except ValueError:
        return None
    return str(int(number)) if number == int(number) else str(number)


def normalised_answer(text: str) -> str:
    """First non-empty line, lower-cased, whitespace collapsed, surrounding punctuation stripped."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = " ".join(lines[0].lower().split()) if lines else ""
    return first.strip(" .,;:!?\"'`")


def answers_match(numeric: bool, prediction: str, reference: str) -> bool:
    """Numeric answers by their final number; others by their normalised first line (labels, yes/no, spans)."""
    if numeric:
        return final_number(prediction) == final_number(reference)
    return normalised_answer(prediction) == normalised_answer(reference)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Google's `rouge_score`, with its stemmer)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure


class Metric(ABC):
    name: str
    title: str  # its column header
    help: str

    def applies(self, domain: str | None, settings: EvalConfig) -> bool:
        """Whether it scores the decoded answers of `domain`."""
        return True

    @abstractmethod
    def score(self, prediction: str, reference: str, domain: str | None, settings: EvalConfig) -> float:
        """One answer's score in [0, 1]."""


class ExactMatch(Metric):
    name, title = "exact_match", "exact match"
    help = "the final number in `evaluate.numeric_domains`, else the normalised first line, equals the reference's"

    def score(self, prediction, reference, domain, settings):
        return float(answers_match(domain in settings.numeric_domains, prediction, reference))


class RougeL(Metric):
    name, title = "rouge_l", "ROUGE-L"
    help = "ROUGE-L F1 against the reference, outside `evaluate.numeric_domains` (a number is right or wrong)"

    def applies(self, domain, settings):
        return domain not in settings.numeric_domains

    def score(self, prediction, reference, domain, settings):
        return rouge_l(prediction, reference)


METRICS: dict[str, Metric] = {m.name: m for m in (ExactMatch(), RougeL())}
LIST_CHOICES["evaluate.metrics"] = METRICS  # config validation accepts exactly the registered names
