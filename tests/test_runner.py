"""Runs resume correctly: stages keyed by what they read (the data's content, not its path), each
decision said in one line, nothing stale served, the manifest written by rank 0 only."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import interrupted_after, make_records
from safetensors.torch import load_file

from gradientspace import distributed
from gradientspace.cli import main
from gradientspace.clustering import stages
from gradientspace.config import load_config
from gradientspace.models.loading import load_tokenizer
from gradientspace.runner import Run
from gradientspace.runs import RunDirectory, Stage

FLAGS = [
    "--model",
    "tiny-random",
    "--method",
    "gradientspace",
    "--k",
    "2",
    "--max-length",
    "96",
    "--batch-size",
    "4",
    "--set",
    "model.lora_rank=2",
    "--set",
    "sketch.rank=4",
    "--set",
    "warmup.fraction=0.25",
]


def write_data(path, n, seed=0):
    rows = [
        {"id": r.id, "instruction": r.messages[0]["content"], "output": r.response, "source": r.source}
        for r in make_records(n, seed)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def must_not_run(*args, **kwargs):
    raise AssertionError("a stage whose inputs did not change ran again")


def stage_lines(printed: str) -> dict[str, str]:
    """{stage: its decision line} from a command's output."""
    lines = {}
    for line in printed.splitlines():
        verb, _, rest = line.partition(" ")
        if verb in ("skip", "run", "re-run", "resume") and ":" in rest:
            lines[rest.split(":")[0]] = line
    return lines


def test_editing_the_data_in_place_reruns_every_stage_that_read_it(tmp_path, capsys, monkeypatch):
    data, out = write_data(tmp_path / "train.jsonl", 16), tmp_path / "run"
    argv = ["cluster", *FLAGS, "--data", str(data), "--out", str(out)]
    assert main(argv) == 0
    first = stage_lines(capsys.readouterr().out)
    assert all(first[s].startswith("run ") for s in ("data", "warmup", "gradients", "cluster")), first

    with monkeypatch.context() as patch:  # same file, same content: everything is skipped, clustering included
        for name in ("run_gradient_pass", "train_adapter", "assign"):
            patch.setattr(stages, name, must_not_run)
        assert main(argv) == 0
    again = stage_lines(capsys.readouterr().out)
    assert all(again[s].startswith(f"skip {s}: done, key ") for s in ("data", "warmup", "gradients", "cluster")), again

    write_data(data, 20, seed=1)  # edited in place: same path, other records
    assert main(argv) == 0
    edited = stage_lines(capsys.readouterr().out)
    assert edited["data"].startswith("re-run data: data content changed"), edited
    assert edited["warmup"].startswith("re-run warmup: stage data changed"), edited
    assert edited["gradients"].startswith("re-run gradients: stage warmup changed"), edited
    assert edited["cluster"].startswith("re-run cluster: stage gradients changed"), edited
    ids = [json.loads(line)["id"] for line in data.read_text().splitlines()]
    assert [json.loads(line)["id"] for line in (out / "samples.jsonl").read_text().splitlines()] == ids
    assert [json.loads(line)["id"] for line in (out / "clusters.jsonl").read_text().splitlines()] == ids
    assert load_file(str(out / "sketch.safetensors"))["coordinates"].shape[0] == 20


