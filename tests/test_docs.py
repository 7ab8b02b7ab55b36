"""The README fits on a screen and its links resolve; docs/configuration.md is the config's own help, regenerated; and
every command in a code block of the README and docs/ runs on tiny-random and does what it promises, so the docs
cannot go stale.

Each document's code blocks run in the order it shows them, in one test, with a scratch folder as the working
directory. The commands run as written; what the test puts in place of the reader's machine is all in this table:

| the docs say | the test runs |
| --- | --- |
| `configs/demo.yaml` | `conftest.tiny_run_config` (routed and single, `keep: all`: `served_tiny_run`'s settings) with `out: ../runs/demo`, as the real one |
| `runs/demo` | a copy of `served_tiny_run` (`conftest.copied_run`): that config's run, so `run configs/demo.yaml` finds every stage done |
| `my_data.jsonl`, `my_task.jsonl`, `test.jsonl` | small Alpaca files written there (`FILES`); what commands write (`runs/mine`, `mine-export`, …) lands there too |
| `gradientspace`, `.venv/bin/gradientspace` | `gradientspace.cli.main(words[1:])` in this process, the line split as a shell splits it |
| `torchrun … -m gradientspace.cli ARGS` | torchrun's flags parsed by torchrun's own parser; `gradientspace ARGS` once, in this process (`tests/test_distributed.py` runs `run` under torchrun) |
| `serve`, `route` (they block until Ctrl-C) | the same, in a thread, with uvicorn stoppable by the test (`Docs.serve_on` for `guards.serve_on`) |
| `--port N` of `serve` and `route` | a free port; `http://127.0.0.1:N` in a later command or Python block of the document is that server |
| `route --upstream URL`, nothing of the document at URL | vLLM's stand-in: the document's `serve` of the same run (started if none is), which lists and answers the adapters by vLLM's names |
| `curl …` | the same method, URL, headers and body sent with httpx; the request is sent again through a later `route` |
| a Python block | `exec`, its URLs as above, its printout checked |

Comment lines of a shell block are not run: they are notes or the output of the command above (`Snippet.shown`,
checked where a method reads it). A block that is not one of gradientspace's commands is in NOT_RUN with the reason;
any other block this test cannot run fails `test_every_command_in_the_docs_is_run_or_has_a_reason` (and the document's
own test) naming its file and line, so a new command cannot go untested."""

import contextlib
import io
import json
import math
import re
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import copied_run, make_records, opened_run, tiny_run_config

from gradientspace.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
HEAVY = {"README.md", "docs/pipeline.md"}  # ten seconds or more: README's builds a run, pipeline.md's re-evaluates one
FILES = {"my_data.jsonl": 16, "my_task.jsonl": 4, "test.jsonl": 4}  # the reader's files: records in each

# Blocks that are not gradientspace's commands, by document and how they begin: why each is not run
NOT_RUN = {
    # its recipe is `gradientspace run configs/demo.yaml` (test_make_demo_is_the_documented_run), docs/pipeline.md's
    # first command, which runs here
    ("README.md", "make demo"): "sets up .venv, then runs `gradientspace run configs/demo.yaml`",
    ("README.md", "make test"): "CI itself, which runs this file",
    ("docs/development.md", "python3 -m pip download"): "fetches wheels from PyPI for the GPU machine: the network",
    ("docs/development.md", ".venv/bin/python bench/gpu_site.py"): "copies installed packages for the GPU machine",
    ("docs/development.md", "mkdir -p .gpu-cache"): "copies tiny-random's folder for the GPU machine: a file copy",
    ("docs/pipeline.md", "skip data: done"): "output: the lines a re-run prints",
}
SHELL = {"bash", "sh", "shell", "console"}
GRADIENTSPACE = {"gradientspace", ".venv/bin/gradientspace"}
SUBCOMMANDS = {  # gradientspace's subcommands → the `Docs` method that runs one and checks what it promises
    "cluster": "cluster",
    "run": "run",
    "train-experts": "train_experts",
    "train-router": "train_router",
    "generate": "generate",
    "evaluate": "evaluate",
    "report": "report",
    "serve": "serve",
    "route": "route",
    "backend-command": "backend_command",
    "export": "export",
    "select": "select",
    "config-keys": "config_keys",
    "models": "models",
}
PYTHON_BLOCKS = {"run_all(": "python_run_all", "OpenAI(": "python_openai_client"}  # what a block calls → the method
GENERATED = ["id", "model", "expert", "probability", "fallback", "text"]  # a `generate` line, as `generate --help` says
LOOPBACK = re.compile(r"http://127\.0\.0\.1:\d+")


