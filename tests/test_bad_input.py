"""Bad input, in every form a user gives it, ends in one line on stderr that names the culprit.

Each case runs the CLI in-process and asserts: its exit status (2, or 75 when the run is busy
with another command); exactly one line on stderr, naming the file, line, field or config key;
no traceback anywhere; and every file the user gave (data, config, an existing run directory)
byte-for-byte unchanged. Every case fails before a model loads, so the matrix costs
milliseconds a case after the one clustered run it shares.
"""

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_records

from gradientspace.cli import main
from gradientspace.runs import RunLock

RUN_FLAGS = [
    "--method",
    "gradientspace",
    "--set",
    "model.lora_rank=2",
    "--set",
    "sketch.rank=4",
    "--set",
    "warmup.fraction=0.25",
    "--max-length",
    "96",
]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


GOOD_ROWS = [
    {"id": r.id, "instruction": r.messages[0]["content"], "output": r.response, "source": r.source}
    for r in make_records(12)
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A clustered tiny run, made once; cases that damage a run work on a copy."""
    root = tmp_path_factory.mktemp("bad-input")
    data = jsonl(root / "train.jsonl", GOOD_ROWS)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert (
            main(
                [
                    "cluster",
                    "--model",
                    "tiny-random",
                    "--data",
                    str(data),
                    "--k",
                    "2",
                    "--out",
                    str(root / "run"),
                    *RUN_FLAGS,
                ]
            )
            == 0
        )
    (root / "cluster-stdout.txt").write_text(printed.getvalue())
    return root


def test_the_cluster_summary_names_each_cluster_by_its_terms(finished):
    terms = json.loads((finished / "run" / "manifest.json").read_text())["stages"]["cluster"]["terms"]
    assert set(terms) == {"0", "1"} and all(terms.values())
    printed = (finished / "cluster-stdout.txt").read_text()
    for cluster, words in terms.items():
        assert f"  cluster {cluster:<3} {', '.join(words)}\n" in printed


class Case:
    """A user's folder (`user/`: their data, configs, run) and the command they type."""

    def __init__(self, root: Path, finished: Path):
        self.user = root / "user"
        self.user.mkdir()
        self.data = jsonl(self.user / "train.jsonl", GOOD_ROWS)
        self.finished = finished

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.user / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path

    def link(self, name: str, target: str) -> Path:
        (self.user / name).symlink_to(target)
        return self.user / name

    def fifo(self, name: str) -> Path:
        """A named pipe with no writer: reading it would wait for ever."""
        os.mkfifo(self.user / name)
        return self.user / name

    def socket(self, name: str) -> Path:
        import socket

        self.bound = socket.socket(socket.AF_UNIX)
        self.bound.bind(str(self.user / name))
        return self.user / name

    def folder(self, name: str, *files: str) -> Path:
        """A folder of the user's holding `files` (each with a line of text in it)."""
        for file in files:
            self.file(f"{name}/{file}", "the user's own\n")
        (self.user / name).mkdir(exist_ok=True)
        return self.user / name

    def lines(self, name: str, *lines: bytes, opener=open) -> Path:
        """A data file written byte for byte, one record a line."""
        path = self.user / name
        with opener(path, "wb") as handle:
            handle.write(b"".join(line + b"\n" for line in lines))
        return path

    def locked_run(self) -> Path:
        """A copy of the finished run whose lock this process holds, as another command running on it would."""
        run = self.run_copy()
        self.held = RunLock(run)
        self.held.acquire()
        return run

    def close(self) -> None:
        if hasattr(self, "held"):
            self.held.release()
        if hasattr(self, "bound"):
            self.bound.close()

    def run_copy(self) -> Path:
        return Path(shutil.copytree(self.finished / "run", self.user / "run"))

    def cluster(self, *flags: str, data: Path | None = None, out: Path | None = None) -> list[str]:
        return [
            "cluster",
            "--model",
            "tiny-random",
            "--data",
            str(data or self.data),
            "--out",
            str(out or self.user / "out"),
            "--k",
            "2",
            *RUN_FLAGS,
            *flags,
        ]


def damaged(case: "Case", relative: str, text: str | None) -> Path:
    """A copy of the finished run with one file overwritten by `text` (deleted when None)."""
    run = case.run_copy()
    if text is None:
        (run / relative).unlink()
    else:
        (run / relative).write_text(text)
    return run


def manifest_without(run: Path, key: str) -> Path:
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest[key]
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


# (case id, how the user gets there → argv, what the one line must name)
CASES = [
    # config values
    ("max-length-zero", lambda c: c.cluster("--max-length", "0"), "`data.max_length`: 0 must be at least 1"),
    ("max-length-negative", lambda c: c.cluster("--max-length", "-5"), "`data.max_length`: -5"),
    (
        "max-length-below-template",
        lambda c: c.cluster("--max-length", "20"),
        "`data.max_length`: 20 tokens cannot hold the chat template",
    ),
    (
        "negative-warmup-lr",
        lambda c: c.cluster("--set", "warmup.learning_rate=-1e-4"),
        "`warmup.learning_rate`: -0.0001 must be greater than 0",
    ),
    (
        "zero-expert-lr",
        lambda c: c.cluster("--set", "experts.learning_rate=0"),
        "`experts.learning_rate`: 0.0 must be greater than 0",
    ),
    ("zero-batch-size", lambda c: c.cluster("--batch-size", "0"), "`gradients.batch_size`: 0 must be at least 1"),
    (
        "fraction-above-one",
        lambda c: c.cluster("--set", "warmup.fraction=1.5"),
        "`warmup.fraction`: 1.5 must be in (0, 1]",
    ),
    (
        "validation-fraction-one",
        lambda c: c.cluster("--set", "router.validation_fraction=1"),
        "`router.validation_fraction`",
    ),
    ("k-larger-than-data", lambda c: c.cluster("--k", "50"), "`cluster.k`: 50 clusters for only 12 records"),
    ("k-one", lambda c: c.cluster("--k", "1"), "`cluster.k`: 1 must be at least 2"),
    ("k-not-a-number", lambda c: c.cluster("--k", "many"), "`cluster.k`"),
    ("unknown-key", lambda c: c.cluster("--set", "sketch.rnak=3"), "`sketch.rnak`"),
    (
        "internal-rank-below-rank",
        lambda c: c.cluster("--set", "sketch.internal_rank=2"),
        "`sketch.internal_rank`: 2 must be at least `sketch.rank`",
    ),
    (
        "snapshot-after-last-epoch",
        lambda c: c.cluster("--set", "experts.snapshot_epochs=[99]"),
        "`experts.snapshot_epochs`",
    ),
    (
        "keep-rule-unknown",
        lambda c: c.cluster("--set", "experts.keep=sometimes"),
        "config key `experts.keep`: 'sometimes' must be `validation` or `all`",
    ),
    (
        "blend-weight-above-one",
        lambda c: c.cluster("--set", "experts.blend_weights=[0.5,1.5]"),
        "config key `experts.blend_weights`: 1.5 must be in (0, 1]",
    ),
    (
        "blend-weights-empty",
        lambda c: c.cluster("--set", "experts.blend_weights=[]"),
        "config key `experts.blend_weights`: must name at least one weight",
    ),
    (
        "keep-confidence-one",
        lambda c: c.cluster("--set", "experts.keep_confidence=1"),
        "config key `experts.keep_confidence`: 1.0 must be in (0, 1)",
    ),
    (
        "continued-without-generalist",
        lambda c: c.cluster("--set", "experts.strategies=[routed,single-continued]", "--set", "experts.init=fresh"),
        "config key `experts.init`: `single-continued` continues the generalist",
    ),
    ("bad-device", lambda c: c.cluster("--set", "model.device=gpu"), "`model.device`"),
    ("unknown-method", lambda c: c.cluster("--method", "kmeans"), "`cluster.method`"),
    (
        "unknown-strategy-in-config",
        lambda c: c.cluster("--set", "experts.strategies=routed,bogus"),
        "`experts.strategies`: 'bogus'",
    ),
    ("negative-seed", lambda c: c.cluster("--seed", "-1"), "`seed`: -1 must be at least 0"),
    (
        "zero-checkpoint-every",
        lambda c: c.cluster("--set", "gradients.checkpoint_every=0"),
        "`gradients.checkpoint_every`",
    ),
    # models
    (
        "unknown-model",
        lambda c: c.cluster("--model", "no-such-model"),
        "`model.name`: unknown model `no-such-model`: not a built-in alias (smollm2-135m, qwen2.5-coder-0.5b, tiny-random)",
    ),
    ("model-folder-without-config", lambda c: c.cluster("--model", str(c.user)), "`model.name`: folder"),
    # config files
    (
        "config-not-yaml",
        lambda c: ["cluster", "--config", str(c.file("c.yaml", "model: [unclosed\n"))],
        "c.yaml is not valid YAML",
    ),
    ("config-missing", lambda c: ["cluster", "--config", str(c.user / "nope.yaml")], "nope.yaml does not exist"),
    ("config-a-list", lambda c: ["run", str(c.file("c.yaml", "- a\n- b\n"))], "c.yaml must hold a mapping"),
    (
        "config-section-not-mapping",
        lambda c: ["run", str(c.file("c.yaml", "sketch: 3\n"))],
        "`sketch` must be a mapping",
    ),
    # data files and records
    ("data-missing", lambda c: c.cluster(data=c.user / "missing.jsonl"), "`data.path`: "),
    (
        "data-invalid-json-line",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [GOOD_ROWS[0], "{not json"])),
        "d.jsonl:2: invalid JSON",
    ),
    (
        "data-columns-not-a-field",
        lambda c: c.cluster("--set", "data.columns={question: instruction}"),
        "config key `data.columns`: `question` is not a record field; map columns to instruction, input, output",
    ),
    (
        "report-to-unknown-tracker",
        lambda c: c.cluster("--set", "train.report_to=[tensorbord]"),
        "config key `train.report_to`: `tensorbord` is not a tracker transformers knows (choose from ",
    ),
    (
        "data-columns-not-a-mapping",
        lambda c: c.cluster("--set", "data.columns=question"),
        "config key `data.columns`: expected a mapping such as {instruction: question, output: answer}, got 'question'",
    ),
    (
        "data-an-empty-file",
        lambda c: c.cluster(data=c.file("d.jsonl", "")),
        "config key `data.path`: {}d.jsonl is empty (0 bytes)",
    ),
    (
        "data-a-loop-of-links",
        lambda c: c.cluster(data=c.link("d.jsonl", "d.jsonl")),
        "config key `data.path`: {}d.jsonl is a loop of symbolic links",
    ),
    (
        "data-a-named-pipe",
        lambda c: c.cluster(data=c.fifo("d.jsonl")),
        "config key `data.path`: {}d.jsonl is a named pipe (FIFO), not a file: give a .jsonl/.json/.parquet file or a saved datasets folder",
    ),
    (
        "data-a-socket",
        lambda c: c.cluster(data=c.socket("d.jsonl")),
        "config key `data.path`: {}d.jsonl is a socket, not a file",
    ),
    (
        "evaluate-data-a-named-pipe",
        lambda c: ["evaluate", str(c.run_copy()), "--data", str(c.fifo("test.jsonl"))],
        "config key `evaluate.data`: {}test.jsonl is a named pipe (FIFO), not a file",
    ),
    (
        "evaluate-data-empty",
        lambda c: ["evaluate", str(c.run_copy()), "--data", str(c.file("test.jsonl", ""))],
        "config key `evaluate.data`: {}test.jsonl is empty (0 bytes)",
    ),
    (
        "record-missing-output",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [GOOD_ROWS[0], {"instruction": "a"}])),
        "d.jsonl:2: missing field `output`",
    ),
    (
        "record-output-not-string",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [{"instruction": "a", "output": 3}])),
        "d.jsonl:1: field `output` must be a string",
    ),
    (
        "record-empty-output",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [{"instruction": "a", "output": "  "}])),
        "d.jsonl:1: field `output` is empty",
    ),
    (
        "messages-not-ending-with-assistant",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])),
        "d.jsonl:1: field `messages` must end with an `assistant` message",
    ),
    (
        "record-not-an-object",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", ["[1, 2]"])),
        "d.jsonl:1: expected a JSON object",
    ),
    (
        "duplicate-ids",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [GOOD_ROWS[0], GOOD_ROWS[0]])),
        "duplicate id `r0`",
    ),
    ("empty-data-file", lambda c: c.cluster(data=c.file("d.jsonl", "\n")), "d.jsonl: no usable records"),
    (
        "unsupported-extension",
        lambda c: c.cluster(data=c.file("d.txt", "hello\n")),
        "d.txt: unsupported file type `.txt`",
    ),
    (
        "json-not-a-list",
        lambda c: c.cluster(data=c.file("d.json", '{"rows": 1}')),
        "d.json: a .json file must hold a list",
    ),
    (
        "oracle-without-sources",
        lambda c: c.cluster(
            "--set",
            "experts.strategies=[routed,oracle]",
            data=jsonl(c.user / "d.jsonl", [{k: v for k, v in r.items() if k != "source"} for r in GOOD_ROWS]),
        ),
        "`experts.strategies`: `oracle` needs a `source`",
    ),
    # command lines
    ("flag-not-an-int", lambda c: ["cluster", "--rank", "x"], "argument --rank: invalid int value: 'x'"),
    ("unknown-command", lambda c: ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("no-command", lambda c: [], "the following arguments are required: command"),
    ("unknown-flag", lambda c: ["cluster", "--colour", "red"], "unrecognized arguments: --colour red"),
    ("set-without-equals", lambda c: c.cluster("--set", "sketch.rank"), "--set expects KEY=VALUE, got 'sketch.rank'"),
    (
        "unknown-strategy-flag",
        lambda c: ["evaluate", str(c.run_copy()), "--strategies", "routed,nope"],
        "--strategies: 'nope' is not a strategy",
    ),
    (
        "generate-without-prompt",
        lambda c: ["generate", str(c.run_copy())],
        "give exactly one of --prompt TEXT or --data FILE",
    ),
    # run directories
    ("run-dir-missing", lambda c: ["train-experts", str(c.user / "no-run")], "no-run does not exist"),
    ("run-dir-without-manifest", lambda c: ["train-router", str(c.user)], "(no manifest.json)"),
    (
        "manifest-not-json",
        lambda c: ["train-experts", str(damaged(c, "manifest.json", "{oops"))],
        "manifest.json is not valid JSON",
    ),
    (
        "manifest-without-config",
        lambda c: ["evaluate", str(manifest_without(c.run_copy(), "config"))],
        "manifest.json: field `config` is missing",
    ),
    (
        "clusters-file-corrupt",
        lambda c: ["report", str(damaged(c, "clusters.jsonl", "{bad\n"))],
        "run/clusters.jsonl changed since stage `cluster` wrote it (truncated or edited)",
    ),
    (
        "warmup-adapter-deleted",
        lambda c: ["generate", str(damaged(c, "warmup/adapter_model.safetensors", None)), "--prompt", "hi"],
        "warmup/adapter_model.safetensors is missing (an output of stage `warmup`)",
    ),
    (
        "run-made-with-other-config",
        lambda c: c.cluster("--k", "3", "--max-length", "64", out=c.run_copy()),
        "cluster.k 2 → 3; data.max_length 96 → 64. Pass --overwrite",
    ),
    (
        "evaluate-data-missing",
        lambda c: ["evaluate", str(c.run_copy()), "--data", str(c.user / "test.jsonl")],
        "`evaluate.data`: ",
    ),
    (
        "evaluate-data-bad-record",
        lambda c: ["evaluate", str(c.run_copy()), "--data", str(jsonl(c.user / "test.jsonl", [{"instruction": "q"}]))],
        "test.jsonl:1: missing field `output` (records need `instruction`/`output` (Alpaca), `messages` (chat), `prompt`/`completion` (TRL), `conversations` (ShareGPT)) (the test data is scored whole",
    ),
    # output directories
    ("out-is-a-file", lambda c: [*c.cluster(), "--out", str(c.file("taken", "x"))], "config key `out`: "),
    ("out-below-a-file", lambda c: [*c.cluster(), "--out", str(c.file("taken", "x") / "run")], "is a file"),
    (
        "out-not-writable",
        lambda c: [*c.cluster(), "--out", "/proc/gradientspace-run"],
        "config key `out`: cannot write in /proc",
    ),
]


