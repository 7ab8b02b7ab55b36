import json
import re

import pytest
from conftest import make_records

from gradientspace.data.loading import load_records
from gradientspace.data.recipes import gutenberg_body, mix4_packaged
from gradientspace.data.records import DataError, Record
from gradientspace.data.tokens import IGNORE, shuffled_length_batches, tokenize


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_alpaca_and_chat_records(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Add", "input": "2 and 3", "output": "5", "source": "math", "id": "a"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        ],
    )
    records, report = load_records(path)
    assert [r.id for r in records] == ["a", "d-1"]
    assert records[0].messages[0]["content"] == "Add\n\n2 and 3"
    assert records[1].response == "Hello" and records[1].source is None
    assert report.records == 2


def test_trl_and_sharegpt_layouts_read_as_the_same_chat_records(tmp_path):
    """One exchange written in each layout people keep data in: every file gives the same prompt turns and answer."""
    system, question, answer = "Be brief.", "What is 2 + 3?", "5"
    layouts = {
        "alpaca": [{"instruction": question, "output": answer}],
        "trl-strings": [{"prompt": question, "completion": answer}],
        "trl-messages": [
            {
                "prompt": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": answer}],
            }
        ],
        "sharegpt": [
            {
                "conversations": [
                    {"from": "system", "value": system},
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": answer},
                ],
                "source": "math",
            }
        ],
    }
    loaded = {name: load_records(write_jsonl(tmp_path / f"{name}.jsonl", rows))[0][0] for name, rows in layouts.items()}
    for record in loaded.values():
        assert record.response == answer and record.messages[-1] == {"role": "user", "content": question}
    assert (
        loaded["trl-messages"].messages
        == loaded["sharegpt"].messages
        == [{"role": "system", "content": system}, {"role": "user", "content": question}]
    )
    assert loaded["sharegpt"].source == "math"
    prompts, _ = load_records(
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": question}]), prompts_only=True
    )  # generation needs no answer
    assert prompts[0].messages == [{"role": "user", "content": question}]


def test_columns_named_otherwise_are_mapped_to_the_fields_of_a_layout(tmp_path):
    from gradientspace.config import load_config

    path = write_jsonl(
        tmp_path / "d.jsonl", [{"question": "What is 2 + 3?", "answer": "5", "topic": "math", "instruction": "ignored"}]
    )
    columns = load_config(
        None, {"data.columns": "{instruction: question, output: answer, source: topic}"}
    ).data.columns  # as --set gives it
    (record,), _ = load_records(path, columns=columns)
    assert (
        record.messages == [{"role": "user", "content": "What is 2 + 3?"}]
        and record.response == "5"
        and record.source == "math"
    )
    with pytest.raises(
        DataError,
        match="config key `data.columns`: `question` is not a record field; map columns to instruction, input",
    ):
        load_records(path, columns={"question": "instruction"})