def test_moving_the_data_file_reruns_nothing(tmp_path, capsys, monkeypatch):
    data = write_data(tmp_path / "train.jsonl", 12)
    assert main(["cluster", *FLAGS, "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    moved = data.rename(tmp_path / "moved.jsonl")
    capsys.readouterr()
    for name in ("run_gradient_pass", "train_adapter", "assign"):
        monkeypatch.setattr(stages, name, must_not_run)
    assert main(["cluster", *FLAGS, "--data", str(moved), "--out", str(tmp_path / "run")]) == 0
    assert all(line.startswith("skip") for line in stage_lines(capsys.readouterr().out).values())


def test_another_config_needs_overwrite_then_reruns_what_changed(tmp_path, capsys, monkeypatch):
    data = write_data(tmp_path / "train.jsonl", 12)
    assert main(["cluster", *FLAGS, "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    assert main(["cluster", *FLAGS, "--data", str(data), "--out", str(tmp_path / "run"), "--k", "3"]) == 2
    assert "cluster.k 2 → 3" in capsys.readouterr().err
    assert (tmp_path / "run" / "manifest.json").read_text() == manifest  # a refused command writes nothing
    monkeypatch.setattr(stages, "run_gradient_pass", must_not_run)  # K is read by the clustering alone
    assert (
        main(["cluster", *FLAGS, "--data", str(data), "--out", str(tmp_path / "run"), "--k", "3", "--overwrite"]) == 0
    )
    lines = stage_lines(capsys.readouterr().out)
    assert lines["gradients"].startswith("skip") and lines["cluster"].startswith(
        "re-run cluster: cluster settings changed"
    ), lines
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["cluster"]["k"] == 3


def test_truncated_samples_are_counted(tmp_path, capsys):
    """Against the obvious count: the full chat-templated sample is longer than max_length."""
    data = write_data(tmp_path / "train.jsonl", 24)
    max_length = 44
    tokenizer = load_tokenizer("tiny-random")
    expected = 0
    for record in make_records(24):
        messages = record.messages + [{"role": "assistant", "content": record.response}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        expected += len(tokenizer(full, add_special_tokens=False)["input_ids"]) > max_length
    assert 0 < expected < 24  # the case tests both sides
    config = load_config(
        None,
        {
            "model.name": "tiny-random",
            "data.path": str(data),
            "data.max_length": max_length,
            "out": str(tmp_path / "run"),
        },
    )
    Run(config).build(stages.DataStage())
    assert RunDirectory(config.out).stage_entry("data")["truncated"] == expected
    assert f"{expected} truncated to data.max_length = {max_length} tokens" in capsys.readouterr().out


def test_default_checkpoint_every_scales_with_the_pass(tmp_path, monkeypatch):
    assert [stages.default_checkpoint_every(b) for b in (1, 3, 12, 100, 5000)] == [1, 1, 2, 10, 50]
    data = write_data(tmp_path / "train.jsonl", 24)  # 6 batches of 4: the old default (50 batches) never saved
    config = load_config(
        None,
        {
            "model.name": "tiny-random",
            "model.lora_rank": 2,
            "data.path": str(data),
            "data.max_length": 96,
            "sketch.rank": 4,
            "cluster.method": "gradientspace",
            "cluster.k": 2,
            "gradients.batch_size": 4,
            "warmup.fraction": 0.25,
            "out": str(tmp_path / "run"),
        },
    )
    assert config.gradients.checkpoint_every is None
    monkeypatch.setattr(stages, "stream_gradients", interrupted_after(stages.stream_gradients, 3))
    with pytest.raises(KeyboardInterrupt):
        stages.cluster(config)
    checkpoint = tmp_path / "run" / "checkpoints" / "gradients.rank0.safetensors"
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as handle:
        assert handle.metadata()["next_batch"] == "3"


def test_only_rank_zero_writes_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = RunDirectory(tmp_path / "run")
    run.set_config({"seed": 0})
    with run.stage("data", "k") as stage:
        stage["outputs"] = []
    assert not (tmp_path / "run" / "manifest.json").exists()
    monkeypatch.setenv("RANK", "0")
    run.save()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["data"]["done"]


def test_decisions_name_what_changed(tmp_path, capsys):
    run = RunDirectory(tmp_path / "run")
    assert not run.is_done("s", "k1", {"a": "1", "b": "2"})
    assert capsys.readouterr().out == "run s: not done yet\n"
    with run.stage("s", "k1", {"a": "1", "b": "2"}) as stage:
        (tmp_path / "run" / "out.txt").write_text("x")
        stage["outputs"] = ["out.txt"]
    assert run.is_done("s", "k1", {"a": "1", "b": "2"})
    assert not run.is_done("s", "k2", {"a": "1", "b": "3"})
    (tmp_path / "run" / "out.txt").unlink()
    assert not run.is_done("s", "k1", {"a": "1", "b": "2"})
    run.manifest["stages"]["s"]["done"] = False
    assert not run.is_done("s", "k1")
    assert capsys.readouterr().out.splitlines() == [
        "skip s: done, key k1",
        "re-run s: b changed (key k1 → k2)",
        "re-run s: output out.txt is missing",
        "resume s: interrupted earlier, inputs unchanged (key k1)",
    ]


def test_a_checkpoint_from_another_world_size_is_not_resumed(tmp_path, monkeypatch, capsys):
    """Rank 0 of two processes saw every other batch: resuming its state in one process would drop half the data."""
    from gradientspace import distributed

    data = write_data(tmp_path / "train.jsonl", 16)
    overrides = {
        "model.name": "tiny-random",
        "model.lora_rank": 2,
        "data.path": str(data),
        "data.max_length": 96,
        "sketch.rank": 4,
        "cluster.method": "gradientspace",
        "cluster.k": 2,
        "gradients.batch_size": 2,
        "gradients.checkpoint_every": 1,
        "warmup.fraction": 0.25,
    }
    clean = stages.cluster(load_config(None, {**overrides, "out": str(tmp_path / "clean")}))
    config = load_config(None, {**overrides, "out": str(tmp_path / "run")})
    with monkeypatch.context() as patch:
        patch.setattr(
            distributed, "world", lambda: (0, 2)
        )  # rank 0's view of a two-process run, without a process group
        patch.setattr(distributed, "init", lambda: None)
        patch.setattr(stages, "stream_gradients", interrupted_after(stages.stream_gradients, 2))
        with pytest.raises(KeyboardInterrupt):
            stages.cluster(config)
    assert (tmp_path / "run" / "checkpoints" / "gradients.rank0.safetensors").exists()
    capsys.readouterr()
    resumed = stages.cluster(config)
    assert "resuming from the checkpoint" not in capsys.readouterr().out
    a, b = (load_file(str(tmp_path / name / "sketch.safetensors"))["coordinates"] for name in ("clean", "run"))
    assert torch.allclose(a, b, atol=1e-10) and resumed.labels == clean.labels


@pytest.mark.heavy(seconds=100)
def test_a_changed_learning_rate_retrains_the_adapters_and_nothing_upstream(decided_tiny_run, tmp_path, capsys):
    """Asserted from the manifest: the adapters, thresholds and evaluation are redone; data, warm-up, gradients, clusters and routers are not."""
    import shutil

    from conftest import decided_run_config

    config = decided_run_config(tmp_path)
    shutil.copytree(decided_tiny_run, tmp_path / "run")  # the finished run, as `run` on this config left it
    before = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    capsys.readouterr()
    # a section after the clustering may change on an existing run (no --overwrite needed): its stages re-run
    assert main(["run", str(config), "--set", "experts.learning_rate=0.003"]) == 0
    after = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    redone = {name for name in after if name in before and after[name]["finished_at"] != before[name]["finished_at"]}
    assert {"data", "warmup", "gradients", "cluster", "router/routed"}.isdisjoint(redone), redone
    assert {n for n in after if n.startswith(("experts/", "adapters/", "keep/", "scores/", "cards/"))} | {
        "threshold/routed",
        "evaluate",
        "report",
    } == redone
    assert all(after[n]["key"] != before[n]["key"] for n in redone if n != "report")
    lines = stage_lines(capsys.readouterr().out)
    assert lines["experts/single/0"].startswith("re-run experts/single/0: training settings changed"), lines


# ---------------------------------------------------------------- the run directory is the project's


def test_a_users_folder_is_never_written_the_data_loss_case(tmp_path, capsys):
    """`cluster --data proj/samples.jsonl --out proj` once replaced the user's training file with the run's samples.jsonl."""
    proj = tmp_path / "proj"
    proj.mkdir()
    data = write_data(proj / "samples.jsonl", 12)
    (proj / "clusters.jsonl").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in proj.iterdir()}
    assert main(["cluster", *FLAGS, "--data", str(data), "--out", str(proj)]) == 2
    err = capsys.readouterr().err
    assert (
        f"config key `out`: {proj} is not empty (clusters.jsonl, samples.jsonl) and is not a gradientspace run" in err
    )
    assert {
        p.name: p.read_bytes() for p in proj.iterdir()
    } == before  # not a byte changed, nothing added (no lock file either)

    # into a new folder it runs; and a file of the user's put inside that run afterwards is refused as input
    assert main(["cluster", *FLAGS, "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    inside = tmp_path / "run" / "mine.jsonl"
    inside.write_bytes(data.read_bytes())
    capsys.readouterr()
    assert main(["cluster", *FLAGS, "--data", str(inside), "--out", str(tmp_path / "run")]) == 2
    assert f"config key `data.path`: {inside} lies inside the run directory" in capsys.readouterr().err


def test_a_second_command_on_a_run_fails_at_once_naming_the_first(tmp_path, capsys, monkeypatch):
    """Deterministic: this process holds the run's lock, as a command running on it does, then runs a second command."""
    from gradientspace.runs import RunLock

    data = write_data(tmp_path / "train.jsonl", 12)
    argv = ["cluster", *FLAGS, "--data", str(data), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["gradientspace", "cluster", "--k", "3"])  # what the holder's lock file names
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        for name in ("run_gradient_pass", "train_adapter", "assign"):
            monkeypatch.setattr(stages, name, must_not_run)
        monkeypatch.setattr(stages.DataStage, "run", must_not_run)  # refused before any stage, even the data's
        assert main([*argv, "--k", "3", "--overwrite"]) == 75
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and out == ""
        assert (
            f"{tmp_path / 'run'} is in use by process {os.getpid()} on {socket.gethostname()} (`gradientspace cluster --k 3`, started "
            in err
        )
        assert (tmp_path / "run" / "manifest.json").read_text() == manifest
    finally:
        lock.release()
    monkeypatch.undo()
    assert main([*argv, "--k", "3", "--overwrite"]) == 0  # released: the same command now runs
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["cluster"]["k"] == 3


def test_the_lock_dies_with_its_process_even_by_sigkill(tmp_path):
    """An OS lock, not a pid file: a holder killed with SIGKILL leaves nothing that blocks the next command."""
    from gradientspace.runs import RunBusy, RunLock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from gradientspace.runs import RunLock; "
            "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunBusy, match=f"in use by process {holder.pid} "):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    lock.release()


def test_a_folder_holding_only_a_lock_is_a_run_that_stopped_before_its_manifest(tmp_path):
    from gradientspace.preflight import check_output_dir
    from gradientspace.runs import RunLock

    lock = RunLock(tmp_path / "run")
    lock.acquire()
    lock.release()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]
    check_output_dir(str(tmp_path / "run"))


def test_under_torchrun_every_rank_stops_when_rank_zero_finds_the_run_busy(tmp_path, monkeypatch):
    """Rank 1 never touches the lock file: it takes rank 0's outcome (a broadcast), so it cannot wait at a barrier for a rank 0 that left."""
    from gradientspace import distributed, runs

    monkeypatch.setattr(distributed, "init", lambda: None)
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    monkeypatch.setattr(distributed, "from_main", lambda item: (True, "run is in use by process 7"))
    with pytest.raises(runs.RunBusy, match="in use by process 7"):
        with runs.locked(tmp_path / "run"):
            raise AssertionError("rank 1 went on")
    monkeypatch.setattr(distributed, "from_main", lambda item: (False, "cannot lock run/.lock: flock failed"))
    with pytest.raises(
        runs.RunError, match="cannot lock"
    ) as refused:  # rank 0's filesystem cannot lock: rank 1 stops too
        with runs.locked(tmp_path / "run"):
            raise AssertionError("rank 1 went on")
    assert not isinstance(refused.value, runs.RunBusy)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(
        distributed, "from_main", lambda item: item
    )  # rank 0 got the lock: rank 1 goes on, still without the file
    with runs.locked(tmp_path / "run"):
        pass
    assert not (tmp_path / "run").exists()


def test_a_filesystem_that_cannot_lock_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """NFS mounted `nolock` or Lustre without `-o flock` answer flock with ENOLCK or EOPNOTSUPP: one line, no traceback."""
    import errno
    from pathlib import Path

    from gradientspace import runs
    from gradientspace.cli import main

    real = runs.fcntl.flock

    def no_locks(handle, operation):  # only on the run's filesystem: `datasets` takes its own file locks elsewhere
        if str(getattr(handle, "name", "")).startswith(str(tmp_path / "run")):
            raise OSError(errno.ENOLCK, "No locks available")
        return real(handle, operation)

    monkeypatch.setattr(runs.fcntl, "flock", no_locks)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(6)))
    assert (
        main(["cluster", "--model", "tiny-random", "--data", str(data), "--k", "2", "--out", str(tmp_path / "run")])
        == 2
    )
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert (
        f"cannot lock {tmp_path / 'run' / '.lock'}: flock failed (No locks available) on its {runs.filesystem_of(tmp_path)} filesystem"
        in lines[0]
    )
    assert "NFS: without `nolock`; Lustre: `-o flock`" in lines[0]
    assert runs.filesystem_of(Path("/proc")) == "proc"  # the mount table is read (Linux): the longest mount point wins


# ---------------------------------------------------------------- the stage graph, on toy stages (no model)


class Toy(Stage):
    """A stage that appends its name to a log when it runs; its own input is a value the test sets."""

    def __init__(self, name: str, parents: tuple = (), log: list | None = None, value: str = "v"):
        self.name, self.parents, self.log, self.value = name, parents, log, value

    def requires(self, run):
        return list(self.parents)

    def inputs(self, run):
        return {"value": self.value}

    def run(self, run, key, record):
        self.log.append(self.name)
        run.path(self.name).parent.mkdir(parents=True, exist_ok=True)
        run.path(self.name).write_text(key)
        record["outputs"] = [self.name]


def toy_run(tmp_path) -> Run:
    return Run(load_config(None, {"out": str(tmp_path / "run")}))


def test_a_stage_runs_after_what_it_requires_once_and_is_skipped_when_done(tmp_path):
    log: list[str] = []
    a = Toy("a", log=log)
    b, c = Toy("b", (a,), log), Toy("c", (a,), log)
    d = Toy("d", (b, c), log)
    toy_run(tmp_path).build(d)
    assert log == ["a", "b", "c", "d"]  # a, required twice, runs once
    toy_run(tmp_path).build(d)
    assert log == ["a", "b", "c", "d"]  # a new command: everything is done


def test_a_changed_input_reruns_exactly_the_stages_that_read_it(tmp_path, capsys):
    log: list[str] = []

    def graph(value: str):
        a, other = Toy("a", log=log, value=value), Toy("other", log=log)
        b = Toy("b", (a,), log)
        return Toy("d", (b, other), log)

    toy_run(tmp_path).build(graph("v"))
    log.clear()
    capsys.readouterr()
    toy_run(tmp_path).build(graph("changed"))
    assert log == ["a", "b", "d"]  # `other` does not read `a`
    said = capsys.readouterr().out
    assert "re-run a: value changed" in said
    assert "re-run b: stage a changed" in said  # the parent's key is part of the child's: no stage keeps a stale key
    assert "re-run d: stage b changed" in said


def test_a_generator_of_requirements_sees_its_earlier_parents_done(tmp_path):
    """The experts exist only once the clusters do: a stage may ask for more stages after its first ones are built."""
    log: list[str] = []
    first = Toy("first", log=log)

    class Later(Toy):
        def requires(self, run):
            yield first
            count = int(run.path("first").exists()) + 1  # what `first` wrote decides how many stages follow
            yield [Toy(f"part{i}", log=log) for i in range(count)]

    toy_run(tmp_path).build(Later("later", log=log))
    assert log == ["first", "part0", "part1", "later"]


def test_releasing_the_base_frees_it_and_the_next_stage_loads_it_again(tmp_path):
    """The FSDP-sharded gradient pass lets go of the process's base first (else the whole base would sit on the device
    beside its shards): nothing holds the released model, wrapped or not, and the next use loads a fresh one."""
    import gc
    import weakref

    run = Run(load_config(None, {"out": str(tmp_path / "run"), "model": {"name": "tiny-random"}}))
    base = weakref.ref(run.base_model())
    run.model()  # wrapped with a training adapter, as after the warm-up
    run.release_base()
    gc.collect()
    assert base() is None and run.trainable is None
    assert run.base_model() is not None  # loaded again on first use


def as_rank_one_of_two(monkeypatch) -> None:
    """This process plays rank 1 of a 2-process run; rank 0's side of every gather is absent."""
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    monkeypatch.setattr(distributed, "init", lambda: None)
    monkeypatch.setattr(distributed, "gather_to_main", lambda item: None)


def test_rank_zero_stages_make_the_other_ranks_wait_and_spread_stages_are_dealt(tmp_path, monkeypatch):
    """On rank 1 of 2: a MAIN stage is rank 0's (rank 1 waits for rank 0's manifest, sent to it), a SPREAD group is dealt."""
    from gradientspace.runs import Placement

    as_rank_one_of_two(monkeypatch)
    waits: list[str] = []
    monkeypatch.setattr(distributed, "barrier", lambda: waits.append("barrier"))

    def from_rank_zero(manifest):  # what rank 0 would send: its manifest, which records the stages it ran
        waits.append("manifest")
        return manifest

    monkeypatch.setattr(distributed, "from_main", from_rank_zero)
    log: list[str] = []
    main_stage = Toy("main", log=log)
    spread = [Toy(f"s{i}", (main_stage,), log) for i in range(4)]
    for stage in spread:
        stage.placement = Placement.SPREAD
    run = toy_run(tmp_path)
    run.build(*spread)
    assert log == ["s1", "s3"]  # rank 1's deal; `main` is rank 0's
    assert waits == ["manifest", "manifest"]  # after rank 0's stage, and after the spread group


def test_spread_stages_are_dealt_by_their_work_so_one_long_stage_does_not_idle_a_rank(tmp_path, monkeypatch):
    """On rank 1 of 2: one stage as long as the five others together goes to rank 0 alone; rank 1 takes the five.
    Round-robin would have given rank 1 three short ones and rank 0 the long one and two more."""
    from gradientspace.runs import Placement

    as_rank_one_of_two(monkeypatch)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    log: list[str] = []
    spread = [Toy(f"s{i}", (), log) for i in range(6)]
    for stage, work in zip(spread, [5, 1, 1, 1, 1, 1]):
        stage.placement = Placement.SPREAD
        stage.work = lambda run, work=work: work
    toy_run(tmp_path).build(*spread)
    assert log == ["s1", "s2", "s3", "s4", "s5"]


def test_a_spread_stage_another_rank_ran_brings_its_summary_items_to_rank_zeros_manifest(tmp_path, monkeypatch):
    """The manifest's summary sections (`experts`, `router`) travel in a stage's record: a SPREAD stage dealt to rank 1
    (which writes no manifest) has its item written by rank 0 when rank 0 records the entry it gathered. Both ranks are
    played in turn on one run folder: rank 1 first, then rank 0 with what rank 1 sent."""
    from gradientspace.runs import Placement, add_to_section

    class Summarising(Toy):
        placement = Placement.SPREAD

        def run(self, run, key, record):
            super().run(run, key, record)
            add_to_section(record, "router", self.name, {"rank": run.rank})

    monkeypatch.setattr(distributed, "init", lambda: None)
    monkeypatch.setattr(distributed, "from_main", lambda manifest: manifest)
    sent: list = []
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    monkeypatch.setattr(distributed, "gather_to_main", sent.append)
    log: list[str] = []
    toy_run(tmp_path).build(*[Summarising(f"s{i}", log=log) for i in range(2)])
    assert log == ["s1"] and not (tmp_path / "run" / "manifest.json").exists()

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "gather_to_main", lambda ran: [ran, sent[0]])
    toy_run(tmp_path).build(*[Summarising(f"s{i}", log=log) for i in range(2)])
    assert log == ["s1", "s0"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["router"] == {"s0": {"rank": 0}, "s1": {"rank": 1}}
    assert manifest["stages"]["s1"]["done"] and "sections" not in manifest["stages"]["s1"]  # kept once, in its section


# ---------------------------------------------------------------- outputs verified, not trusted


class Counting(Toy):
    """A stage whose output differs each time it runs (as a GPU training run may)."""

    runs = 0

    def run(self, run, key, record):
        super().run(run, key, record)
        Counting.runs += 1
        run.path(self.name).write_text(f"{key} run {Counting.runs}")


class Amending(Toy):
    """A later stage that rewrites an earlier stage's output on purpose (as the threshold stage does `router.json`)."""

    def __init__(self, name, amends: str, parents, log):
        super().__init__(name, parents, log)
        self.amends = amends

    def run(self, run, key, record):
        self.log.append(self.name)
        run.path(self.amends).write_text(run.path(self.amends).read_text() + " amended")
        record["outputs"] = [self.amends]


def test_a_corrupt_output_reruns_its_stage_and_a_byte_identical_rebuild_keeps_its_dependents(tmp_path, capsys):
    log: list[str] = []
    a = Toy("a", log=log)
    b = Toy("b", (a,), log)
    toy_run(tmp_path).build(b)
    output = tmp_path / "run" / "a"
    for corrupt in (output.read_text()[:5], "x" * len(output.read_text())):  # truncated; the same size, other bytes
        output.write_text(corrupt)
        log.clear()
        capsys.readouterr()
        toy_run(tmp_path).build(b)
        assert log == ["a"], corrupt  # rebuilt byte for byte: `b` read exactly those bytes, so it stays done
        assert "re-run a: output a changed since it was written" in capsys.readouterr().out
    os.utime(output, ns=(1, 1))  # touched, the bytes unchanged: still the stage's output
    log.clear()
    toy_run(tmp_path).build(b)
    assert log == []


def test_a_rebuild_into_other_bytes_reruns_what_read_the_old_ones(tmp_path, capsys):
    log: list[str] = []
    a = Counting("a", log=log)
    b, other = Toy("b", (a,), log), Toy("other", (), log)
    c = Toy("c", (b, other), log)
    toy_run(tmp_path).build(c)
    (tmp_path / "run" / "a").write_text("")
    log.clear()
    capsys.readouterr()
    toy_run(tmp_path).build(c)
    assert log == ["a", "b", "c"]  # `other` does not read `a`
    said = capsys.readouterr().out
    assert "re-run a: output a changed since it was written" in said and "re-run b: stage a changed" in said
    log.clear()
    toy_run(tmp_path).build(c)
    assert log == []  # and then all is done


def test_an_output_a_later_stage_rewrites_on_purpose_is_not_taken_for_corrupt(tmp_path):
    log: list[str] = []
    a = Toy("a", log=log)
    amend = Amending("amend", "a", (a,), log)
    toy_run(tmp_path).build(amend)
    log.clear()
    toy_run(tmp_path).build(amend)
    assert log == []
    entries = RunDirectory(tmp_path / "run").manifest["stages"]
    assert entries["a"]["digests"]["a"] == entries["amend"]["digests"]["a"]  # both entries know the file as it is now


@pytest.mark.heavy(seconds=100)
def test_truncated_outputs_of_a_real_run_are_rebuilt_each_named(served_tiny_run, tmp_path, capsys):
    """An adapter, the sketch, the clusters and the evaluation; then the router's head; then the threshold's `router.json`,
    each truncated: the stage that wrote it re-runs, naming it, and the run ends whole with the files rebuilt as they were
    (safetensors compared as tensors: their metadata's order is random)."""
    from conftest import copied_run

    from gradientspace.commands import run_all
    from gradientspace.config import config_from_run
    from gradientspace.runs import file_digest

    run = copied_run(served_tiny_run, tmp_path)
    rounds = [
        {
            "experts/0/adapter_model.safetensors": "experts/routed/0",
            "sketch.safetensors": "gradients",
            "clusters.jsonl": "cluster",
            "eval.json": "evaluate",
        },
        {"router/head.safetensors": "router/routed"},
        {"router/router.json": "router/routed"},
    ]
    for truncated in rounds:
        original = {name: file_digest(run / name)["sha256"] for name in truncated}
        for name in truncated:
            with open(run / name, "r+b") as handle:
                handle.truncate(10)
        capsys.readouterr()
        run_all(config_from_run(run))
        said = capsys.readouterr().out
        for name, stage in truncated.items():
            assert f"re-run {stage}: output {name} changed since it was written" in said, (name, said[-3000:])
            if name != "eval.json":  # the evaluation's latency is timed anew
                assert file_digest(run / name)["sha256"] == original[name], name
        if (
            "router/routed" in truncated.values()
        ):  # the router writes router.json anew, without the threshold: that re-runs
            assert "re-run threshold/routed: stage router/routed changed" in said
        else:  # a rebuild byte for byte: nothing that read the file re-runs
            assert "re-run threshold/routed" not in said and "re-run partition/routed" not in said


def test_commands_that_only_read_a_run_name_a_corrupt_output_in_one_line(served_tiny_run, tmp_path, capsys):
    from conftest import copied_run

    run = copied_run(served_tiny_run, tmp_path)
    with open(run / "experts" / "1" / "adapter_model.safetensors", "r+b") as handle:
        handle.truncate(10)
    for command in (
        ["backend-command", str(run), "--backend", "vllm"],
        ["report", str(run)],
        ["generate", str(run), "--prompt", "hi"],
        ["serve", str(run), "--port", "1"],
    ):
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err == (
            f"gradientspace: error: {run / 'experts' / '1' / 'adapter_model.safetensors'} changed since stage "
            f"`experts/routed/1` wrote it (truncated or edited); `gradientspace run` on the run's config "
            f"(or `gradientspace evaluate {run}`) rebuilds it"
        ), (command, err)


def test_a_lock_that_cannot_be_written_is_one_line_on_every_rank(tmp_path, monkeypatch):
    """A read-only folder or a full disk while taking the lock: rank 0 says why and the others stop with it, no traceback."""
    from gradientspace import runs

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs.RunLock, "acquire", lambda self: full())
    with pytest.raises(runs.RunError, match=r"cannot take the run's lock .*\.lock: No space left on device") as refused:
        with runs.locked(tmp_path / "run"):
            raise AssertionError("the command went on")
    assert not isinstance(refused.value, runs.RunBusy)
