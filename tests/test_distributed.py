"""Under torchrun the gradient pass is sharded across processes and the shard sketches merged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_records
from safetensors.torch import load_file

pytestmark = pytest.mark.heavy(seconds=70)  # torchrun runs of two processes


def run_command(launchers: list[list[str]], logs: Path, timeout: int = 900) -> None:
    """Start every launcher at once (one per node), wait for all; each must succeed. Their stderr goes to files (a pipe
    left unread while another agent is awaited could fill and stall it); whatever happens, none outlives the test (an
    agent whose peer died would wait in a collective for hours)."""
    agents = []
    try:
        for node, launcher in enumerate(launchers):
            with open(logs / f"node{node}.stderr", "w") as stderr:
                agents.append(
                    subprocess.Popen(
                        launcher, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"}
                    )
                )
        for node, agent in enumerate(agents):
            # torchrun's own report of a failed rank fills about 2000 characters: keep what the ranks printed before it
            assert agent.wait(timeout=timeout) == 0, (logs / f"node{node}.stderr").read_text()[-8000:]
    finally:
        for agent in agents:
            agent.kill()


def test_a_run_on_two_nodes_gives_the_one_process_clusters_adapters_and_evaluation(decided_tiny_run, tmp_path):
    """Two torchrun agents, as on two nodes (`--nnodes 2 --nproc_per_node 1` on 127.0.0.1, each rank its node's local rank 0):
    the gradient pass is sharded, the experts and the evaluation are spread over the two ranks, and the other rank learns
    what rank 0 decided from rank 0 itself (the manifest is sent, not re-read from the shared folder).

    Rank 0's cluster stage is slowed down on purpose (`slow_rank0.py`), so a rank that read the clusters
    before rank 0 wrote them would fail every time, not only on a slow machine.
    """
    import socket

    from conftest import decided_run_config

    outputs = {}
    slowed = str(Path(__file__).with_name("slow_rank0.py"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    nodes = [
        [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--master_addr", "127.0.0.1"]
        + ["--master_port", str(port), slowed]
        for node in (0, 1)
    ]
    # its sketch's internal rank exceeds N: both sketches are exact, so the clusters cannot depend on the sharding
    run_command([[*node, "run", str(decided_run_config(tmp_path))] for node in nodes], tmp_path)
    for name, run in (("one", decided_tiny_run), ("two", tmp_path / "run")):
        stages = json.loads((run / "manifest.json").read_text())["stages"]
        outputs[name] = {
            "sketch": load_file(str(run / "sketch.safetensors")),
            "clusters": (run / "clusters.jsonl").read_text(),
            "eval": json.loads((run / "eval.json").read_text())["per_record"],
            "ranks": {stage: entry.get("rank", 0) for stage, entry in stages.items() if stage.startswith("experts/")},
            "adapters": {
                str(p.relative_to(run)): load_file(str(p)) for p in run.glob("*/*/*/adapter_model.safetensors")
            }
            | {str(p.relative_to(run)): load_file(str(p)) for p in run.glob("experts/*/adapter_model.safetensors")},
        }
    one, two = outputs["one"], outputs["two"]
    # each rank streamed its shard of the gradient pass into rank 0's sketch: every sample once, in order, and since
    # both sketches are exact, the same Gram matrix of coordinates (the coordinates themselves may differ by a rotation)
    samples = len(one["clusters"].splitlines())
    assert torch.equal(two["sketch"]["indices"], torch.arange(samples)) and torch.equal(
        one["sketch"]["indices"], torch.arange(samples)
    )
    gram = lambda coordinates: coordinates.double() @ coordinates.double().T
    assert torch.allclose(gram(two["sketch"]["coordinates"]), gram(one["sketch"]["coordinates"]), atol=1e-5)
    assert two["clusters"] == one["clusters"]
    # the generalist trained by both ranks together (recorded by rank 0), then the experts dealt by their size: rank 1
    # trained some, and every one is in rank 0's manifest
    assert two["ranks"].keys() == one["ranks"].keys() and two["ranks"]["experts/single/0"] == 0
    assert set(two["ranks"].values()) == {0, 1} and set(one["ranks"].values()) == {0}
    assert two["adapters"].keys() == one["adapters"].keys() and len(one["adapters"]) >= 2
    for name, tensors in one["adapters"].items():
        assert all(torch.allclose(two["adapters"][name][k], v, atol=1e-6) for k, v in tensors.items()), name
    for strategy, record in one["eval"].items():
        assert two["eval"][strategy]["adapter"] == record["adapter"]
        # scored in other batches (other padding) than one process does: equal up to float rounding
        assert torch.allclose(torch.tensor(two["eval"][strategy]["nll"]), torch.tensor(record["nll"]), atol=1e-4), (
            strategy
        )


def test_under_torchrun_a_busy_run_stops_every_rank_at_once(tmp_path):
    """Rank 0 finds the run locked (this process holds the lock) and leaves; rank 1 must stop too, not wait at a barrier."""
    from gradientspace.runs import RunLock

    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": r.messages[0]["content"], "output": r.response}) + "\n" for r in make_records(8)
        )
    )
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        torchrun = Path(sys.executable).with_name("torchrun")
        result = subprocess.run(
            [
                str(torchrun),
                "--standalone",
                "--nproc_per_node",
                "2",
                "-m",
                "gradientspace.cli",
                "cluster",
                "--model",
                "tiny-random",
                "--data",
                str(data),
                "--k",
                "2",
                "--max-length",
                "96",
                "--out",
                str(tmp_path / "run"),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
    finally:
        lock.release()
    assert result.returncode != 0
    busy = [line for line in result.stderr.splitlines() if f"is in use by process {os.getpid()}" in line]
    said = [line for line in result.stderr.splitlines() if "gradientspace: error:" in line]  # each rank's line, if any
    assert len(busy) == 2, (result.returncode, said, result.stderr[-1000:])  # one line from each rank, the same line
    assert not (tmp_path / "run" / "manifest.json").exists()