def cache_dataset(cache, dataset_id: str, subset: str, splits: dict[str, list[dict]]) -> None:
    """Write `dataset_id` into a `datasets` cache as `load_dataset` leaves it after a download (no network here)."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = dataset_id.split("/")
    cache.mkdir(exist_ok=True)
    files = {split: write_jsonl(cache / f"{subset}-{split}.jsonl", rows) for split, rows in splits.items()}
    # `datasets` files a hub dataset under `<namespace>___<name>/<subset>/<version>/<hash>/<name>-<split>.arrow`
    builder = Json(
        cache_dir=str(cache),
        dataset_name=f"{namespace}___{name}",
        config_name=subset,
        config_id=subset,
        data_files=files,
        hash="0",
    )
    builder.dataset_name = name
    builder.download_and_prepare()


def test_a_dataset_id_in_the_hugging_face_cache_is_read_by_subset_and_split(tmp_path, monkeypatch):
    import datasets

    from gradientspace.config import load_config
    from gradientspace.data.loading import fingerprint

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the tool's default: offline, so only the cache is read
    rows = lambda split, n: [
        {"question": f"{split} question {i}", "answer": f"answer {i}", "topic": "math"} for i in range(n)
    ]
    cache_dataset(tmp_path / "cache", "acme/qa", "default", {"train": rows("train", 3), "test": rows("test", 2)})
    columns = {"instruction": "question", "output": "answer", "source": "topic"}
    train, _ = load_records("acme/qa", columns=columns)
    test, _ = load_records("acme/qa", columns=columns, split="test")
    assert [r.messages[0]["content"] for r in train] == [f"train question {i}" for i in range(3)] and len(test) == 2
    assert train[0].response == "answer 0" and train[0].source == "math" and train[0].id == "qa-0"
    assert fingerprint("acme/qa") == fingerprint("acme/qa") != fingerprint("acme/qa", split="test")
    with pytest.raises(DataError, match="data path `acme/qa`: no split `validation` .*set `data.split`"):
        load_records("acme/qa", columns=columns, split="validation")
    with pytest.raises(
        DataError,
        match="data path `acme/missing` is no file or folder, and no dataset of that id is in the local Hugging Face "
        "cache .*offline; set HF_HUB_OFFLINE=0",
    ):
        load_records("acme/missing")

    cache_dataset(tmp_path / "cache", "acme/qa", "hard", {"train": rows("hard", 4)})
    with pytest.raises(DataError, match="data path `acme/qa`: .*set `data.subset`"):  # two subsets cached, none named
        load_records("acme/qa", columns=columns)
    assert len(load_records("acme/qa", columns=columns, subset="hard")[0]) == 4

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "run.yaml").write_text("data: {path: acme/qa, subset: hard}\nevaluate: {data: acme/qa}\n")
    config = load_config(
        tmp_path / "conf" / "run.yaml"
    )  # a relative file path is read against the YAML's folder; an id is left as it is
    assert (config.data.path, config.evaluate.data, config.data.split, config.evaluate.split) == (
        "acme/qa",
        "acme/qa",
        "train",
        "test",
    )


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"question": "q", "answer": "a"},
            "no known layout in the fields `question`, `answer`: records need `instruction`/`output` (Alpaca), "
            "`messages` (chat), `prompt`/`completion` (TRL), `conversations` (ShareGPT)",
        ),
        ({"prompt": "q"}, "field `completion` is missing (TRL's layout needs `prompt` and `completion`)"),
        (
            {"prompt": "q", "completion": 3},
            "field `completion` must be a string or a list of {role, content} turns, got int",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
            "field `conversations[1]` must be an object with",
        ),
        ({"conversations": [{"from": "human", "value": "q"}]}, "field `messages` must end with an `assistant` message"),
    ],
)
def test_an_unknown_or_broken_layout_is_named(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: {message}")):
        load_records(path)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"instruction": "x"}, "output"),
        ({"instruction": "x", "output": "  "}, "output"),
        ({"instruction": 3, "output": "y"}, "instruction"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ('{"instruction": "x", "output": ', "invalid JSON"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, bad, field):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "ok", "output": "fine"}, bad])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:2" in str(err.value) and field in str(err.value)


def test_skip_bad_counts(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "ok", "output": "fine"}, {"instruction": "x"}, "not json"]
    )
    records, report = load_records(path, skip_bad=True)
    assert len(records) == 1 and report.skipped == 2


def test_parquet_and_json_files(tmp_path):
    from datasets import Dataset

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert [r.response for r in load_records(str(tmp_path / "d.parquet"))[0]] == ["a0", "a1", "a2"]
    assert len(load_records(str(tmp_path / "d.json"))[0]) == 3


def test_unknown_path_and_suffix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    # a file ending, never read as a dataset id
    with pytest.raises(DataError, match="data path missing.CSV does not exist"):
        load_records("missing.CSV")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        load_records(str(tmp_path / "d.csv"))


def test_response_mask_covers_exactly_the_response(tiny):
    tokenizer = tiny.tokenizer
    record = Record("x", [{"role": "user", "content": "What is two plus two?"}], "Four.")
    (example,) = tokenize([record], tokenizer, max_length=256)
    covered = [t for t, l in zip(example.input_ids, example.labels) if l != IGNORE]
    text = tokenizer.decode(covered)
    assert text.startswith("Four.") and "two plus two" not in text
    (instruction,) = tokenize([record], tokenizer, max_length=256, tokens="instruction")
    assert "two plus two" in tokenizer.decode(instruction.input_ids) and "Four" not in tokenizer.decode(
        instruction.input_ids
    )


def test_truncation_keeps_some_response_and_is_reported(tiny):
    record = Record("x", [{"role": "user", "content": "word " * 300}], "answer " * 100)
    (example,) = tokenize([record], tiny.tokenizer, max_length=128)
    assert example.truncated and len(example.input_ids) == 128
    assert sum(1 for l in example.labels if l != IGNORE) >= 32


def test_length_batches_cover_every_sample_once(tiny):
    examples = tokenize(make_records(37), tiny.tokenizer, max_length=128)
    batches = shuffled_length_batches(examples, batch_size=4, chunk_size=16, seed=1)
    seen = sorted(e.index for b in batches for e in b)
    assert seen == list(range(37))
    assert shuffled_length_batches(examples, 4, 16, seed=1)[0][0].index == batches[0][0].index


def test_mix4_packaged_is_deterministic_and_labelled():
    a = mix4_packaged(per_source=5, seed=0)
    b = mix4_packaged(per_source=5, seed=0)
    test = mix4_packaged(per_source=5, seed=0, split="test")
    assert [r.id for r in a] == [r.id for r in b] and [r.response for r in a] == [r.response for r in b]
    assert sorted({r.source for r in a}) == ["code", "finance", "math", "writing"]
    assert len(a) == 20
    train_prompts = {r.prompt_text for r in a}
    assert not train_prompts & {r.prompt_text for r in test}


def test_prompts_only_records_for_generation(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"instruction": "Say hi"}, {"messages": [{"role": "user", "content": "Hello?"}]}]
    )
    with pytest.raises(DataError, match="output"):
        load_records(path)
    records, _ = load_records(path, prompts_only=True)
    assert [r.prompt_text for r in records] == ["Say hi", "Hello?"]


def long_paragraphs(text: str) -> set[str]:
    """Paragraphs of 30+ words (story paragraphs, long answers), whitespace-folded; boilerplate lines are shorter."""
    import re

    return {" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 30}


@pytest.mark.parametrize("recipe", ["mix4-packaged"])
def test_recipe_train_and_test_share_no_paragraph(recipe):
    """No test prompt, answer, or long paragraph of either appears in training (the writing split once shared them)."""
    train, _ = load_records(recipe, per_source=60)
    test, _ = load_records(f"{recipe}:test", per_source=60)
    assert not {r.prompt_text for r in train} & {r.prompt_text for r in test}
    assert not {r.response for r in train} & {r.response for r in test}
    seen = set().union(*(long_paragraphs(r.prompt_text) | long_paragraphs(r.response) for r in train))
    shared = [
        (r.id, p[:60]) for r in test for p in long_paragraphs(r.prompt_text) | long_paragraphs(r.response) if p in seen
    ]
    assert not shared, f"{len(shared)} test paragraphs also in training, e.g. {shared[:3]}"


# What a licence, an e-book header or footer, or an editor's note looks like, in any domain: Project
# Gutenberg's name and markers, its numbered licence clauses (1.E.4., 1.F.3.), its header lines.
BOILERPLATE = re.compile(
    r"gutenberg|\*\*\* ?(start|end) of|^\s*1\.[A-F]\.|electronic works?|literary archive|this e-?book|"
    r"produced by|(redactor|transcriber|editor)'?s'? note|terms of use|licen[cs]e agreement|all rights reserved|"
    r"release date|most recently updated|royalty fee|disclaimer of (damages|warranties)",
    re.I | re.M,
)


@pytest.mark.parametrize("split", ["train", "test"])
def test_recipe_has_no_licence_header_or_footer_in_any_domain(split):
    """Every record of every domain (all of code, finance and writing; 1000 math problems) is scanned:
    the writing domain's Gutenberg file once gave 9 of 33 training and 18 of 31 test records of licence."""
    records = mix4_packaged(per_source=1000, seed=0, split=split)
    assert sorted({r.source for r in records}) == ["code", "finance", "math", "writing"]
    found = [(r.id, m.group(0)) for r in records if (m := BOILERPLATE.search(r.prompt_text + "\n" + r.response))]
    assert not found, f"{len(found)} records hold boilerplate, e.g. {found[:5]}"
    assert sum(r.source == "writing" for r in records) >= 15  # the story itself is still there