GOOD = [json.dumps(row).encode() for row in GOOD_ROWS]
CAFE = '{"instruction": "caf\u00e9", "output": "y"}'  # é is 0xE9 in Latin-1: column 21 of the line
SAME = json.dumps({"instruction": "the same prompt", "output": "the same answer"})
UTF8_FAULTS = [  # (case id, the bad line's bytes, what the line must name)
    ("invalid-utf8-byte", CAFE.encode("latin-1"), "d.jsonl:2: not valid UTF-8 (byte 0xE9 at column 21)"),
    ("truncated-utf8-sequence", b'{"instruction": "caf\xc3', "d.jsonl:2: not valid UTF-8 (byte 0xC3 at column 21)"),
    (
        "overlong-utf8",
        b'{"instruction": "a\xc0\xaf", "output": "y"}',
        "d.jsonl:2: not valid UTF-8 (byte 0xC0 at column 19)",
    ),
    (
        "utf8-encoded-surrogate",
        b'{"instruction": "a\xed\xa0\x80", "output": "y"}',
        "d.jsonl:2: not valid UTF-8 (byte 0xED at column 19)",
    ),
    (
        "stray-continuation-byte",
        b'{"instruction": "\xe2\x82\xac\x80", "output": "y"}',
        "d.jsonl:2: not valid UTF-8 (byte 0x80 at column 19)",
    ),
    (
        "nul-byte-in-a-line",
        b'{"instruction": "a\x00", "output": "y"}',
        "d.jsonl:2: not valid UTF-8 (a NUL byte at column 19)",
    ),
    (
        "lone-surrogate-in-output",
        b'{"instruction": "a", "output": "x\\ud800"}',
        "d.jsonl:2: field `output` holds a lone surrogate (U+D800 at character 2)",
    ),
    (
        "lone-surrogate-in-messages",
        b'{"messages": [{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "y"}]}',
        "d.jsonl:2: field `messages[0].content` holds a lone surrogate (U+DFFF",
    ),
    (
        "lone-surrogate-in-id",
        b'{"id": "\\udc00", "instruction": "a", "output": "y"}',
        "d.jsonl:2: field `id` holds a lone surrogate",
    ),
]


