"""`gradients.shard_model: fsdp`: the gradient pass over a base sharded by FSDP2 gives the unsharded pass's clusters."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradientspace.config import ConfigError, GradientConfig, keyed, load_config

# `gradientspace.cli` under torchrun, counting on each rank the forward and backward passes of the gradient engine
# and the batches whose gradients reach the consumers, written to RANK<r>.json in the folder named first
COUNTED_CLI = """
import json, os, sys
from pathlib import Path

import torch

from gradientspace.cli import main
from gradientspace.clustering import stages
from gradientspace.gradients import engine

counts = {"passes": 0, "batches": 0}
one_batch = engine.PerSampleGradients.batch
stream = stages.stream_gradients


def counted_batch(self, *args):
    counts["passes"] += 1
    return one_batch(self, *args)


def counted_stream(*args, **kwargs):
    for item in stream(*args, **kwargs):
        counts["batches"] += 1
        yield item


engine.PerSampleGradients.batch = counted_batch
stages.stream_gradients = counted_stream
code = main(sys.argv[2:])
counts["group_left"] = not torch.distributed.is_initialized()
Path(sys.argv[1], f"rank{os.environ['RANK']}.json").write_text(json.dumps(counts))
sys.exit(code)
"""


def test_fsdp_is_refused_with_a_4bit_base_and_outside_torchrun_but_a_sharded_run_stays_readable(tmp_path, capsys):
    from conftest import write_records

    from gradientspace.cli import main

    with pytest.raises(ConfigError, match=r"^config key `gradients.shard_model`: `fsdp` cannot shard a 4-bit base"):
        load_config(None, {"gradients.shard_model": "fsdp", "model.quantization": "nf4"})
    # one process may load the config of a run sharded under torchrun (`export`, `select`, `serve` read it) ...
    sharded = load_config(None, {"gradients.shard_model": "fsdp"})
    # ... but not run its gradient pass: refused before any stage, in one line
    data = tmp_path / "train.jsonl"
    write_records(data, 8)
    argv = ["cluster", "--model", "tiny-random", "--data", str(data), "--out", str(tmp_path / "run")]
    assert main([*argv, "--set", "gradients.shard_model=fsdp"]) == 2
    error = capsys.readouterr().err.strip()
    assert (
        error.startswith("gradientspace: error: config key `gradients.shard_model`: `fsdp` shards")
        and "\n" not in error
    )
    assert not (tmp_path / "run" / "manifest.json").exists()
    # added after runs existed: at its default it leaves the gradient stage's key as it was
    assert "shard_model" not in keyed(GradientConfig()) and keyed(sharded.gradients)["shard_model"] == "fsdp"


def test_every_rank_runs_as_many_rounds_from_the_earliest_any_rank_resumes_from(monkeypatch):
    """A rank whose shard is a batch short, or whose own checkpoint is ahead of another rank's, runs filler rounds (None)."""
    from gradientspace import distributed
    from gradientspace.clustering.stages import equal_rounds

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "smallest", lambda start: 0)  # the other rank resumes from its first batch
    batches = ["b0", "b1", "b2"]
    assert equal_rounds(["b0", "b2"], 1, batches) == ([None, "b2"], 0)  # its checkpoint holds b0 already
    assert equal_rounds(["b1"], 0, batches) == (["b1", None], 0)


@pytest.mark.heavy(seconds=20)  # a torchrun `cluster` of two processes
def test_a_gradient_pass_sharded_over_two_ranks_gives_the_unsharded_clusters(decided_tiny_run, tmp_path):
    """Two gloo ranks, the base sharded by FSDP2 per decoder layer: the same sketch Gram matrix and the same clusters as the
    one-process unsharded run of the same config. The pass has an odd number of batches, so one rank's shard is a batch
    short and that rank runs a filler batch: without it the other rank would wait in a collective for ever."""
    from conftest import decided_run_config
    from test_distributed import run_command

    script = tmp_path / "counted_cli.py"
    script.write_text(COUNTED_CLI)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    config = decided_run_config(tmp_path)  # its sketch is exact, so the clusters cannot depend on the sharding
    launcher = [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    run_command([[*launcher, "cluster", "--config", str(config), "--set", "gradients.shard_model=fsdp"]], tmp_path, 300)

    counts = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    run = tmp_path / "run"
    samples = len((run / "clusters.jsonl").read_text().splitlines())
    batches = math.ceil(samples / GradientConfig().batch_size)
    assert batches % 2 == 1 and [c["batches"] for c in counts] == [(batches + 1) // 2, batches // 2], counts
    assert [c["passes"] for c in counts] == [(batches + 1) // 2] * 2, counts  # rank 1's last pass is the filler
    # each rank left the process group before exiting: rank 1, done first, once died of SIGABRT in interpreter teardown
    assert all(c["group_left"] for c in counts), counts

    sharded, unsharded = (
        load_file(str(run / "sketch.safetensors")),
        load_file(str(decided_tiny_run / "sketch.safetensors")),
    )
    assert torch.equal(sharded["indices"], torch.arange(samples)) and torch.equal(
        unsharded["indices"], sharded["indices"]
    )
    gram = lambda coordinates: coordinates.double() @ coordinates.double().T
    assert torch.allclose(gram(sharded["coordinates"]), gram(unsharded["coordinates"]), atol=1e-5)
    assert (run / "clusters.jsonl").read_text() == (decided_tiny_run / "clusters.jsonl").read_text()
