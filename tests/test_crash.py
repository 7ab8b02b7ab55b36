"""A `run` killed (SIGKILL) inside each stage in turn, then re-run, ends with exactly an uninterrupted run's outputs."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import decided_run_config
from safetensors.torch import load_file

# Each run is a child of a fork server that has imported the package, transformers' Trainer and peft once: a fresh
# interpreter would spend most of each short run importing them again (the chain below starts 14 runs).
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["gradientspace.cli", "gradientspace.models.train", "peft", "transformers.trainer"])


def run_child(argv: list[str], kill_in: str | None, stdout: str, stderr: str) -> None:
    """`gradientspace ARGV`, but SIGKILLing itself the first time stage KILL_IN commits a file (every output goes through
    a temp file and os.replace): the stage has started and written its temp file or checkpoint, and its output is not in
    place yet."""
    import torch
    from conftest import freeze_imports

    from gradientspace import runs
    from gradientspace.cli import main

    freeze_imports()  # what the fork server imported
    torch.set_num_threads(1)
    sys.stdout, sys.stderr = (
        open(stdout, "w", buffering=1),
        open(stderr, "w", buffering=1),
    )  # line by line: SIGKILL flushes nothing
    execute = runs.RunDirectory.execute

    def kill(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def execute_and_die_inside(self, stage, inputs, run):
        if stage.name == kill_in:
            work = stage.run

            def die_inside(run, key, record):
                os.replace = kill
                work(run, key, record)

            stage.run = die_inside
        return execute(self, stage, inputs, run)

    runs.RunDirectory.execute = execute_and_die_inside
    sys.exit(main(argv))


def gradientspace_run(config, kill_in: str | None = None) -> subprocess.CompletedProcess:
    out, err = f"{config}.stdout", f"{config}.stderr"
    child = FORKS.Process(target=run_child, args=(["run", str(config)], kill_in, out, err))
    child.start()
    child.join(timeout=900)
    return subprocess.CompletedProcess(child.pid, child.exitcode, Path(out).read_text(), Path(err).read_text())


def one_stage_of_each_kind(manifest: dict) -> list[str]:
    """data, warmup, gradients, cluster, a partition, the generalist, a branched expert (it resumes from another starting
    point than the generalist), a strategy's adapters, a router, a group's keep decision and its strategy's `keep.json` (the
    fall-back's, `single-continued`, come first) and threshold (the same code for every strategy: a second routed strategy would only repeat these kinds), the
    model cards, a score matrix, evaluate, report."""
    chosen, kinds = [], set()
    for name in manifest["stages"]:
        # an expert's kind is its strategy's; a keep decision's group and its strategy's assembly are two kinds
        kind = "/".join(name.split("/")[:2]) if name.startswith("experts/") else (name.split("/")[0], name.count("/"))
        if kind not in kinds:
            kinds.add(kind)
            chosen.append(name)
    return chosen


def outputs(run_dir) -> dict:
    adapters = {
        str(p.relative_to(run_dir)): load_file(str(p))
        for p in sorted(run_dir.glob("**/adapter_model.safetensors"))
        if ".trainer-" not in str(p)
    }
    evaluation = json.loads((run_dir / "eval.json").read_text())
    return {"clusters": (run_dir / "clusters.jsonl").read_text(), "adapters": adapters, "nll": evaluation["per_record"]}


@pytest.mark.heavy(seconds=80)
def test_a_run_killed_inside_each_stage_resumes_to_the_same_outputs(decided_tiny_run, tmp_path):
    killed_config = decided_run_config(tmp_path)  # the shared uninterrupted run's config, another folder
    stages = one_stage_of_each_kind(json.loads((decided_tiny_run / "manifest.json").read_text()))
    assert {
        "data",
        "warmup",
        "gradients",
        "cluster",
        "partition/single",
        "experts/single/0",
        "experts/single-continued/0",
        "experts/routed/0",
        "adapters/single",
        "router/routed",
        "keep/single-continued/0",
        "keep/single-continued",
        "threshold/routed",
        "cards/single",
        "scores/validation",
        "evaluate",
        "report",
    } == set(stages)

    previous = None
    for stage in stages:
        died = gradientspace_run(killed_config, kill_in=stage)
        assert died.returncode == -signal.SIGKILL, f"{stage}: {died.stderr[-2000:]}"
        if previous:  # the stage killed last time is resumed (said so), finished, and the run goes on to this one
            assert f"resume {previous}: interrupted earlier" in died.stdout, (previous, died.stdout[-2000:])
        previous = stage
        entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"][stage]
        assert entry["done"] is False, stage  # the manifest never calls a killed stage done
    again = gradientspace_run(killed_config)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "run report: redone every time" in again.stdout

    expected, got = outputs(decided_tiny_run), outputs(tmp_path / "run")
    assert got["clusters"] == expected["clusters"]
    assert got["adapters"].keys() == expected["adapters"].keys() and expected["adapters"]
    for name, tensors in expected["adapters"].items():
        for key, value in tensors.items():
            assert torch.allclose(got["adapters"][name][key], value, atol=1e-6), (name, key)
    for strategy, record in expected["nll"].items():
        assert got["nll"][strategy]["adapter"] == record["adapter"], strategy
        assert torch.allclose(torch.tensor(got["nll"][strategy]["nll"]), torch.tensor(record["nll"]), atol=1e-4), (
            strategy
        )