def utf16_without_bom(c: "Case") -> Path:
    return c.file("d.jsonl", "".join(json.dumps(row) + "\n" for row in GOOD_ROWS).encode("utf-16-le"))


def yaml_config(c: "Case", text: str) -> list[str]:
    """`cluster --config c.yaml` with the data and the output folder given as flags."""
    return [
        "cluster",
        "--config",
        str(c.file("c.yaml", text)),
        "--model",
        "tiny-random",
        "--data",
        str(c.data),
        "--out",
        str(c.user / "out"),
    ]


CASES += [
    # the output folder is the run's alone; no file the user gave is ever written
    (
        "out-is-a-users-folder",
        lambda c: c.cluster(out=c.folder("proj", "notes.txt")),
        "config key `out`: {}proj is not empty (notes.txt) and is not a gradientspace run (no manifest.json); give a new or empty folder",
    ),
    (
        "data-in-the-out-folder",
        lambda c: c.cluster(data=jsonl(c.folder("proj") / "samples.jsonl", GOOD_ROWS), out=c.user / "proj"),
        "proj is not empty (samples.jsonl) and is not a gradientspace run",
    ),
    (
        "out-holds-run-file-names",
        lambda c: c.cluster(
            out=c.folder("proj", "clusters.jsonl", "eval.json", "eval.md", "report.html", "report/a.png")
        ),
        "proj is not empty (clusters.jsonl, eval.json, eval.md and 2 more)",
    ),
    (
        "out-holds-only-a-hidden-file",
        lambda c: c.cluster(out=c.folder("proj", ".DS_Store")),
        "proj is not empty (.DS_Store)",
    ),
    (
        "out-holds-a-foreign-manifest",
        lambda c: c.cluster(out=jsonl(c.folder("proj") / "manifest.json", [{"name": "my app"}]).parent),
        "proj/manifest.json was not written by gradientspace (it has no `config` and `stages`)",
    ),
    (
        "out-manifest-not-json",
        lambda c: c.cluster(out=c.file("proj/manifest.json", "{oops").parent),
        "proj/manifest.json is not valid JSON",
    ),
    (
        "run-config-out-is-a-users-folder",
        lambda c: ["run", str(c.file("c.yaml", f"out: {c.folder('proj', 'thesis.tex')}\n"))],
        "proj is not empty (thesis.tex)",
    ),
    (
        "data-inside-the-run",
        lambda c: c.cluster(data=jsonl(c.run_copy() / "mine.jsonl", GOOD_ROWS), out=c.user / "run"),
        "config key `data.path`: {}run/mine.jsonl lies inside the run directory",
    ),
    (
        "evaluate-data-inside-the-run",
        lambda c: ["evaluate", str(c.run_copy()), "--data", str(jsonl(c.user / "run" / "test.jsonl", GOOD_ROWS))],
        "config key `evaluate.data`: {}run/test.jsonl lies inside the run directory",
    ),
    (
        "train-experts-on-a-foreign-manifest",
        lambda c: ["train-experts", str(jsonl(c.folder("proj") / "manifest.json", [{"name": "my app"}]).parent)],
        "manifest.json: field `config` is missing or not a mapping, so {}proj is not a run gradientspace made",
    ),
    (
        "manifest-stages-not-a-mapping",
        lambda c: ["train-router", str(damaged(c, "manifest.json", json.dumps({"config": {}, "stages": 3})))],
        "manifest.json: field `stages` is missing or not a mapping",
    ),
    (
        "out-inside-a-data-folder",
        lambda c: c.cluster(data=saved_dataset(c), out=c.user / "dataset" / "run"),
        "config key `out`: {}dataset/run lies inside the data folder {}dataset (`data.path`)",
    ),
    (
        "out-equals-the-data-file",
        lambda c: c.cluster(out=c.data),
        "config key `out`: {}train.jsonl cannot be a run directory",
    ),
    # a run another command is working on (this process holds its lock): refused at once, the holder named
    ("cluster-on-a-run-in-use", lambda c: c.cluster(out=c.locked_run()), "{}run is in use by process {pid} on "),
    (
        "train-experts-on-a-run-in-use",
        lambda c: ["train-experts", str(c.locked_run())],
        "{}run is in use by process {pid} on ",
    ),
    (
        "evaluate-on-a-run-in-use",
        lambda c: ["evaluate", str(c.locked_run())],
        "wait for it to finish (or stop it), then run this command again",
    ),
    # encodings: every record that cannot be read is named by file, line and column
    *[
        (name, lambda c, line=line: c.cluster(data=c.lines("d.jsonl", GOOD[0], line, *GOOD[1:])), names)
        for name, line, names in UTF8_FAULTS
    ],
    (
        "latin-1-file",
        lambda c: c.cluster(data=c.lines("d.jsonl", CAFE.encode("latin-1"), *GOOD)),
        "d.jsonl:1: not valid UTF-8 (byte 0xE9 at column 21)",
    ),
    (
        "utf16-file",
        lambda c: c.cluster(data=c.file("d.jsonl", "".join(json.dumps(r) + "\n" for r in GOOD_ROWS).encode("utf-16"))),
        "d.jsonl: the file is UTF-16 (it starts with the byte-order mark FF FE), not UTF-8: save it as UTF-8",
    ),
    (
        "utf16-big-endian-file",
        lambda c: c.cluster(data=c.file("d.jsonl", "\ufeff".encode("utf-16-be") + SAME.encode("utf-16-be"))),
        "d.jsonl: the file is UTF-16 (it starts with the byte-order mark FE FF)",
    ),
    (
        "utf16-file-with-skip-bad",
        lambda c: c.cluster("--skip-bad", data=c.file("d.jsonl", SAME.encode("utf-16"))),
        "d.jsonl: the file is UTF-16",
    ),
    (
        "utf16-file-without-bom",
        lambda c: c.cluster(data=utf16_without_bom(c)),
        "d.jsonl:1: not valid UTF-8 (a NUL byte at column 2) (UTF-16 text?",
    ),
    (
        "utf32-file",
        lambda c: c.cluster(data=c.file("d.jsonl", SAME.encode("utf-32"))),
        "d.jsonl: the file is UTF-32 (it starts with the byte-order mark FF FE 00 00)",
    ),
    (
        "invalid-byte-in-gzipped-jsonl",
        lambda c: c.cluster(data=c.lines("d.jsonl.gz", GOOD[0], CAFE.encode("latin-1"), opener=gzip.open)),
        "d.jsonl.gz:2: not valid UTF-8 (byte 0xE9 at column 21)",
    ),
    (
        "invalid-byte-in-json-file",
        lambda c: c.cluster(data=c.file("d.json", b"[\n" + GOOD[0] + b",\n" + CAFE.encode("latin-1") + b"\n]\n")),
        "d.json:3: not valid UTF-8 (byte 0xE9 at column 21)",
    ),
    (
        "utf16-json-file",
        lambda c: c.cluster(data=c.file("d.json", json.dumps(GOOD_ROWS).encode("utf-16"))),
        "d.json:1: the file is UTF-16",
    ),
    (
        "lone-surrogate-in-json-file",
        lambda c: c.cluster(data=c.file("d.json", b'[{"instruction": "a", "output": "\\udc80"}]')),
        "d.json record 0: field `output` holds a lone surrogate (U+DC80",
    ),
    (
        "skip-bad-when-every-line-is-bad",
        lambda c: c.cluster("--skip-bad", data=c.lines("d.jsonl", CAFE.encode("latin-1"), b'{"instruction": "\xff"}')),
        "d.jsonl: no usable records (2 skipped as bad)",
    ),
    (
        "invalid-byte-in-evaluate-data",
        lambda c: ["evaluate", str(c.run_copy()), "--data", str(c.lines("test.jsonl", CAFE.encode("latin-1")))],
        "test.jsonl:1: not valid UTF-8 (byte 0xE9 at column 21) (the test data is scored whole: mend or remove the record)",
    ),
    (
        "invalid-byte-in-generate-prompts",
        lambda c: ["generate", str(c.run_copy()), "--data", str(c.lines("p.jsonl", b'{"instruction": "\xe9"}'))],
        "p.jsonl:1: not valid UTF-8 (byte 0xE9 at column 18)",
    ),
    (
        "invalid-byte-in-config-file",
        lambda c: ["cluster", "--config", str(c.file("c.yaml", b"seed: 1\n# caf\xe9\n"))],
        "c.yaml:2: not valid UTF-8 (byte 0xE9 at column 6)",
    ),
    (
        "utf16-config-file",
        lambda c: ["cluster", "--config", str(c.file("c.yaml", "seed: 1\n".encode("utf-16")))],
        "c.yaml:1: the file is UTF-16",
    ),
    (
        "config-file-is-a-folder",
        lambda c: ["cluster", "--config", str(c.folder("configs"))],
        "config file {}configs is a folder",
    ),
    # numbers: NaN and infinities anywhere in the config, every CLI number
    (
        "warmup-lr-nan",
        lambda c: c.cluster("--set", "warmup.learning_rate=nan"),
        "config key `warmup.learning_rate`: nan is not a finite number",
    ),
    (
        "expert-lr-inf",
        lambda c: c.cluster("--set", "experts.learning_rate=inf"),
        "config key `experts.learning_rate`: inf is not a finite number",
    ),
    (
        "router-lr-minus-inf",
        lambda c: c.cluster("--set", "router.learning_rate=-.inf"),
        "config key `router.learning_rate`: -inf is not a finite number",
    ),
    (
        "lr-overflowing-to-inf",
        lambda c: c.cluster("--set", "warmup.learning_rate=1e999"),
        "config key `warmup.learning_rate`: inf is not a finite number",
    ),
    (
        "warmup-fraction-nan",
        lambda c: c.cluster("--set", "warmup.fraction=NaN"),
        "config key `warmup.fraction`: nan is not a finite number",
    ),
    (
        "validation-fraction-nan",
        lambda c: c.cluster("--set", "data.validation_fraction=nan"),
        "config key `data.validation_fraction`: nan",
    ),
    (
        "lora-alpha-nan",
        lambda c: c.cluster("--set", "model.lora_alpha=nan"),
        "config key `model.lora_alpha`: nan is not a finite number",
    ),
    (
        "elrea-temperature-inf",
        lambda c: c.cluster("--set", "evaluate.elrea_temperature=inf"),
        "config key `evaluate.elrea_temperature`: inf",
    ),
    (
        "warmup-ratio-nan",
        lambda c: c.cluster("--set", "experts.warmup_ratio=nan"),
        "config key `experts.warmup_ratio`: nan",
    ),
    (
        "nan-in-a-yaml-file",
        lambda c: yaml_config(c, "warmup: {learning_rate: .nan}\n"),
        "config key `warmup.learning_rate`: nan is not a finite number",
    ),
    (
        "generate-threshold-nan",
        lambda c: ["generate", str(c.run_copy()), "--prompt", "hi", "--threshold", "nan"],
        "config key `router.threshold`: nan is not a finite number",
    ),
    (
        "generate-threshold-inf",
        lambda c: ["generate", str(c.run_copy()), "--prompt", "hi", "--threshold", "inf"],
        "config key `router.threshold`: inf is not a finite number",
    ),
    (
        "generate-threshold-negative",
        lambda c: ["generate", str(c.run_copy()), "--prompt", "hi", "--threshold", "-0.5"],
        "config key `router.threshold`: -0.5 must be at least 0",
    ),
    (
        "generate-max-new-tokens-zero",
        lambda c: ["generate", str(c.run_copy()), "--prompt", "hi", "--max-new-tokens", "0"],
        "--max-new-tokens: 0 must be at least 1",
    ),
    (
        "generate-max-new-tokens-negative",
        lambda c: ["generate", str(c.run_copy()), "--prompt", "hi", "--max-new-tokens", "-5"],
        "--max-new-tokens: -5 must be at least 1",
    ),
    (
        "generate-max-new-tokens-not-int",
        lambda c: ["generate", str(c.run_copy()), "--prompt", "hi", "--max-new-tokens", "1e3"],
        "argument --max-new-tokens: invalid int value: '1e3'",
    ),
    (
        "backend-command-port-zero",
        lambda c: ["backend-command", str(c.run_copy()), "--backend", "vllm", "--port", "0"],
        "--port: 0 is not a TCP port (1 to 65535)",
    ),
    (
        "backend-command-port-too-large",
        lambda c: ["backend-command", str(c.run_copy()), "--backend", "vllm", "--port", "99999"],
        "--port: 99999 is not a TCP port",
    ),
    ("cluster-limit-zero", lambda c: c.cluster("--limit", "0"), "config key `data.limit`: 0 must be at least 1"),
    (
        "train-experts-epochs-zero",
        lambda c: ["train-experts", str(c.run_copy()), "--epochs", "0"],
        "config key `experts.epochs`: 0 must be at least 1",
    ),
    (
        "evaluate-limit-negative",
        lambda c: ["evaluate", str(c.run_copy()), "--limit", "-1"],
        "config key `evaluate.limit`: -1 must be at least 1",
    ),
    ("rank-zero", lambda c: c.cluster("--set", "sketch.rank=0"), "config key `sketch.rank`: 0 must be at least 1"),
    (
        "projection-dim-zero",
        lambda c: c.cluster("--projection-dim", "0"),
        "config key `cluster.projection_dim`: 0 must be at least 1",
    ),
    ("seed-fractional", lambda c: c.cluster("--set", "seed=1.5"), "config key `seed`: expected int, got 1.5"),
    (
        "rank-a-boolean",
        lambda c: c.cluster("--set", "sketch.rank=true"),
        "config key `sketch.rank`: expected int, got True",
    ),
    (
        "n-init-zero",
        lambda c: c.cluster("--set", "cluster.n_init=0"),
        "config key `cluster.n_init`: 0 must be at least 1",
    ),
    (
        "reorthonormalize-negative",
        lambda c: c.cluster("--set", "sketch.reorthonormalize_every=-1"),
        "config key `sketch.reorthonormalize_every`: -1 must be at least 0",
    ),
    (
        "silhouette-sample-one",
        lambda c: c.cluster("--set", "cluster.silhouette_sample=1"),
        "config key `cluster.silhouette_sample`: 1 must be at least 2",
    ),
    # K against the data: `k: auto` searches 2..min(k_max, N − 1); every cluster needs a distinct point
    ("k-zero", lambda c: c.cluster("--k", "0"), "config key `cluster.k`: 0 must be at least 2"),
    ("k-fractional", lambda c: c.cluster("--k", "2.5"), "config key `cluster.k`: 2.5 is not one of"),
    ("k-nan", lambda c: c.cluster("--k", "nan"), "config key `cluster.k`: 'nan' must be an integer ≥ 2 or `auto`"),
    (
        "k-max-one",
        lambda c: c.cluster("--k", "auto", "--set", "cluster.k_max=1"),
        "config key `cluster.k_max`: 1 must be at least 2",
    ),
    (
        "k-auto-on-two-records",
        lambda c: c.cluster("--k", "auto", data=jsonl(c.user / "d.jsonl", GOOD_ROWS[:2])),
        "config key `cluster.k`: `auto` needs at least 3 distinct records (its silhouette scores 2 ≤ K < N), and {}d.jsonl has only 2",
    ),
    (
        "identical-records",
        lambda c: c.cluster("--k", "3", data=jsonl(c.user / "d.jsonl", [SAME] * 12)),
        "config key `cluster.k`: 3 clusters need 3 distinct records, and the 12 records of {}d.jsonl hold only 1 (the others repeat them)",
    ),
    (
        "two-distinct-records-for-k-three",
        lambda c: c.cluster("--k", "3", data=jsonl(c.user / "d.jsonl", without_ids(GOOD_ROWS[:2]) * 3)),
        "3 clusters need 3 distinct records, and the 6 records of {}d.jsonl hold only 2",
    ),
    (
        "k-auto-on-identical-records",
        lambda c: c.cluster("--k", "auto", data=jsonl(c.user / "d.jsonl", [SAME] * 12)),
        "`auto` needs at least 3 distinct records (its silhouette scores 2 ≤ K < N), and the 12 records",
    ),
    (
        "same-prompts-when-clustering-prompts",
        lambda c: c.cluster("--tokens", "instruction", data=jsonl(c.user / "d.jsonl", same_prompt_rows())),
        "2 clusters need 2 distinct records, and the 12 records of {}d.jsonl hold only 1",
    ),
    # config keys and sections
    ("unknown-section", lambda c: c.cluster("--set", "foo.bar=1"), "unknown config key `foo` (known in this section:"),
    (
        "unknown-key-in-a-section",
        lambda c: c.cluster("--set", "warmup.lr=1"),
        "unknown config key `warmup.lr` (known in this section: batch_size, epochs",
    ),
    (
        "section-set-to-a-number",
        lambda c: c.cluster("--set", "data=3"),
        "config section `data` must be a mapping, got '3'",
    ),
    (
        "empty-strategies",
        lambda c: c.cluster("--set", "experts.strategies="),
        "config key `experts.strategies`: must name at least one of",
    ),
    (
        "empty-target-modules",
        lambda c: c.cluster("--set", "model.target_modules=[]"),
        "config key `model.target_modules`: must name at least one module",
    ),
    (
        "config-a-scalar",
        lambda c: ["cluster", "--config", str(c.file("c.yaml", "3\n"))],
        "c.yaml must hold a mapping at the top level",
    ),
    # records
    (
        "record-source-not-a-string",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [{"instruction": "a", "output": "b", "source": 3}])),
        "d.jsonl:1: field `source` must be a string, got int",
    ),
    (
        "record-input-not-a-string",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [{"instruction": "a", "input": ["x"], "output": "b"}])),
        "d.jsonl:1: field `input` must be a string, got list",
    ),
    (
        "record-empty-instruction",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [{"instruction": " ", "output": "b"}])),
        "d.jsonl:1: field `instruction` is empty",
    ),
    (
        "messages-an-empty-list",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [{"messages": []}])),
        "d.jsonl:1: field `messages` must be a non-empty list",
    ),
    (
        "messages-only-the-answer",
        lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [{"messages": [{"role": "assistant", "content": "y"}]}])),
        "d.jsonl:1: field `messages` has no prompt turn before the assistant's answer",
    ),
    (
        "message-content-not-a-string",
        lambda c: c.cluster(
            data=jsonl(
                c.user / "d.jsonl",
                [{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "y"}]}],
            )
        ),
        "d.jsonl:1: field `messages[0]` must be an object with string `role` and `content`",
    ),
    (
        "skip-bad-when-every-record-is-bad",
        lambda c: c.cluster("--skip-bad", data=jsonl(c.user / "d.jsonl", [{"instruction": "a"}, "[1]"])),
        "d.jsonl: no usable records (2 skipped as bad)",
    ),
    (
        "json-data-not-a-list",
        lambda c: c.cluster(data=c.file("d.json", '{"data": 3}')),
        "d.json: a .json file must hold a list of records",
    ),
    (
        "json-data-invalid",
        lambda c: c.cluster(data=c.file("d.json", '[\n{"instruction": }\n]')),
        "d.json:2: invalid JSON",
    ),
    # commands
    (
        "generate-both-prompt-and-data",
        lambda c: ["generate", str(c.run_copy()), "--prompt", "hi", "--data", str(c.data)],
        "give exactly one of --prompt TEXT or --data FILE",
    ),
    (
        "generate-an-empty-prompt",
        lambda c: ["generate", str(c.run_copy()), "--prompt", " "],
        "--prompt: the prompt is empty; give the text to answer",
    ),
    (
        "generate-unknown-strategy",
        lambda c: ["generate", str(c.run_copy()), "--prompt", "hi", "--strategy", "bogus"],
        "--strategy: 'bogus' is not a strategy",
    ),
    (
        "evaluate-strategies-empty",
        lambda c: ["evaluate", str(c.run_copy()), "--strategies", ","],
        "--strategies: ',' is not a strategy",
    ),
]


