"""On a GPU node every rank works on its own GPU: `run` under a 2-process torchrun with `torch.cuda` faked at 8 GPUs
(bench/placement.py: the GPU code paths taken, the tensors made on the CPU, each GPU asked for recorded)."""

import contextlib
import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import decided_run_config
from safetensors.torch import load_file
from test_distributed import run_command
from test_train import fresh, split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import placement  # noqa: E402  (bench/ is not a package)

from gradientspace.models.loading import pick_device  # noqa: E402
from gradientspace.models.train import TrainPlan, train_adapter  # noqa: E402

PROBE = Path(__file__).resolve().parents[1] / "bench" / "placement.py"


EXTRA = "random-clusters"  # the 2-process run's second routed strategy, which the one-process run lacks


def without_extra(outputs):
    """A part of `run_outputs` without the second routed strategy's entries (the clusters' text is kept whole)."""
    return {k: v for k, v in outputs.items() if EXTRA not in k} if isinstance(outputs, dict) else outputs


def run_outputs(run: Path) -> dict:
    manifest = json.loads((run / "manifest.json").read_text())
    stages = manifest["stages"]
    return {
        "steps": {name: entry["steps"] for name, entry in stages.items() if "steps" in entry},
        # the summary sections, whichever rank ran the router or decided the experts
        "router": manifest["router"],
        "decided": {
            strategy: {
                group: (e.get("kept"), e.get("lambda"), e.get("reason")) for group, e in summary["experts"].items()
            }
            for strategy, summary in manifest["experts"].items()
        },
        "clusters": (run / "clusters.jsonl").read_text(),
        "keep": {str(p.relative_to(run)): json.loads(p.read_text()) for p in run.rglob("keep.json")},  # decisions, NLLs
        "adapters": {str(p.relative_to(run)): load_file(str(p)) for p in run.rglob("adapter_model.safetensors")},
        "losses": {str(p.relative_to(run)): json.loads(p.read_text())["loss"] for p in run.rglob("trainer_log.json")},
    }