@dataclass
class Snippet:
    """A shell command (continuation lines joined; comment lines apart) or a whole block of another language."""

    document: str
    line: int
    language: str  # "" for a block without one
    text: str
    shown: list[str] = field(default_factory=list)  # the comment lines right below a shell command: what it prints

    def __str__(self) -> str:
        return f"{self.document}:{self.line}"


def snippets(document: str) -> list[Snippet]:
    found, language, start, block = [], None, 0, []
    for number, line in enumerate((ROOT / document).read_text().splitlines(), 1):
        text = line.strip()
        if text.startswith("```"):
            if language is None:
                language, start, block = text[3:].strip(), number + 1, []
            else:
                if language not in SHELL:
                    found.append(Snippet(document, start, language, "\n".join(block)))
                language = None
        elif language in SHELL:
            current = found[-1] if found and found[-1].document == document and found[-1].line >= start else None
            if current and current.text.endswith("\\"):
                current.text = current.text[:-1].rstrip() + " " + text
            elif text.startswith("#"):
                if current:
                    current.shown.append(text.lstrip("#").strip())
            elif text:
                found.append(Snippet(document, number, language, text))
        elif language is not None:
            block.append(line)
    return found


def words(snippet: Snippet) -> list[str]:
    """The command's words as a shell splits them (a trailing `# …` dropped); shell syntax beyond one command fails."""
    lexer = shlex.shlex(snippet.text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    split = list(lexer)
    operators = [w for w in split if set(w) <= set("();<>|&")]
    if operators:
        pytest.fail(
            f"{snippet}: `{' '.join(operators)}` in `{snippet.text}`: tests/test_docs.py runs one command a line"
        )
    return split


def not_run(snippet: Snippet) -> tuple[str, str] | None:
    return next((key for key in NOT_RUN if key[0] == snippet.document and snippet.text.startswith(key[1])), None)


def runner(snippet: Snippet) -> str | None:
    """The `Docs` method that runs `snippet`, None where NOT_RUN names it; a snippet no table knows fails the test."""
    if not_run(snippet):
        return None
    name = None
    if snippet.language in SHELL:
        command = words(snippet)
        if command[0] in GRADIENTSPACE and len(command) > 1:
            name = SUBCOMMANDS.get(command[1])
        elif command[0] == "curl":
            name = "curl"
        elif command[0] == "torchrun" and option(command, "-m") == "gradientspace.cli":
            inner = command[command.index("-m") + 2 :]  # what every process runs
            name = "torchrun" if inner and inner[0] in SUBCOMMANDS else None
    elif snippet.language == "python":
        name = next((method for call, method in PYTHON_BLOCKS.items() if call in snippet.text), None)
    elif snippet.language in ("yaml", "yml"):
        name = "config_file"
    if name is None:
        first = snippet.text.splitlines()[0] if snippet.text else "(an empty block)"
        pytest.fail(
            f"{snippet}: tests/test_docs.py does not know how to run `{first}` "
            f"({snippet.language or 'a block without a language'}): teach `Docs` to run it and check what it must "
            "produce, or add it to NOT_RUN with the reason"
        )
    return name


def needs_demo_run(snippet: Snippet) -> bool:
    """runs/demo named, or reached through `configs/demo.yaml`'s `out` (no `--out` / `"out"` given)."""
    return "runs/demo" in snippet.text or (
        "configs/demo.yaml" in snippet.text and not re.search(r'--out\b|"out"', snippet.text)
    )


def option(command: list[str], name: str, default=None):
    return command[command.index(name) + 1] if name in command else default


def rows_of(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]


@dataclass
class Server:
    """A `serve` or `route` the document started, run by `main` in a thread."""

    snippet: Snippet
    command: list[str]
    url: str
    thread: threading.Thread
    uvicorn: object
    status: list  # main's exit status, once it returned


class Docs:
    """One document's commands, run in order in `folder` (the working directory). Servers it starts stay up for its
    later commands (a curl, a Python client, `route`) and stop when it ends."""

    def __init__(self, request, folder: Path, capsys):
        self.request, self.folder, self.capsys = request, folder, capsys
        self.started: list[Server] = []
        self.servers: dict[str, Server] = {}  # the document's URL (its --port) → the server there now
        self.uvicorns: list = []
        self.requests: list[tuple[Snippet, dict]] = []  # the document's HTTP requests (curl) so far
        self.launched: list[list[str]] = []  # the commands torchrun lines started
        for seed, (name, count) in enumerate(FILES.items()):
            rows = [
                {
                    "id": f"{name[:-6]}-{r.id}",
                    "instruction": r.messages[0]["content"],
                    "output": r.response,
                    "source": r.source,
                }
                for r in make_records(count, seed)
            ]
            (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        configs = folder / "configs"
        configs.mkdir()
        tiny = tiny_run_config(configs, ["routed", "single"], experts="keep: all")  # as served_tiny_run's
        out = f"out: {configs / 'run'}\n"
        assert out in tiny.read_text()
        (configs / "demo.yaml").write_text(tiny.read_text().replace(out, "out: ../runs/demo\n"))
        tiny.unlink()

    def make_demo_run(self) -> None:
        copied_run(self.request.getfixturevalue("served_tiny_run"), self.folder / "runs").rename(
            self.folder / "runs" / "demo"
        )

    def __call__(self, snippet: Snippet) -> None:
        name = runner(snippet)
        if name is not None:
            getattr(self, name)(snippet, words(snippet) if snippet.language in SHELL else None)

    # ------------------------------------------------------------------ the command line, in this process

    def main(self, snippet: Snippet, command: list[str]) -> str:
        self.capsys.readouterr()
        status = main(command[1:])
        out, err = self.capsys.readouterr()
        assert status == 0, f"{snippet}: `{snippet.text}` exited {status}: {err.strip()[-2000:]}"
        return out

    def run_of(self, command: list[str]) -> Path:
        return self.folder / command[2]

    def config_of(self, command: list[str]):
        """The config a `run` or `cluster` command reads (before its flags) and the run directory it writes."""
        from gradientspace.config import load_config

        path = command[2] if command[1] == "run" else option(command, "--config")
        config = load_config(self.folder / path if path else None)
        out = option(command, "--out")
        return config, (self.folder / out if out else Path(config.out))

    def cluster(self, snippet, command):
        out = self.main(snippet, command)
        run = self.config_of(command)[1]
        clusters = (run / "clusters.jsonl").read_text().splitlines()
        assert len(clusters) == len((run / "samples.jsonl").read_text().splitlines()) > 0, snippet
        assert "cluster sizes:" in out and "assignments: " in out, snippet

    def run(self, snippet, command):
        config, run = self.config_of(command)
        out = self.main(snippet, command)
        results = json.loads((run / "eval.json").read_text())
        for strategy in config.experts.strategies:
            assert results[strategy]["overall"]["nll"] > 0 and f"| {strategy}" in out, (snippet, strategy)
        assert (run / "report.html").stat().st_size > 0 and "Run: " in out, snippet

    def train_experts(self, snippet, command):
        from gradientspace.config import config_from_run

        out = self.main(snippet, command)
        run = self.run_of(command)
        for strategy in config_from_run(run).experts.strategies:  # a line each: its groups and their sizes
            assert re.search(rf"^{strategy} +groups .*  sizes ", out, re.M), (snippet, strategy)
        assert list((run / "experts").glob("*/adapter_model.safetensors")), snippet

    def train_router(self, snippet, command):
        out = self.main(snippet, command)
        assert re.search(r"^router for routed +held-out accuracy [0-9.]+", out, re.M), snippet
        assert (self.run_of(command) / "router" / "router.json").exists(), snippet

    def generate(self, snippet, command):
        from gradientspace.routing.model import served_adapters

        out = self.main(snippet, command)
        (line,) = [json.loads(text) for text in out.splitlines() if text.startswith("{")]
        shown = re.search(r"#\s*→\s*(\{.*)", snippet.text)  # the line the docs show it printing
        keys = re.findall(r'"(\w+)":', shown.group(1)) if shown else GENERATED
        assert list(line) == keys, f"{snippet}: prints {list(line)}, the docs show {keys}"
        served = {s.name for s in served_adapters(opened_run(self.run_of(command)))}
        assert line["model"] in served and isinstance(line["text"], str) and 0 < line["probability"] <= 1, line

    def evaluate(self, snippet, command):
        from gradientspace.config import config_from_run

        out = self.main(snippet, command)
        run = self.run_of(command)
        config, results = config_from_run(run), json.loads((run / "eval.json").read_text())
        if option(command, "--data"):  # the given file's records were scored, up to the run's evaluate.limit
            ids = [row["id"] for row in rows_of(self.folder / option(command, "--data"))]
            ids = ids[: config.evaluate.limit or len(ids)]
            assert sorted(results["ids"]) == sorted(ids) and results["test_records"] == len(ids), snippet
        for strategy in option(command, "--strategies", ",".join(config.experts.strategies)).split(","):
            assert results[strategy]["overall"]["nll"] > 0, (snippet, strategy)
        assert "results: " in out and "eval.json" in out, snippet

    def report(self, snippet, command):
        run = self.run_of(command)
        before = (run / "report.html").stat().st_mtime_ns if (run / "report.html").exists() else 0
        out = self.main(snippet, command)
        assert (run / "report.html").stat().st_mtime_ns > before, f"{snippet}: report.html was not written"
        figures = list((run / "report").glob("*.png"))
        assert figures and all(f.name in out for f in figures), snippet  # the PNGs, each printed

    def backend_command(self, snippet, command):
        from gradientspace.routing.model import served_adapters

        out = self.main(snippet, command)
        printed = shlex.split(out)
        assert "--enable-lora" in printed and option(printed, "--port") == option(command, "--port"), snippet
        for served in served_adapters(opened_run(self.run_of(command))):
            assert f"{served.name}={served.folder.resolve()}" in printed, (snippet, served.name)
        for shown in snippet.shown:  # the launch line the docs show: the same flags, in the same order
            flags = [w for w in shown.split() if w.startswith("--")]
            assert [w for w in printed if w in flags] == flags, (
                f"{snippet}: prints {out.strip()}, the docs show {shown}"
            )

    def export(self, snippet, command):
        import numpy as np

        self.main(snippet, command)
        run, out = self.run_of(command), self.folder / option(command, "--out")
        clusters = [json.loads(line)["cluster"] for line in (run / "clusters.jsonl").read_text().splitlines()]
        form = option(command, "--format", "datasets")
        if form == "datasets":
            from datasets import load_from_disk

            records = load_from_disk(str(out / "records")).to_list()
        else:
            records = rows_of(out / f"records.{form}")
        assert [r["cluster"] for r in records] == clusters and all(r["adapter"] and r["coordinates"] for r in records)
        coordinates = np.load(out / "sketch" / "coordinates.npy", mmap_mode="r")
        assert coordinates.shape == (len(clusters), json.loads((out / "sketch" / "info.json").read_text())["rank"])
        sizes = [c["size"] for c in json.loads((out / "clusters.json").read_text())["clusters"].values()]
        assert sizes == np.bincount(clusters).tolist(), snippet

    def select(self, snippet, command):
        from gradientspace.config import config_from_run

        out = self.main(snippet, command)
        run, top = self.run_of(command), option(command, "--top")
        available = len((run / "samples.jsonl").read_text().splitlines())
        count = math.ceil(float(top[:-1]) / 100 * available) if top.endswith("%") else int(top)
        chosen = rows_of(self.folder / option(command, "--out"))
        data = rows_of(Path(config_from_run(run).data.path))
        assert len(chosen) == count and all(row in data for row in chosen), snippet  # the data file's own rows
        assert f"selected {count} of {available} records" in out, snippet

    def config_keys(self, snippet, command):
        out = self.main(snippet, command)
        assert "data.path" in out and "serve.port" in out, snippet

    def models(self, snippet, command):
        assert "tiny-random" in self.main(snippet, command), snippet

    def torchrun(self, snippet, command):
        """torchrun's flags as torchrun parses them; the command every process runs, run once here (again on another
        node's line only if it differs)."""
        from torch.distributed.run import get_args_parser

        try:
            args = get_args_parser().parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"{snippet}: torchrun refuses `{snippet.text}`: {self.capsys.readouterr().err.strip()}")
        assert args.module and args.training_script == "gradientspace.cli", snippet
        inner = ["gradientspace", *args.training_script_args]
        if inner not in self.launched:
            self.launched.append(inner)
            getattr(self, SUBCOMMANDS[inner[1]])(snippet, inner)

    # ------------------------------------------------------------------ servers, in threads of this process

    def serve_on(self, sock, app, host, port):
        """guards.serve_on, stoppable by the test: uvicorn on the socket `serve` or `route` bound, until told to exit."""
        import uvicorn

        # log_config=None: uvicorn's own logging.config.dictConfig would close every handler of this process, absl's
        # (imported by rouge-score) among them, which closes the stream it was made with: pytest's capture of a worker
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None))
        self.uvicorns.append(server)
        server.run(sockets=[sock])

    def start(self, snippet: Snippet, command: list[str], documented: str | None = None) -> Server:
        """Runs `command` (serve or route) in a thread on a free port in place of its --port, until it answers;
        `documented` (by default the URL of its --port) is that server in the document's later commands."""
        pytest.importorskip("fastapi")
        from test_serve import free_port

        monkeypatch = self.request.getfixturevalue("monkeypatch")
        monkeypatch.setattr("gradientspace.serving.server.serve_on", self.serve_on)
        monkeypatch.setattr("gradientspace.serving.route_proxy.serve_on", self.serve_on)
        documented = documented or f"http://127.0.0.1:{option(command, '--port', 8000)}"
        port, command = free_port(), [*command] if "--port" in command else [*command, "--port", ""]
        command[command.index("--port") + 1] = str(port)
        before, status = len(self.uvicorns), []
        thread = threading.Thread(target=lambda: status.append(main(command[1:])), daemon=True)
        thread.start()
        deadline = time.time() + 300
        while not (len(self.uvicorns) > before and self.uvicorns[before].started):
            assert thread.is_alive() and time.time() < deadline, (
                f"{snippet}: `{snippet.text}` did not start (exit {status}): {self.capsys.readouterr().err[-2000:]}"
            )
            time.sleep(0.05)
        server = Server(snippet, command, f"http://127.0.0.1:{port}", thread, self.uvicorns[before], status)
        self.started.append(server)
        self.servers[documented] = server
        return server

    def stop(self) -> None:
        for server in self.started:
            server.uvicorn.should_exit = True
            # a server still running after its test would print into the test's closed capture (on a loaded machine)
            server.thread.join(300)
            assert not server.thread.is_alive(), f"{server.snippet}: `{server.snippet.text}` did not stop in 300 s"
            assert server.status == [0], f"{server.snippet}: `{server.snippet.text}` ended with exit {server.status}"

    def url(self, snippet: Snippet, text: str) -> str:
        """`text` with each http://127.0.0.1:N the URL of the document's server there."""

        def actual(match) -> str:
            if match.group(0) not in self.servers:
                pytest.fail(f"{snippet}: nothing this document started listens at {match.group(0)}")
            return self.servers[match.group(0)].url

        return LOOPBACK.sub(actual, text)

    def serve(self, snippet, command):
        import httpx

        url = self.start(snippet, command).url
        models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert models[0] == "gradientspace" and len(models) > 1, (snippet, models)
        endpoints = re.search(r"#\s*GET ([^;]+); POST (.+)", snippet.text)  # the endpoints the docs list for it
        for path in endpoints.group(1).split(", ") if endpoints else ["/health"]:
            assert httpx.get(url + path.strip()).status_code == 200, (snippet, path)
        for path in endpoints.group(2).split(", ") if endpoints else []:
            refused = httpx.post(url + path.strip(), json={})  # there, and checking its body
            assert refused.status_code == 400 and refused.json()["error"]["message"], (snippet, path)

    def route(self, snippet, command):
        import httpx

        upstream = option(command, "--upstream")
        if upstream not in self.servers:  # vLLM's stand-in: the document's `serve` of the same run, or a new one
            same = [s for s in self.started if s.command[1] == "serve" and s.command[2] == command[2]]
            if same:
                self.servers[upstream] = same[-1]
            else:
                stand_in = [".venv/bin/gradientspace", "serve", command[2]]
                self.start(Snippet(snippet.document, snippet.line, "bash", shlex.join(stand_in)), stand_in, upstream)
        command = [*command]
        command[command.index("--upstream") + 1] = self.servers[upstream].url
        url = self.start(snippet, command).url
        assert httpx.get(f"{url}/health").json()["status"] == "ok", snippet  # it asks the upstream
        for sent, request in self.requests:  # the document's requests so far, now through the router
            self.answered(sent, httpx.request(**{**request, "url": LOOPBACK.sub(url, request["url"])}))

    def answered(self, snippet: Snippet, response) -> None:
        assert response.status_code == 200, f"{snippet}: {response.status_code} {response.text}"
        body = response.json()
        assert body["model"] == response.headers["x-gradientspace-expert"], snippet  # the adapter that answered
        assert 0 <= float(response.headers["x-gradientspace-probability"]) <= 1, snippet
        assert isinstance(body["choices"][0]["message"]["content"], str), snippet

    def curl(self, snippet, command):
        import httpx

        request, given = {"method": "GET", "headers": {}, "timeout": 120}, iter(command[1:])
        for word in given:
            if word in ("-s", "--silent"):
                pass
            elif word in ("-D", "--dump-header"):  # prints the headers: `answered` reads them
                assert next(given) == "-", snippet
            elif word in ("-H", "--header"):
                name, _, value = next(given).partition(":")
                request["headers"][name.strip()] = value.strip()
            elif word in ("-d", "--data", "--data-raw"):
                request["content"], request["method"] = next(given), "POST"
            elif word in ("-X", "--request"):
                request["method"] = next(given)
            elif not word.startswith("-"):
                request["url"] = word
            else:
                pytest.fail(f"{snippet}: tests/test_docs.py does not translate curl's `{word}`: teach Docs.curl")
        self.requests.append((snippet, request))
        self.answered(snippet, httpx.request(**{**request, "url": self.url(snippet, request["url"])}))

    # ------------------------------------------------------------------ Python blocks and config files

    def python(self, snippet: Snippet) -> tuple[dict, str]:
        namespace, printed = {"__name__": "__docs__"}, io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(self.url(snippet, snippet.text), str(snippet), "exec"), namespace)
        return namespace, printed.getvalue()

    def python_run_all(self, snippet, _):
        namespace, printed = self.python(snippet)
        results = json.loads((Path(namespace["config"].out) / "eval.json").read_text())
        *stages, last = printed.strip().splitlines()  # a line per stage, then the block's own print
        assert stages and all(line.startswith(("skip ", "run report:")) for line in stages), stages  # done before
        numbers = [float(word) for word in last.split()]
        assert numbers == [results["routed"]["overall"]["nll"], results["single"]["overall"]["nll"]], snippet

    def python_openai_client(self, snippet, _):
        import httpx

        base = re.search(r'base_url="([^"]+)"', snippet.text).group(1)
        served = [m["id"] for m in httpx.get(self.url(snippet, base) + "/models").json()["data"]]
        _, printed = self.python(snippet)
        expert, probability, _ = printed.split(" ", 2)  # the headers the docs name, then the answer
        assert expert in served[1:] and 0 <= float(probability) <= 1, f"{snippet}: printed {printed!r}"

    def config_file(self, snippet, _):
        """A YAML config the docs show loads (no unknown key, every value in range) and means what it says."""
        import yaml

        from gradientspace.config import load_config

        (self.folder / "shown.yaml").write_text(snippet.text)
        loaded = load_config(self.folder / "shown.yaml").to_dict()
        for section, values in yaml.safe_load(snippet.text).items():
            for key, value in values.items() if isinstance(values, dict) else [(None, values)]:
                got = loaded[section][key] if key else loaded[section]
                assert got in (value, str(self.folder / str(value))), (snippet, section, key, got, value)