def saved_dataset(c: "Case") -> Path:
    """The records as a saved `datasets` folder (a data path that is a folder)."""
    from datasets import Dataset

    from gradientspace.data.loading import datasets_progress

    with datasets_progress(False):  # the case's stderr must hold only the error line
        Dataset.from_list(GOOD_ROWS).save_to_disk(str(c.user / "dataset"))
    return c.user / "dataset"


def without_ids(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "id"} for row in rows]


def same_prompt_rows() -> list[dict]:
    """Twelve records that share one prompt and differ in their answers."""
    return [{"instruction": "the same prompt", "output": f"answer {i}"} for i in range(12)]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


BUSY = 75  # EX_TEMPFAIL: the run is busy with another command; the same command may be run again later


@pytest.mark.parametrize(
    "make_argv, names, code",
    [pytest.param(make, names, BUSY if "in-use" in name else 2, id=name) for name, make, names in CASES],
)
def test_bad_input_is_one_clear_line(make_argv, names, code, finished, tmp_path, capsys, monkeypatch):
    """`{}` in a row's line stands for the user's folder and `{pid}` for this process (which holds the locks)."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    case = Case(tmp_path, finished)
    argv = make_argv(case)
    before = _snapshot(case.user)
    try:
        exit_code = main(argv)
    finally:
        case.close()
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_code == code, err
    assert len(lines) == 1, err
    assert names.replace("{}", f"{case.user}/").replace("{pid}", str(os.getpid())) in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(case.user) == before, "a user's file changed"


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 90 and len({name for name, _, _ in CASES}) == len(CASES)


def test_an_unreadable_data_file_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    """Root reads any file, so the refusal is the operating system's answer to `open`, given here."""
    from gradientspace.data import loading

    data = jsonl(tmp_path / "d.jsonl", GOOD_ROWS)

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(loading, "open", refused, raising=False)
    assert main(["cluster", "--model", "tiny-random", "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"gradientspace: error: config key `data.path`: {data} cannot be read (Permission denied)"
    )


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(Exception, match="data.max_length"):
        main(
            [
                "cluster",
                "--model",
                "tiny-random",
                "--data",
                str(jsonl(tmp_path / "d.jsonl", GOOD_ROWS)),
                "--out",
                str(tmp_path / "r"),
                "--max-length",
                "0",
                "--debug",
            ]
        )


def test_a_clustered_run_exports_without_an_adapter_column(finished, tmp_path):
    from datasets import load_from_disk

    assert main(["export", str(finished / "run"), "--out", str(tmp_path / "export")]) == 0
    records = load_from_disk(str(tmp_path / "export" / "records"))
    assert "adapter" not in records.column_names and len(records) == len(GOOD_ROWS)
    assert records["id"] == [row["id"] for row in GOOD_ROWS]