@pytest.mark.heavy(seconds=60)
def test_with_8_gpus_every_rank_works_on_its_own_and_the_run_is_the_one_process_run(decided_tiny_run, tmp_path):
    """Model, every Trainer, routers, encoder, bank and sketch of rank r on cuda:r and no tensor on another GPU (peft's
    own adapter loading once put every rank's on GPU 0); Trainer without DataParallel (n_gpu 1, the config's batch);
    the warm-up and the generalist trained by both ranks together (DDP), the experts dealt over them; and the run is the
    one-process CPU run: the same optimizer steps and loss curves per adapter, clusters, keep decisions and adapters."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    launcher = [torchrun, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    launcher += ["--master_port", str(port), str(PROBE), "--fake-gpus", "8", "--out", str(tmp_path / "placement")]
    # a second routed strategy: two routers, keep decisions and thresholds to deal over the ranks
    run_command([[*launcher, "run", str(decided_run_config(tmp_path, also=("random-clusters",)))]], tmp_path)

    trained = {}
    for rank in (0, 1):
        placed = json.loads((tmp_path / "placement" / f"rank{rank}.json").read_text())
        own = f"cuda:{rank}"
        assert placed["pick_device"] == own and placed["backend"] == "nccl"
        assert placed["cuda_asked"] == [own] and placed["elsewhere"] == [], placed["elsewhere"]
        assert set(placed["set_device"]) == {own}  # cuda:0 never made current on rank 1 (a context on GPU 0)
        for kind in ("base_model", "encoder", "routers", "banks", "sketches"):
            assert placed[kind] and {entry["device"] for entry in placed[kind]} == {own}, kind
        assert placed["trainings"]
        for training in placed["trainings"]:
            assert (training["device"], training["n_gpu"]) == (own, 1), training
            assert training["train_batch_size"] == (4 if training["adapter"] == "warm-up" else 8), training
        trained[rank] = {training["adapter"] for training in placed["trainings"]}
        together = {t["adapter"]: (t["world_size"], t["wrapped"]) for t in placed["trainings"] if t["world_size"] > 1}
        on_every_record = ["warm-up", "single adapter 0", "single-continued adapter 0"]
        assert together == dict.fromkeys(on_every_record, (2, "DistributedDataParallel"))
    assert set(on_every_record) <= trained[0] & trained[1]  # data-parallel: both ranks train them
    assert trained[0] - trained[1] and trained[1] - trained[0]  # the experts dealt over the ranks

    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert "rank" not in stages["router/routed"] and stages[f"router/{EXTRA}"]["rank"] == 1  # dealt over the ranks
    # the keep decisions dealt group by group (test_keep.py shows both strategies' groups go in one deal); each
    # strategy's keep.json on rank 0
    dealt = {
        name: entry.get("rank", 0) for name, entry in stages.items() if re.fullmatch(rf"keep/(routed|{EXTRA})/\d", name)
    }
    assert len(dealt) == 6 and set(dealt.values()) == {0, 1}, dealt
    assert "rank" not in stages["keep/routed"] and "rank" not in stages[f"keep/{EXTRA}"]
    # the fall-back's one decision, nothing to deal it with, scored by both ranks: each its share of the records
    continued = stages["keep/single-continued/0"]
    shares, routed = continued["records_per_rank"], continued["decision"]["validation_records"]
    assert "rank" not in continued and len(shares) == 2 and min(shares) > 0 and sum(shares) == routed, shares
    for strategy in ("routed", EXTRA):  # and so is each threshold: every validation record, shared by the ranks
        threshold = stages[f"threshold/{strategy}"]
        shares, validation = threshold["records_per_rank"], threshold["validation_records"]
        assert "rank" not in threshold and len(shares) == 2 and min(shares) > 0 and sum(shares) == validation, shares
    one, eight = run_outputs(decided_tiny_run), run_outputs(tmp_path / "run")
    # rank 1's summaries reached the manifest: its router's accuracies, its experts' decisions
    assert eight["router"].keys() == {"routed", EXTRA} and eight["decided"][EXTRA]
    assert all(kept is not None for kept, _, _ in eight["decided"][EXTRA].values())
    eight = {part: without_extra(outputs) for part, outputs in eight.items()}  # the rest is the one-process run's
    assert eight["steps"] == one["steps"] and one["steps"]["experts/single/0"] == 4  # 16 samples, batch 8, 2 epochs
    assert eight["clusters"] == one["clusters"] and eight["keep"].keys() == one["keep"].keys()
    assert eight["decided"] == one["decided"] and eight["router"].keys() == one["router"].keys()
    for name, kept in one["keep"].items():  # the same decisions, on NLLs equal up to float rounding (DDP's sum order)
        assert eight["keep"][name]["fallback"] == kept["fallback"], name
        for group, decision in kept["groups"].items():
            other = eight["keep"][name]["groups"][group]
            assert (other["lambda"], other["reason"]) == (decision["lambda"], decision["reason"]), (name, group)
            assert other.get("fallback_nll") == pytest.approx(decision.get("fallback_nll"), abs=1e-4), (name, group)
    assert eight["losses"].keys() == one["losses"].keys() and "warmup/trainer_log.json" in one["losses"]
    for name, curve in one["losses"].items():  # DDP's averaged shares are the one-process global batches
        assert torch.allclose(torch.tensor(eight["losses"][name]), torch.tensor(curve), atol=1e-5), name
    assert eight["adapters"].keys() == one["adapters"].keys()
    for name, tensors in one["adapters"].items():
        assert all(torch.allclose(eight["adapters"][name][k], v, atol=1e-6) for k, v in tensors.items()), name


def test_trainer_takes_the_same_steps_whatever_the_gpus_it_sees(tmp_path):
    """The real Trainer, in this process, with 1, 2 and 8 GPUs faked: the batch is the plan's and the steps are the
    CPU's (DataParallel would have made a batch of 8 × GPUs and fewer steps), on this process's GPU only."""
    steps = {}
    for visible in (0, 1, 2, 8):
        loaded = fresh()
        train, _ = split(loaded, n=10, held=0)
        plan = TrainPlan(max_epochs=1, learning_rate=1e-3, batch_size=4, seed=0, patience=None)
        placements = placement.Placements(local_rank=0)
        with placement.fake_gpus(visible, placements) if visible else contextlib.nullcontext():
            device = pick_device("auto") if visible else torch.device("cpu")
            with placement.GpuRequests(placements, fake=bool(visible)):
                summary = train_adapter(
                    loaded.model,
                    train,
                    [],
                    loaded.tokenizer.pad_token_id,
                    device,
                    plan,
                    tmp_path / str(visible),
                    "k",
                    "t",
                )
        steps[visible] = summary["steps"]
        assert placements.data["cuda_asked"] == ({"cuda:0"} if visible else set())
    assert steps == {0: 3, 1: 3, 2: 3, 8: 3}  # 10 samples, batch 4: DataParallel over 2 or 8 would take 2 or 1
