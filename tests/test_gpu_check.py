"""bench/gpu_check.py at tiny shapes: every part runs and reports sane numbers, so the prepared GPU check cannot rot."""

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.heavy(seconds=45)  # every part at tiny shapes, then the driver on two of them

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
PARTS = ["gradients", "gradients_8b", "sketch", "trainer", "quantized", "placement", "serve", "tests"]
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402  (bench/ is not a package)


def numbers(tree):
    """Every number in a JSON tree (booleans are not numbers here)."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    """Each part's own code at tiny shapes, through `gpu_check.child` as the driver's process for the part runs it, but in
    this process: a fresh interpreter per part would spend most of its seconds importing torch, transformers and peft
    again. The driver itself (a process per part, its budget, the JSON) is run by the two tests at the end."""
    folder = tmp_path_factory.mktemp("gpu-check")
    parts = {}
    for name in gpu_check.PARTS:
        result_file = folder / f"{name}.json"
        with contextlib.suppress(SystemExit):  # a part that fails records its error, then exits 1 for the driver
            gpu_check.child(name, True, result_file, gpu_check.TINY_SIZES.budgets[name])
        parts[name] = json.loads(result_file.read_text())
    return {"parts": parts}


def test_every_part_ran_without_error(tiny_result):
    assert list(gpu_check.PARTS) == PARTS  # the parts these tests know, in the driver's order
    for name, part in tiny_result["parts"].items():
        assert "error" not in part, f"{name}: {part['error']}"
        assert all(math.isfinite(v) for v in numbers(part)), name


def test_gradient_parts_report_rates_memory_and_exactness(tiny_result):
    small = tiny_result["parts"]["gradients"]
    for method in ("hooked", "plain"):
        assert small["samples_per_second"][method] > 0
        assert small["peak_memory_gib"][method] > 0
    assert small["ratio_hooked_vs_plain"] > 0 and small["memory_hooked_vs_plain"] > 0
    assert small["sum_of_rows_vs_batch_gradient_relative_error"] < 1e-3  # float32 on a CPU; bf16 on a GPU is looser
    large = tiny_result["parts"]["gradients_8b"]
    assert large["plan"]["lora_dim"] == 20_971_520  # the plan's 8 B all-linear d, read from bench/results/scale.json
    for variant in ("checkpointing", "no_checkpointing"):
        assert large[variant]["seconds_per_sample"] > 0 and large[variant]["peak_memory_gib"] > 0
        assert large[variant]["seconds_per_sample_vs_plan"] > 0


def test_sketch_stays_orthonormal_and_is_costed_against_the_plan(tiny_result):
    sketch = tiny_result["parts"]["sketch"]
    assert sketch["timed_samples"] > 0 and sketch["seconds_per_1000_samples"] > 0
    assert sketch["orthogonality_error_end_of_stream"] < 1e-4
    assert sketch["hours_vs_plan"] > 0


def test_trainer_and_server_report_throughput(tiny_result):
    trainer = tiny_result["parts"]["trainer"]
    assert trainer["steps"] >= 1 and trainer["steps_per_second"] > 0
    serve = tiny_result["parts"]["serve"]
    for clients in ("1_clients", "16_clients"):
        for mode in ("routed", "single"):
            assert serve[clients][mode]["requests_per_second"] > 0
        assert set(serve[clients]["routed"]["experts"]) <= {
            f"expert-{g}" for g in range(4)
        }  # routed, never the generalist
        assert serve[clients]["single"]["experts"] == {"generalist": serve[clients]["single"]["requests"]}
    assert len(serve["16_clients"]["routed"]["experts"]) >= 2  # the router spreads prompts, so batches can mix experts


def test_quantized_part_is_exact_and_trains_in_float32_lora(tiny_result):
    quantized = tiny_result["parts"]["quantized"]
    if "not_run" in quantized:
        pytest.skip(quantized["not_run"])
    exactness = quantized["exactness"]
    assert exactness["four_bit_layers"] == 14  # q, k, v, o, gate, up, down of both layers
    assert exactness["within_1e-5"]  # float32 on a CPU
    assert exactness["hooked_vs_unquantized_float32"] > 1e-3  # the rounding is real: the twin's match is not vacuous
    assert quantized["hooked"]["samples_per_second"] > 0 and quantized["hooked"]["peak_memory_gib"] > 0
    training = quantized["training"]
    assert training["steps"] >= 1 and training["steps_per_second"] > 0
    assert training["lora_dtypes"] == ["float32"] and training["lora_tensors_changed"] == training["lora_tensors"] > 0


def test_placement_part_runs_a_whole_run_and_reads_each_ranks_devices(tiny_result):
    placement = tiny_result["parts"]["placement"]
    assert placement["ranks"] == 1 and placement["every_rank_on_its_own_device"]  # no GPU here: one rank, the CPU
    (rank,) = placement["per_rank"].values()
    assert rank["banks"] == rank["sketches"] == rank["routers"] == ["cpu"] and rank["elsewhere"] == []
    assert {t["adapter"] for t in rank["trainings"]} >= {"warm-up", "single adapter 0", "routed adapter 0"}


def test_test_part_ran_the_selected_tests(tiny_result):
    tests = tiny_result["parts"]["tests"]
    assert tests["passed"] == 1 and tests["failed"] == tests["errors"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_full_sizes_refuse_to_start_without_cuda(tmp_path):
    out = tmp_path / "gpu-check.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device here; the full check needs one (use --tiny for the tiny shapes on any device)"
    ]
    assert not out.exists()


def test_a_part_past_its_budget_is_killed_and_the_next_part_runs(tmp_path):
    """One second is far less than building a model and starting a server takes anywhere: the serve part is killed."""
    out = tmp_path / "gpu-check.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--parts", "serve,sketch", "--budget", "serve=1", "--out", str(out)],
        cwd=ROOT,
        check=True,
        timeout=900,
    )
    result = json.loads(out.read_text())
    assert result["sizes"] == "tiny" and result["budgets_s"]["serve"] == 1 and result["wall_seconds"] > 0
    parts = result["parts"]
    assert list(parts) == ["serve", "sketch"]  # the parts asked for, in that order, each in the driver's JSON
    assert parts["serve"]["error"].startswith("timed out after its budget of 1 s")
    assert "error" not in parts["sketch"] and parts["sketch"]["seconds_per_1000_samples"] > 0