def test_every_command_in_the_docs_is_run_or_has_a_reason():
    """Before anything runs: every block of the README and docs/ is one a `Docs` method runs, or NOT_RUN says why it
    is not run; and every NOT_RUN entry still names a block."""
    found = [snippet for document in DOCUMENTS for snippet in snippets(document)]
    for snippet in found:
        runner(snippet)
    assert {not_run(s) for s in found} >= set(NOT_RUN), "a NOT_RUN entry names a block the docs no longer hold"
    commands = [s for s in found if s.language in SHELL and not not_run(s) and words(s)[0] in GRADIENTSPACE]
    assert len(commands) >= 10, commands  # the blocks are still found


def test_make_demo_is_the_documented_run():
    """`make demo` (README, not run here) is `gradientspace run configs/demo.yaml`, docs/pipeline.md's first command."""
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert recipe.strip() == "$(VENV)/bin/gradientspace run configs/demo.yaml"
    assert [".venv/bin/gradientspace", "run", "configs/demo.yaml"] in [
        words(s) for s in snippets("docs/pipeline.md") if s.language in SHELL and not not_run(s)
    ]


@pytest.mark.parametrize(
    "document", [pytest.param(d, marks=[pytest.mark.heavy(seconds=45)] * (d in HEAVY)) for d in DOCUMENTS]
)
def test_every_command_in_the_document_runs_on_tiny_random(document, request, tmp_path, capsys, monkeypatch):
    shown = snippets(document)
    for snippet in shown:
        runner(snippet)  # one this test cannot run fails here, before anything runs
    monkeypatch.chdir(tmp_path)
    docs = Docs(request, tmp_path, capsys)
    if any(needs_demo_run(s) for s in shown if not not_run(s)):
        docs.make_demo_run()
    try:
        for snippet in shown:
            docs(snippet)
    finally:
        docs.stop()


def test_the_readme_fits_on_a_screen_and_every_link_resolves():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)\)", readme) + re.findall(r"`((?:docs|bench/results)/[\w./-]+\.md)`", readme)
    assert any(link.startswith("docs/") for link in links)
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)#:]+)\)", document.read_text()):
            assert (document.parent / link).exists(), f"{document.name} links to {link}, which does not exist"
    for link in links:
        assert (ROOT / link).exists(), link


def test_the_configuration_page_is_the_configs_own_help(capsys):
    assert main(["config-keys", "--markdown"]) == 0
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == capsys.readouterr().out, (
        "docs/configuration.md is stale: gradientspace config-keys --markdown > docs/configuration.md"
    )
    assert "| `train.report_to` | `[]` |" in written and "| `data.split` | `train` |" in written