def test_gutenberg_body_cuts_header_footer_and_the_old_end_line():
    text = (
        "The Project Gutenberg eBook of X\n\nRelease date: 2006\n\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n"
        "Once upon a time.\n\nThe end.\n\nEnd of Project Gutenberg's X, by Y\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\n\n1.F.3. LIMITED RIGHT OF REPLACEMENT OR REFUND\n"
    )
    assert gutenberg_body(text).split() == "Once upon a time. The end.".split()
    assert gutenberg_body("No markers here.\n\nAt all.") == "No markers here.\n\nAt all."


def test_validation_split_is_seeded_stratified_and_disjoint_from_the_warmup():
    from gradientspace.clustering.stages import warmup_subset
    from gradientspace.config import load_config
    from gradientspace.data.records import validation_ids

    records = [Record(f"r{i}", [{"role": "user", "content": "q"}], "a", source=f"s{i % 3}") for i in range(60)]
    held = validation_ids(records, 0.2, seed=0)
    assert held == validation_ids(records, 0.2, seed=0) and held != validation_ids(records, 0.2, seed=1)
    assert len(held) == 12 and all(sum(r.id in held for r in records if r.source == s) == 4 for s in ("s0", "s1", "s2"))
    config = load_config(None, {"data.validation_fraction": 0.2, "warmup.fraction": 0.5})
    warmup = warmup_subset(records, config)
    assert len(warmup) == 24 and not {r.id for r in warmup} & held
    assert validation_ids(records, 0.0, seed=0) == set()


