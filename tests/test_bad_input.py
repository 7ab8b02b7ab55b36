"""Bad input, in every form a user gives it, ends in one line on stderr that names the culprit.

Each case runs the CLI in-process and asserts: a non-zero exit; exactly one line on stderr,
naming the file, line, field or config key; no traceback anywhere; and every file the user
gave (data, config, an existing run directory) byte-for-byte unchanged.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import make_records
from gradientspace.cli import main

RUN_FLAGS = ["--set", "model.lora_rank=2", "--set", "sketch.rank=4", "--set", "warmup.fraction=0.25", "--max-length", "96"]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


GOOD_ROWS = [{"id": r.id, "instruction": r.messages[0]["content"], "output": r.response, "source": r.source} for r in make_records(12)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A clustered tiny run, made once; cases that damage a run work on a copy."""
    root = tmp_path_factory.mktemp("bad-input")
    data = jsonl(root / "train.jsonl", GOOD_ROWS)
    assert main(["cluster", "--model", "tiny-random", "--data", str(data), "--k", "2", "--out", str(root / "run"), *RUN_FLAGS]) == 0
    return root


class Case:
    """A user's folder (`user/`: their data, configs, run) and the command they type."""

    def __init__(self, root: Path, finished: Path):
        self.user = root / "user"
        self.user.mkdir()
        self.data = jsonl(self.user / "train.jsonl", GOOD_ROWS)
        self.finished = finished

    def file(self, name: str, text: str) -> Path:
        path = self.user / name
        path.write_text(text)
        return path

    def run_copy(self) -> Path:
        return Path(shutil.copytree(self.finished / "run", self.user / "run"))

    def cluster(self, *flags: str, data: Path | None = None, out: Path | None = None) -> list[str]:
        return ["cluster", "--model", "tiny-random", "--data", str(data or self.data), "--out", str(out or self.user / "out"), "--k", "2", *RUN_FLAGS, *flags]


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
    ("max-length-below-template", lambda c: c.cluster("--max-length", "20"), "`data.max_length`: 20 tokens cannot hold the chat template"),
    ("negative-warmup-lr", lambda c: c.cluster("--set", "warmup.learning_rate=-1e-4"), "`warmup.learning_rate`: -0.0001 must be greater than 0"),
    ("zero-expert-lr", lambda c: c.cluster("--set", "experts.learning_rate=0"), "`experts.learning_rate`: 0.0 must be greater than 0"),
    ("zero-batch-size", lambda c: c.cluster("--batch-size", "0"), "`gradients.batch_size`: 0 must be at least 1"),
    ("fraction-above-one", lambda c: c.cluster("--set", "warmup.fraction=1.5"), "`warmup.fraction`: 1.5 must be in (0, 1]"),
    ("validation-fraction-one", lambda c: c.cluster("--set", "router.validation_fraction=1"), "`router.validation_fraction`"),
    ("k-larger-than-data", lambda c: c.cluster("--k", "50"), "`cluster.k`: 50 clusters for only 12 records"),
    ("k-one", lambda c: c.cluster("--k", "1"), "`cluster.k`: 1 must be at least 2"),
    ("k-not-a-number", lambda c: c.cluster("--k", "many"), "`cluster.k`"),
    ("unknown-key", lambda c: c.cluster("--set", "sketch.rnak=3"), "`sketch.rnak`"),
    ("internal-rank-below-rank", lambda c: c.cluster("--set", "sketch.internal_rank=2"), "`sketch.internal_rank`: 2 must be at least `sketch.rank`"),
    ("snapshot-after-last-epoch", lambda c: c.cluster("--set", "experts.snapshot_epochs=[99]"), "`experts.snapshot_epochs`"),
    ("bad-device", lambda c: c.cluster("--set", "model.device=gpu"), "`model.device`"),
    ("unknown-method", lambda c: c.cluster("--method", "kmeans"), "`cluster.method`"),
    ("unknown-strategy-in-config", lambda c: c.cluster("--set", "experts.strategies=routed,bogus"), "`experts.strategies`: 'bogus'"),
    ("negative-seed", lambda c: c.cluster("--seed", "-1"), "`seed`: -1 must be at least 0"),
    ("zero-checkpoint-every", lambda c: c.cluster("--set", "gradients.checkpoint_every=0"), "`gradients.checkpoint_every`"),
    # models
    ("unknown-model", lambda c: c.cluster("--model", "no-such-model"), "`model.name`: unknown model `no-such-model`: not a built-in alias (smollm2-135m, tiny-random)"),
    ("model-folder-without-config", lambda c: c.cluster("--model", str(c.user)), "`model.name`: folder"),
    # config files
    ("config-not-yaml", lambda c: ["cluster", "--config", str(c.file("c.yaml", "model: [unclosed\n"))], "c.yaml is not valid YAML"),
    ("config-missing", lambda c: ["cluster", "--config", str(c.user / "nope.yaml")], "nope.yaml does not exist"),
    ("config-a-list", lambda c: ["run", str(c.file("c.yaml", "- a\n- b\n"))], "c.yaml must hold a mapping"),
    ("config-section-not-mapping", lambda c: ["run", str(c.file("c.yaml", "sketch: 3\n"))], "`sketch` must be a mapping"),
    # data files and records
    ("data-missing", lambda c: c.cluster(data=c.user / "missing.jsonl"), "`data.path`: "),
    ("data-invalid-json-line", lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [GOOD_ROWS[0], "{not json"])), "d.jsonl:2: invalid JSON"),
    ("record-missing-output", lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [GOOD_ROWS[0], {"instruction": "a"}])), "d.jsonl:2: missing field `output`"),
    ("record-output-not-string", lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [{"instruction": "a", "output": 3}])), "d.jsonl:1: field `output` must be a string"),
    ("record-empty-output", lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [{"instruction": "a", "output": "  "}])), "d.jsonl:1: field `output` is empty"),
    ("messages-not-ending-with-assistant", lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])),
     "d.jsonl:1: field `messages` must end with an `assistant` message"),
    ("record-not-an-object", lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", ["[1, 2]"])), "d.jsonl:1: expected a JSON object"),
    ("duplicate-ids", lambda c: c.cluster(data=jsonl(c.user / "d.jsonl", [GOOD_ROWS[0], GOOD_ROWS[0]])), "duplicate id `r0`"),
    ("empty-data-file", lambda c: c.cluster(data=c.file("d.jsonl", "\n")), "d.jsonl: no usable records"),
    ("unsupported-extension", lambda c: c.cluster(data=c.file("d.txt", "hello\n")), "d.txt: unsupported file type `.txt`"),
    ("json-not-a-list", lambda c: c.cluster(data=c.file("d.json", '{"rows": 1}')), "d.json: a .json file must hold a list"),
    ("oracle-without-sources", lambda c: c.cluster("--set", "experts.strategies=[routed,oracle]",
                                                    data=jsonl(c.user / "d.jsonl", [{k: v for k, v in r.items() if k != "source"} for r in GOOD_ROWS])),
     "`experts.strategies`: `oracle` needs a `source`"),
    # command lines
    ("flag-not-an-int", lambda c: ["cluster", "--rank", "x"], "argument --rank: invalid int value: 'x'"),
    ("unknown-command", lambda c: ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("no-command", lambda c: [], "the following arguments are required: command"),
    ("unknown-flag", lambda c: ["cluster", "--colour", "red"], "unrecognized arguments: --colour red"),
    ("set-without-equals", lambda c: c.cluster("--set", "sketch.rank"), "--set expects KEY=VALUE, got 'sketch.rank'"),
    ("unknown-strategy-flag", lambda c: ["evaluate", str(c.run_copy()), "--strategies", "routed,nope"], "--strategies: 'nope' is not a strategy"),
    ("generate-without-prompt", lambda c: ["generate", str(c.run_copy())], "give exactly one of --prompt TEXT or --data FILE"),
    # run directories
    ("run-dir-missing", lambda c: ["train-experts", str(c.user / "no-run")], "no-run does not exist"),
    ("run-dir-without-manifest", lambda c: ["train-router", str(c.user)], "(no manifest.json)"),
    ("manifest-not-json", lambda c: ["train-experts", str(damaged(c, "manifest.json", "{oops"))], "manifest.json is not valid JSON"),
    ("manifest-without-config", lambda c: ["evaluate", str(manifest_without(c.run_copy(), "config"))], "manifest.json: field `config` is missing"),
    ("clusters-file-corrupt", lambda c: ["report", str(damaged(c, "clusters.jsonl", "{bad\n"))], "clusters.jsonl:1: invalid JSON"),
    ("warmup-adapter-deleted", lambda c: ["generate", str(damaged(c, "warmup/adapter_model.safetensors", None)), "--prompt", "hi"],
     "warmup/adapter_model.safetensors is missing (an output of stage `warmup`)"),
    ("run-made-with-other-config", lambda c: c.cluster("--k", "3", "--max-length", "64", out=c.run_copy()), "cluster.k 2 → 3; data.max_length 96 → 64. Pass --overwrite"),
    ("evaluate-data-missing", lambda c: ["evaluate", str(c.run_copy()), "--data", str(c.user / "test.jsonl")], "`evaluate.data`: "),
    ("evaluate-data-bad-record", lambda c: ["evaluate", str(c.run_copy()), "--data", str(jsonl(c.user / "test.jsonl", [{"instruction": "q"}]))],
     "test.jsonl:1: missing field `output`"),
    # output directories
    ("out-is-a-file", lambda c: [*c.cluster(), "--out", str(c.file("taken", "x"))], "config key `out`: "),
    ("out-below-a-file", lambda c: [*c.cluster(), "--out", str(c.file("taken", "x") / "run")], "is a file"),
    ("out-not-writable", lambda c: [*c.cluster(), "--out", "/proc/gradientspace-run"], "config key `out`: cannot write in /proc"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("make_argv, names", [pytest.param(make, names, id=name) for name, make, names in CASES])
def test_bad_input_is_one_clear_line(make_argv, names, finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    case = Case(tmp_path, finished)
    argv = make_argv(case)
    before = _snapshot(case.user)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1, err
    assert names in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(case.user) == before, "a user's file changed"


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 25 and len({name for name, _, _ in CASES}) == len(CASES)


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(Exception, match="data.max_length"):
        main(["cluster", "--model", "tiny-random", "--data", str(jsonl(tmp_path / "d.jsonl", GOOD_ROWS)), "--out", str(tmp_path / "r"),
              "--max-length", "0", "--debug"])
