"""A `run` killed (SIGKILL) inside each stage in turn, then re-run, ends with exactly an uninterrupted run's outputs."""

import json
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import tiny_run_config

# Runs `gradientspace run CONFIG`, but SIGKILLs itself the first time stage STAGE commits a file
# (every output goes through a temp file and os.replace): the stage has started and written its
# temp file or checkpoint, and its output is not in place yet.
KILL_INSIDE_STAGE = """
import os, signal, sys
from gradientspace import runs
from gradientspace.cli import main

target, config = sys.argv[1], sys.argv[2]
execute = runs.RunDirectory.execute

def kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def execute_and_die_inside(self, stage, inputs, run):
    if stage.name == target:
        work = stage.run
        def die_inside(run, key, record):
            os.replace = kill
            work(run, key, record)
        stage.run = die_inside
    return execute(self, stage, inputs, run)

runs.RunDirectory.execute = execute_and_die_inside
sys.exit(main(["run", config]))
"""


def gradientspace_run(config, kill_in: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", KILL_INSIDE_STAGE, kill_in, str(config)] if kill_in else [sys.executable, "-m", "gradientspace.cli", "run", str(config)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def one_stage_of_each_kind(manifest: dict) -> list[str]:
    """data, warmup, gradients, cluster, a partition, the generalist, one expert of every strategy (a branched expert
    resumes from another starting point than the generalist), a strategy's adapters, a router, keep decision and
    threshold (the same code for every strategy), evaluate, report."""
    chosen, kinds = [], set()
    for name in manifest["stages"]:
        kind = "/".join(name.split("/")[:2]) if name.startswith("experts/") else name.split("/")[0]
        if kind not in kinds:
            kinds.add(kind)
            chosen.append(name)
    return chosen


def outputs(run_dir) -> dict:
    adapters = {str(p.relative_to(run_dir)): load_file(str(p)) for p in sorted(run_dir.glob("**/adapter_model.safetensors"))
                if ".trainer-" not in str(p)}
    evaluation = json.loads((run_dir / "eval.json").read_text())
    return {"clusters": (run_dir / "clusters.jsonl").read_text(), "adapters": adapters, "nll": evaluation["per_record"]}


def test_a_run_killed_inside_each_stage_resumes_to_the_same_outputs(tmp_path):
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    whole_config = tiny_run_config(tmp_path / "whole", ["routed", "single", "random-clusters"])
    killed_config = tiny_run_config(tmp_path / "killed", ["routed", "single", "random-clusters"])
    whole = gradientspace_run(whole_config)
    assert whole.returncode == 0, whole.stderr[-2000:]
    stages = one_stage_of_each_kind(json.loads((tmp_path / "whole" / "run" / "manifest.json").read_text()))
    assert {"data", "warmup", "gradients", "cluster", "partition/single", "experts/single/0", "experts/routed/0", "experts/random-clusters/0",
            "adapters/single", "router/routed", "keep/routed", "threshold/routed", "evaluate", "report"} == set(stages)

    previous = None
    for stage in stages:
        died = gradientspace_run(killed_config, kill_in=stage)
        assert died.returncode == -signal.SIGKILL, f"{stage}: {died.stderr[-2000:]}"
        if previous:  # the stage killed last time is resumed (said so), finished, and the run goes on to this one
            assert f"resume {previous}: interrupted earlier" in died.stdout, (previous, died.stdout[-2000:])
        previous = stage
        entry = json.loads((tmp_path / "killed" / "run" / "manifest.json").read_text())["stages"][stage]
        assert entry["done"] is False, stage  # the manifest never calls a killed stage done
    again = gradientspace_run(killed_config)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "run report: redone every time" in again.stdout

    expected, got = outputs(tmp_path / "whole" / "run"), outputs(tmp_path / "killed" / "run")
    assert got["clusters"] == expected["clusters"]
    assert got["adapters"].keys() == expected["adapters"].keys() and expected["adapters"]
    for name, tensors in expected["adapters"].items():
        for key, value in tensors.items():
            assert torch.allclose(got["adapters"][name][key], value, atol=1e-6), (name, key)
    for strategy, record in expected["nll"].items():
        assert got["nll"][strategy]["adapter"] == record["adapter"], strategy
        assert torch.allclose(torch.tensor(got["nll"][strategy]["nll"]), torch.tensor(record["nll"]), atol=1e-4), strategy