def test_file_records_are_an_arrow_table_tokenised_and_batched_like_lists(tmp_path, tiny):
    from gradientspace.data.loading import RecordTable
    from gradientspace.data.tokens import ExampleTable, LazyBatch

    rows = [
        {"id": r.id, "instruction": r.messages[0]["content"], "output": r.response, "source": r.source}
        for r in make_records(40)
    ]
    records, report = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert isinstance(records, RecordTable) and report.records == 40
    as_list = list(records)
    assert [r.id for r in as_list] == [f"r{i}" for i in range(40)] and records[3].source == as_list[3].source
    assert isinstance(records[:10], RecordTable) and len(records[:10]) == 10
    table = tokenize(records, tiny.tokenizer, max_length=48)
    plain = tokenize(as_list, tiny.tokenizer, max_length=48)
    assert isinstance(table, ExampleTable) and len(table) == len(plain)
    assert all(table[i] == plain[i] for i in range(len(plain)))
    assert table[3:11] == plain[3:11] and table[-2:] == plain[-2:]  # sliced as a list is
    lazy = shuffled_length_batches(table, 4, 16, seed=3)
    eager = shuffled_length_batches(plain, 4, 16, seed=3)
    assert isinstance(lazy[0], LazyBatch)
    assert [[e.index for e in b] for b in lazy] == [[e.index for e in b] for b in eager]
    again = tokenize(load_records(str(tmp_path / "d.jsonl"))[0], tiny.tokenizer, max_length=48)
    assert again.dataset.cache_files == table.dataset.cache_files, "a second load reuses the cached maps"


def test_line_numbers_count_blank_lines_and_ids_number_kept_records(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": "a", "output": "b"}, "", {"instruction": "skip me"}, "", {"instruction": "c", "output": "d"}],
    )
    with pytest.raises(DataError, match=r"d\.jsonl:3: missing field `output`"):
        load_records(path)
    records, report = load_records(path, skip_bad=True)
    assert [r.id for r in records] == ["d-0", "d-1"] and report.skipped == 1
    assert report.first_errors == [
        f"{path}:3: missing field `output` (records need `instruction`/`output` (Alpaca), `messages` (chat), `prompt`/`completion` (TRL), `conversations` (ShareGPT))"
    ]


def test_duplicate_ids_and_parallel_validation(tmp_path):
    rows = [{"id": f"x{i % 7}" if i == 9 else f"x{i}", "instruction": f"q{i}", "output": "a"} for i in range(12)]
    with pytest.raises(DataError, match="duplicate id `x2`"):
        load_records(write_jsonl(tmp_path / "dup.jsonl", rows))
    rows[9]["id"] = "x9"
    serial, _ = load_records(write_jsonl(tmp_path / "ok.jsonl", rows))
    parallel, _ = load_records(str(tmp_path / "ok.jsonl"), num_proc=2)
    assert list(parallel) == list(serial)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    """Excel and Notepad write one; only the file's first line may carry it."""
    import gzip

    row = json.dumps({"instruction": "caf\u00e9", "output": "ok"}).encode()
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + row + b"\n" + row.replace(b"ok", b"two") + b"\n")
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf[" + row + b"]")
    with gzip.open(tmp_path / "g.jsonl.gz", "wb") as handle:
        handle.write(b"\xef\xbb\xbf" + row + b"\n")
    for name in ("d.jsonl", "d.json", "g.jsonl.gz"):
        records, _ = load_records(str(tmp_path / name))
        assert records[0].messages[0]["content"] == "caf\u00e9" and records[0].response == "ok", name
    (tmp_path / "d.jsonl").write_bytes(
        row + b"\n\xef\xbb\xbf" + row + b"\n"
    )  # a mark inside the file is a stray character
    with pytest.raises(DataError, match="d.jsonl:2: invalid JSON"):
        load_records(str(tmp_path / "d.jsonl"))


def test_encoding_faults_are_bad_records_that_skip_bad_skips_and_counts(tmp_path):
    lines = [
        json.dumps({"instruction": "fine", "output": "ok"}).encode(),
        b'{"instruction": "caf\xe9", "output": "latin-1"}',
        json.dumps({"instruction": "\u20ac and \u00e9", "output": "still fine"}).encode(),
        b'{"instruction": "a", "output": "\\ud83d"}',
    ]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    records, report = load_records(str(tmp_path / "d.jsonl"), skip_bad=True)
    assert [r.response for r in records] == ["ok", "still fine"] and report.skipped == 2
    assert report.first_errors == [
        f"{tmp_path}/d.jsonl:2: not valid UTF-8 (byte 0xE9 at column 21)",
        f"{tmp_path}/d.jsonl:4: field `output` holds a lone surrogate (U+D83D at character 1), which is not Unicode text",
    ]


def test_a_compressed_file_is_cached_by_its_content(tmp_path):
    """`datasets` cannot read a .gz as Latin-1, so the loader reads it itself; rewriting the file must not serve the old rows."""
    import gzip

    for answer in ("first", "second"):
        with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as handle:
            handle.write(json.dumps({"instruction": "q", "output": answer}) + "\n")
        assert [r.response for r in load_records(str(tmp_path / "d.jsonl.gz"))[0]] == [answer]
