"""Scale measurements on this machine, and the costed plan for a 1 M-sample × 8 B run they feed.

Parts (each measured in a fresh subprocess, so its peak RSS is its own):
  sketch  : OnlineSVD on synthetic gradient streams of controlled spectrum (100 directions with
            σ_j ∝ 1/j, more than r' = 64, plus a full-rank noise floor): seconds per 1 000
            samples, peak RSS and ‖UᵀU − I‖ at d = 1 M, 5 M, 20 M, and a long stream at small d.
  engine  : peak memory of one gradient batch on smollm2-135m: the previous engine (outputs
            retained, one autograd.grad over all of them), the new one (written inside backward),
            the new one with activation checkpointing, and a plain batched fwd+bwd (the floor).
  loader  : validation + tokenisation of a 1 M-record synthetic JSONL into Arrow (seconds, peak
            RSS), against the previous shape (a list of parsed records).
Then `plan`: the costed table of a 1 M × 8 B run on 8 and 64 H100s (bench/results/scale.md), and
`memory`: the GPU memory per stage and per rank of a 70 B base (Llama-3-70B's shape, built on the
meta device) on 8 × 80 GB, replicated in bf16, in nf4, or sharded by FSDP2 (a plan, measured nowhere).

    python bench/scale.py                 # everything, ~20 min on 2 cores
    python bench/scale.py --parts sketch  # one part; results are merged into scale.json
    python bench/scale.py --parts memory  # the 70 B memory plan alone, ~30 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradientspace.config import ModelConfig, RunConfig

RESULTS = Path(__file__).resolve().parent / "results"

# (d, samples, block size). An update costs `sketch_flops(d, r', m)`, so N shrinks as d grows to keep
# the bench near 20 minutes on 2 cores, and the block shrinks at 20 M so that U + three blocks fit in
# 24 GiB; the long stream at small d (N = 50 000) shows the N-dependence (V's rotation) and the drift.
SKETCH_CASES = {
    16_000: (16_000, 50_000, 64),
    1_000_000: (1_000_000, 256, 64),
    5_000_000: (5_000_000, 128, 32),
    20_000_000: (20_000_000, 128, 16),
}
INTERNAL_RANK = 64


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so a later peak belongs to what ran after it."""
    Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------- sketch


class SyntheticStream:
    """Gradient rows with a known spectrum, without storing a d×R basis.

    Direction j is ±1/√w on its own block of w coordinates (disjoint blocks: orthonormal by
    construction); its coefficient is N(0, σ_j²), σ_j = 1/j. A noise floor (each row a random
    cyclic shift of one of four stored Gaussian vectors, scaled to `noise` of the energy) makes
    the data full rank, so the sketch truncates as it would on real gradients.
    """

    def __init__(self, dim: int, directions: int = 100, noise: float = 0.05, seed: int = 0):
        import torch

        self.torch = torch
        self.dim, self.directions = dim, directions
        if dim % directions:
            raise ValueError(f"d = {dim} must be a multiple of the {directions} directions")
        self.width = dim // directions
        self.generator = torch.Generator().manual_seed(seed)
        self.sigma = 1.0 / torch.arange(1, directions + 1, dtype=torch.float32)
        self.signs = (
            torch.randint(0, 2, (directions * self.width,), generator=self.generator) * 2 - 1
        ).float() / math.sqrt(self.width)
        self.pool = torch.randn(4, dim, generator=self.generator)
        self.noise_scale = math.sqrt(noise * float(self.sigma.square().sum()) / dim)

    def rows(self, count: int):
        torch = self.torch
        coefficients = torch.randn(count, self.directions, generator=self.generator) * self.sigma
        # directions divides every benchmarked d, so this product is the rows themselves (no second copy)
        rows = (coefficients.unsqueeze(-1) * self.signs.view(self.directions, self.width)).view(count, self.dim)
        shifts = torch.randint(0, self.dim, (count,), generator=self.generator).tolist()
        for i, shift in enumerate(shifts):
            rows[i] += torch.roll(self.pool[i % 4], shift) * self.noise_scale
        return rows


def sketch_case(dim: int, samples: int, block: int) -> dict:
    import torch

    from gradientspace.gradients.sketch import OnlineSVD

    torch.manual_seed(0)
    stream = SyntheticStream(dim)
    sketch = OnlineSVD(dim, rank=16, internal_rank=INTERNAL_RANK, block_size=block)
    reset_peak_rss()
    sketch_seconds = generate_seconds = 0.0
    timed = 0
    for start in range(0, samples, block):
        t0 = time.perf_counter()
        rows = stream.rows(min(block, samples - start))
        t1 = time.perf_counter()
        sketch.add(rows, list(range(start, start + len(rows))))
        del rows
        generate_seconds += t1 - t0
        if start >= INTERNAL_RANK:  # the first r' samples fill the basis with cheaper, narrower updates: untimed
            sketch_seconds += time.perf_counter() - t1
            timed += min(block, samples - start)
    drift = sketch.orthogonality_error()
    t0 = time.perf_counter()
    result = sketch.result()
    sketch_seconds += time.perf_counter() - t0
    top = result.singular_values.double()
    expected = stream.sigma[:16].double() * math.sqrt(samples)  # the signal's own singular values
    return {
        "dim": dim,
        "samples": samples,
        "block_size": block,
        "internal_rank": INTERNAL_RANK,
        "dtype": "float32",
        "timed_samples": timed,
        "seconds_per_1000_samples": round(1000 * sketch_seconds / timed, 3),
        "generate_seconds_excluded": round(generate_seconds, 1),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3),
        "model_bytes_gib": round((dim * INTERNAL_RANK + 3 * dim * block + samples * INTERNAL_RANK) * 4 / 2**30, 3),
        "orthogonality_error_end_of_stream": drift,
        "orthogonality_error_result": sketch.orthogonality_error(),
        "updates": sketch.updates,
        "reorthonormalize_every": sketch.reorthonormalize_every,
        "captured_energy_top16": round(result.captured_energy, 4),
        "top16_singular_values_vs_signal_max_rel": round(float(((top - expected).abs() / expected).max()), 4),
    }


# ---------------------------------------------------------------- engine


def retained_outputs_engine(model, input_ids, mask, labels):
    """The previous engine, kept here as the memory baseline: every LoRA output and input is held
    until one autograd.grad returns all output gradients together, then one einsum per module."""
    import torch

    from gradientspace.gradients.engine import lora_linears, per_sample_mean_loss

    modules = lora_linears(model)
    inputs, outputs = {}, {}

    def keep(position):
        def hook(module, args, output):
            inputs[position], outputs[position] = args[0].detach(), output

        return hook

    handles = [m.register_forward_hook(keep(p)) for p, (_, m) in enumerate(modules)]
    try:
        losses = per_sample_mean_loss(model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits, labels)
        grads = torch.autograd.grad(losses.sum(), [outputs[p] for p in range(len(modules))])
        keep = mask.unsqueeze(-1).float()
        return torch.cat(
            [
                torch.einsum("bto,bti->boi", g.float(), inputs[p].float() * keep).reshape(len(input_ids), -1)
                for p, g in enumerate(grads)
            ],
            dim=1,
        )
    finally:
        for handle in handles:
            handle.remove()


def engine_case(variant: str, dtype: str, targets: str, batch_size: int, max_length: int) -> dict:
    import torch

    from gradientspace.config import ModelConfig
    from gradientspace.data.records import Record
    from gradientspace.data.tokens import collate, tokenize
    from gradientspace.gradients.engine import PerSampleGradients, layout_of, per_sample_mean_loss
    from gradientspace.models.loading import load_lora_model

    torch.set_num_threads(2)
    target_modules = ["all-linear"] if targets == "all-linear" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    loaded = load_lora_model(
        ModelConfig(name="smollm2-135m", dtype=dtype, device="cpu", target_modules=target_modules), seed=0
    )
    model = loaded.model.eval()
    words = "gradient sketch cluster expert router token sample basis rank memory".split()
    # Responses long enough that every sample fills max_length: the same tokens for every variant.
    records = [
        Record(
            f"s{i}",
            [{"role": "user", "content": " ".join(words[(i + j) % 10] for j in range(60))}],
            " ".join(words[(i * 3 + j) % 10] for j in range(400)),
        )
        for i in range(batch_size)
    ]
    examples = tokenize(records, loaded.tokenizer, max_length)
    input_ids, mask, labels = collate(examples, loaded.tokenizer.pad_token_id)
    dim = layout_of(model).dim

    def run_once():
        if variant == "previous":
            return retained_outputs_engine(model, input_ids, mask, labels)
        if variant == "plain":
            model.zero_grad(set_to_none=True)
            per_sample_mean_loss(
                model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits, labels
            ).sum().backward()
            model.zero_grad(set_to_none=True)
            return None
        with PerSampleGradients(model, checkpointing=variant == "new+checkpointing") as engine:
            return engine.batch(input_ids, mask, labels)[0]

    baseline = current_rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    rows = run_once()
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes() - baseline
    checksum = None if rows is None else float(rows.double().norm())
    return {
        "variant": variant,
        "dtype": dtype,
        "targets": targets,
        "batch_size": batch_size,
        "tokens": int(mask.sum()),
        "dim": dim,
        "peak_increase_gib": round(peak / 2**30, 3),
        "seconds": round(seconds, 2),
        "gradient_norm": checksum,
    }


# ---------------------------------------------------------------- loader


def synthetic_jsonl(records: int) -> Path:
    path = RESULTS.parent / ".cache" / f"synthetic-{records}.jsonl"
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega tau rho".split()
        with open(path.with_suffix(".tmp"), "w") as handle:
            for i in range(records):
                prompt = " ".join(words[(i * 7 + j) % 13] for j in range(12 + i % 20))
                answer = " ".join(words[(i * 3 + j) % 13] for j in range(8 + i % 30))
                handle.write(
                    json.dumps({"id": f"r{i}", "instruction": prompt, "output": answer, "source": words[i % 4]}) + "\n"
                )
        path.with_suffix(".tmp").rename(path)
    return path


def loader_case(records: int, num_proc: int, mode: str, tokenize_records: int = 5_000) -> dict:
    """`datasets`: validate into Arrow from an empty cache, tokenise the first `tokenize_records`
    (`--tokenize-records`; the chat template and tokenizer cost ~0.6 ms per record per process on
    idle cores), then a cached reload; `python-list`: the previous loader's shape, one parsed
    `Record` per line held in a list (for the memory comparison)."""
    import resource
    import shutil

    from gradientspace.data.loading import load_dataset_records
    from gradientspace.data.records import _parse_record
    from gradientspace.data.tokens import tokenize_dataset
    from gradientspace.models.loading import load_tokenizer

    path = synthetic_jsonl(records)
    cache = str(path.with_suffix(".datasets"))
    shutil.rmtree(cache, ignore_errors=True)  # a cache left by an earlier run would make the first load a reload
    reset_peak_rss()
    t0 = time.perf_counter()
    if mode == "python-list":
        with open(path) as handle:
            held = [_parse_record(json.loads(line), f"{path}:{n}") for n, line in enumerate(handle, 1)]
        return {
            "mode": mode,
            "records": len(held),
            "load_seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3),
        }
    tokenizer = load_tokenizer("smollm2-135m")
    table, _ = load_dataset_records(str(path), cache_dir=cache, num_proc=num_proc)
    t1 = time.perf_counter()
    tokenized = tokenize_dataset(table[:tokenize_records], tokenizer, max_length=256, num_proc=num_proc)
    t2 = time.perf_counter()
    lengths = tokenized.data.column("length").to_numpy()  # one Arrow column, not a million Python objects
    again = tokenize_dataset(
        load_dataset_records(str(path), cache_dir=cache, num_proc=num_proc)[0][:tokenize_records],
        tokenizer,
        max_length=256,
    )
    t3 = time.perf_counter()
    return {
        "mode": mode,
        "records": len(table),
        "num_proc": num_proc,
        "load_seconds": round(t1 - t0, 1),
        "tokenized_records": len(tokenized),
        "tokenize_seconds": round(t2 - t1, 1),
        "tokenize_ms_per_record_per_process": round(1000 * (t2 - t1) * num_proc / len(tokenized), 3),
        "cached_reload_seconds": round(t3 - t2, 1),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3),
        "worker_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3),
        "mean_tokens": round(float(lengths.mean()), 1),
        "reload_hit_cache": again.cache_files == tokenized.cache_files,
        "file_gib": round(path.stat().st_size / 2**30, 3),
    }


# ---------------------------------------------------------------- plan

# Hardware and model figures the plan assumes (public spec-sheet numbers, rounded).
ASSUME = {
    "h100_bf16_dense_tflops": 989,
    "mfu": 0.40,
    "h100_fp32_tflops_tf32_off": 67,
    "hbm_tb_per_s": 3.35,
    "hbm_gib": 80,
    "nvlink_gb_per_s": 450,
    "ib_gb_per_s_per_gpu": 50,
    "model_params": 8.0e9,
    "tokens_per_sample": 512,
    "flops_per_token": "6·params: 2 forward + 2 backward (activation gradients only: the base is frozen, so no "
    "weight gradients, which is why it is not the usual 6 for full training) + 2 recomputation under checkpointing",
    # Llama-3-8B shapes: 32 layers, hidden 4096, 8 KV heads (k/v out 1024), MLP 14336. LoRA r = 8 on
    # q,k,v,o,gate,up,down: 32 · 8 · (2·8192 + 2·5120 + 3·18432) = 20 971 520 = d.
    "lora_rank": 8,
    "lora_dim_all_linear_8b": 20_971_520,
    "vocab": 128_256,
    "internal_rank": INTERNAL_RANK,
    "block_size": 64,
    "layers": 32,
    "hidden": 4096,
    "batch_per_gpu": 8,
}


def sketch_flops(d: int, r: int, m: int) -> float:
    """FLOPs of one OnlineSVD update of m columns: two Gram–Schmidt passes (UᵀC and U·P each, 8dr'm),
    CholeskyQR2 of the d×m block (two Gram products and two rotations, 8dm²), and the in-place
    rotation of [U Q] (2d(r'+m)r'). The r'×r' and (r'+m)² work is negligible at large d."""
    return 8 * d * r * m + 8 * d * m * m + 2 * d * (r + m) * r


def plan(measured: dict) -> tuple[dict, str]:
    """A 1 M-sample × 8 B run on 8 and 64 H100s, from the CPU measurements and the figures above."""
    a = ASSUME
    samples, d, r, m = 1_000_000, a["lora_dim_all_linear_8b"], a["internal_rank"], a["block_size"]
    tokens = samples * a["tokens_per_sample"]
    flops_per_token = 6 * a["model_params"]  # see ASSUME["flops_per_token"]
    gradient_gpu_hours = tokens * flops_per_token / (a["h100_bf16_dense_tflops"] * 1e12 * a["mfu"]) / 3600
    sketch_flops_per_sample = sketch_flops(d, r, m) / m
    # Each block streams U (d×r' float32) from HBM about six times (4 projection products, the rotation's read and write).
    sketch_bytes_per_sample = 6 * d * r * 4 / m
    sketch_seconds_per_sample = max(
        sketch_flops_per_sample / (a["h100_fp32_tflops_tf32_off"] * 1e12 * 0.5),
        sketch_bytes_per_sample / (a["hbm_tb_per_s"] * 1e12),
    )
    cpu = {c["dim"]: c for c in measured.get("sketch", [])}
    cpu_per_sample = {k: v["seconds_per_1000_samples"] / 1000 for k, v in cpu.items() if "error" not in v}
    # The flop model against the CPU: the same implied GFLOPS at every d means the cost is linear in d as modelled.
    implied_cpu_gflops = {
        k: round(sketch_flops(k, r, cpu[k]["block_size"]) / cpu[k]["block_size"] / v / 1e9, 2)
        for k, v in cpu_per_sample.items()
    }
    rows = []
    for gpus in (8, 64):
        per_rank = samples / gpus
        gradient_hours = gradient_gpu_hours / gpus
        sketch_hours = per_rank * sketch_seconds_per_sample / 3600
        u_bytes = d * r * 4
        v_bytes = per_rank * r * 4
        memory = {
            "model_bf16_gib": a["model_params"] * 2 / 2**30,
            "sketch_U_gib": u_bytes / 2**30,
            # the pending rows and the d×m block (Q is written over the block in place)
            "sketch_block_gib": 2 * d * m * 4 / 2**30,
            "sketch_V_gib": v_bytes / 2**30,
            "per_sample_grad_buffer_gib": a["batch_per_gpu"] * d * 4 / 2**30,
            # checkpointed: the layer inputs kept at the boundaries + one layer's activations (~34 h-wide bf16 tensors)
            "activations_checkpointed_gib": a["batch_per_gpu"]
            * a["tokens_per_sample"]
            * a["hidden"]
            * 2
            * (a["layers"] + 34)
            / 2**30,
            # float32 logits and their gradient for the per-sample cross-entropy
            "logits_fp32_gib": 2 * a["batch_per_gpu"] * a["tokens_per_sample"] * a["vocab"] * 4 / 2**30,
        }
        rounds = math.ceil(math.log2(gpus))
        # Each round: send one shard state (U and V) over the slowest link used, then one merge update with m = r'.
        merge_bytes = u_bytes + samples / gpus * r * 4
        link = a["nvlink_gb_per_s"] if gpus <= 8 else a["ib_gb_per_s_per_gpu"]
        merge_update_seconds = sketch_flops(d, r, r) / (
            a["h100_fp32_tflops_tf32_off"] * 1e12 * 0.5
        )  # one update, m = r'

        merge_seconds = rounds * (merge_bytes / (link * 1e9) + merge_update_seconds) + (
            gpus - 1
        ) / gpus * samples * r * 4 / (link * 1e9)
        rows.append(
            {
                "gpus": gpus,
                "gradient_pass_hours": round(gradient_hours, 2),
                "sketch_hours": round(sketch_hours, 3),
                "memory_per_rank_gib": {k: round(v, 3) for k, v in memory.items()},
                "memory_per_rank_total_gib": round(sum(memory.values()), 1),
                "merge_rounds": rounds,
                "merge_seconds": round(merge_seconds, 1),
                "wall_hours": round(gradient_hours + sketch_hours + merge_seconds / 3600, 2),
            }
        )
    details = {
        "assumptions": ASSUME,
        "sketch_flops_per_sample": sketch_flops_per_sample,
        "sketch_gpu_seconds_per_sample": sketch_seconds_per_sample,
        "gradient_gpu_hours_total": round(gradient_gpu_hours, 1),
        "cpu_sketch_seconds_per_sample_measured": cpu_per_sample,
        "cpu_implied_gflops": implied_cpu_gflops,
        "rows": rows,
    }
    if 20_000_000 in cpu_per_sample:
        details["cpu_sketch_hours_per_rank_if_on_cpu_64_ranks"] = round(
            cpu_per_sample[20_000_000] * samples / 64 / 3600, 1
        )
    return details, plan_markdown(details, measured)


def plan_markdown(details: dict, measured: dict) -> str:
    a = details["assumptions"]
    lines = [
        "# A 1 M-sample × 8 B run: costed plan",
        "",
        f"Model {a['model_params'] / 1e9:.0f} B parameters, bf16; LoRA r = {a['lora_rank']} on all linear layers "
        f"(d = {a['lora_dim_all_linear_8b']:,}); {a['tokens_per_sample']} tokens per sample; sketch r' = {a['internal_rank']}, "
        f"block m = {a['block_size']}, float32; batch {a['batch_per_gpu']} per GPU with activation checkpointing.",
        "",
        "| | 8 × H100 | 64 × H100 |",
        "| --- | --- | --- |",
    ]
    r8, r64 = details["rows"]

    def row(label, f):
        lines.append(f"| {label} | {f(r8)} | {f(r64)} |")

    row("gradient pass (h)", lambda r: r["gradient_pass_hours"])
    row("sketch, on the same GPU (h)", lambda r: r["sketch_hours"])
    row("memory per rank (GiB)", lambda r: r["memory_per_rank_total_gib"])
    row(
        "  of which model / U / block / V / grad buffer / activations / logits",
        lambda r: " / ".join(str(v) for v in r["memory_per_rank_gib"].values()),
    )
    row("merge: rounds, seconds", lambda r: f"{r['merge_rounds']}, {r['merge_seconds']}")
    row("wall time (h)", lambda r: r["wall_hours"])
    lines += [
        "",
        "Assumptions: H100 SXM bf16 dense {h100_bf16_dense_tflops} TFLOPS at {mfu:.0%} MFU for the model; "
        "float32 sketch on CUDA cores at {h100_fp32_tflops_tf32_off} TFLOPS × 50 %; HBM {hbm_tb_per_s} TB/s; "
        "NVLink {nvlink_gb_per_s} GB/s inside a node, InfiniBand {ib_gb_per_s_per_gpu} GB/s per GPU between nodes; "
        "6·params FLOPs per token = 2 forward + 2 backward (activation gradients only: the base is frozen) + 2 "
        "checkpointing recomputation. The per-sample LoRA einsums "
        "add 2·d·tokens per sample, < 0.1 % of the model's FLOPs.".format(**a),
        "",
        "Sketch cost per sample = 8dr' (two Gram–Schmidt passes) + 8dm (CholeskyQR2) + 2dr'(r'+m)/m (basis rotation) "
        f"= {details['sketch_flops_per_sample'] / 1e9:.1f} GFLOP; on the CPU here it measured "
        + ", ".join(
            f"{v:.3g} s/sample at d = {k:,}"
            for k, v in sorted(details["cpu_sketch_seconds_per_sample_measured"].items())
        )
        + " (implied "
        + ", ".join(f"{v} GFLOPS" for v in details["cpu_implied_gflops"].values())
        + ") on 2 idle cores (the load average around each case is in the table below). The CPU rates are not "
        "a GPU predictor: the GPU row is the flop count at the stated rate, and the CPU runs check the time's "
        "scaling in d, the memory and the orthogonality; "
        "it overlaps with the next batch's backward on another CUDA stream or runs after it (counted serially here).",
        "",
        "Merge: ⌈log₂ P⌉ rounds of `tree_merge`; each moves one shard state (U: d·r'·4 bytes, V: N/P·r'·4) "
        "and does one update with m = r', then rank 0 holds V for all N (N·r'·4 = "
        f"{1_000_000 * a['internal_rank'] * 4 / 2**30:.2f} GiB).",
    ]
    lines += ["", "## Measured on this machine (CPU; see `machine` in scale.json)", ""]
    engine = [c for c in measured.get("engine", []) if "error" not in c]
    if engine:
        lines += [
            "Gradient engine, smollm2-135m, LoRA r = 8 on q/k/v/o (d = {:,}), fp32, one batch of {} × {} tokens: peak RSS "
            "increase over the loaded model.".format(
                engine[0]["dim"], engine[0]["batch_size"], engine[0]["tokens"] // engine[0]["batch_size"]
            ),
            "",
            "| engine | peak increase (GiB) | seconds | ‖gradients‖ |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {c['variant']} | {c['peak_increase_gib']} | {c['seconds']} | {c['gradient_norm'] if c['gradient_norm'] is not None else '–'} |"
            for c in engine
        ]
        a = details["assumptions"]
        held = a["layers"] * (3 * 4096 + 2 * 1024 + 2 * 14336) * a["batch_per_gpu"] * a["tokens_per_sample"] * 4 / 2**30
        lines += [
            "",
            "Here the previous engine's extra, every LoRA output gradient held at once (30 layers × 1 536 floats "
            "per token × 512 tokens × 4 B ≈ 0.09 GiB), is inside the noise of a process's peak RSS, so previous and "
            "new measure alike; what the new engine buys here is that activation checkpointing works with it "
            f"(−44 %). At 8 B, all-linear, 8 × 512 tokens, the previous engine would hold {held:.1f} GiB of output "
            "gradients (32 layers × 43 008 floats per token, fp32) on top of everything else; the new one holds "
            f"its [batch, d] buffer ({a['batch_per_gpu'] * a['lora_dim_all_linear_8b'] * 4 / 2**30:.2f} GiB).",
        ]
    sketch = [c for c in measured.get("sketch", []) if "error" not in c]
    if sketch:
        lines += [
            "",
            "Sketch (float32, r' = 64), synthetic stream with 100 directions σ_j = 1/j over a full-rank noise floor:",
            "",
            "| d | N (timed) | block m | s / 1000 samples | peak RSS (GiB) | U+V+blocks (GiB) | ‖UᵀU − I‖ end of stream | after `result()` | load before / after |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {c['dim']:,} | {c['samples']} ({c['timed_samples']}) | {c['block_size']} | {c['seconds_per_1000_samples']} | {c['peak_rss_gib']} | "
            f"{c['model_bytes_gib']} | {c['orthogonality_error_end_of_stream']:.1e} | {c['orthogonality_error_result']:.1e} | {_load(c)} |"
            for c in sketch
        ]
    loader = (
        [c for c in measured.get("loader", []) if "error" not in c] if isinstance(measured.get("loader"), list) else []
    )
    if loader:
        lines += [
            "",
            "Loader, synthetic JSONL:",
            "",
            "| mode | records | seconds | peak RSS (GiB) | notes | load before / after |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for c in loader:
            if c["mode"] == "python-list":
                lines.append(
                    f"| list of parsed records (previous shape) | {c['records']:,} | {c['load_seconds']} | {c['peak_rss_gib']} | | {_load(c)} |"
                )
            else:
                lines.append(
                    f"| `datasets` → Arrow (validate) | {c['records']:,} | {c['load_seconds']} | {c['peak_rss_gib']} (workers ≤ {c['worker_peak_rss_gib']}) | "
                    f"{c['num_proc']} processes; tokenising {c['tokenized_records']:,} took {c['tokenize_seconds']} s "
                    f"({c['tokenize_ms_per_record_per_process']} ms/record/process); cached reload {c['cached_reload_seconds']} s | {_load(c)} |"
                )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- memory: a 70 B base on 8 × 80 GB

GIB = 2**30
GPUS, GPU_GIB = 8, 80
SAMPLES = 1_000_000  # the run the plan above costs; of the memory, only the sketch's V (N × r' floats) grows with it
MECHANISMS = {
    "bf16-replicated": "the whole base in bf16 on every rank",
    "nf4": "the base's decoder Linears in 4 bits (bitsandbytes NF4, as `model.quantization: nf4` loads it), "
    "the embedding, norms and output head in bf16, on every rank",
    "fsdp2": f"the bf16 base sharded by FSDP2 over the {GPUS} ranks (one unit per decoder layer, the root unit "
    "holding the embedding, final norm and output head), LoRA weights and Adam moments sharded with it",
}


def llama3_70b():
    """Llama-3-70B's shape, written out from its config.json: nothing is downloaded."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128_256,
        hidden_size=8192,
        intermediate_size=28_672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500_000.0,
        tie_word_embeddings=False,
    )


@dataclass
class ModelCount:
    """What the plan reads off a model's module tree, built on the meta device (no weight is allocated)."""

    params: int  # base parameters, tied ones once
    quantized: list[int]  # the size of each weight NF4 holds in 4 bits
    layers: int
    layer_params: int  # one decoder layer's: what FSDP2 gathers per unit
    lora_dim: int  # d: the gradient engine's layout at `model.lora_rank` on `model.target_modules`
    lora_inputs: int  # Σ in_features of one layer's LoRA-wrapped Linears
    lora_ranks: int  # Σ r of one layer's LoRA modules
    heads: int
    hidden: int
    intermediate: int
    vocab: int
    kv_width: int  # keys (and values) per token per layer: KV heads × head dim
    context: int


def count_model(hf_config, model: ModelConfig) -> ModelCount:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from gradientspace.gradients.engine import layout_of
    from gradientspace.models.loading import lora_config

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config)
    # transformers' bitsandbytes loading makes every plain Linear a 4-bit one but those it keeps (the output head)
    kept = HfQuantizer.get_modules_to_not_convert(base, None, base._keep_in_fp32_modules)
    quantized = [
        module.weight.numel()
        for name, module in base.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, kept)
    ]
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]  # the decoder layers
    params = sum(p.numel() for p in base.parameters())
    layer_params = sum(p.numel() for p in layers[0].parameters())
    layout = layout_of(get_peft_model(base, lora_config(model)))  # the project's targets, on the meta module tree
    lora_inputs = sum(shape[1] for name, shape in zip(layout.names, layout.shapes) if ".lora_A." in name)
    lora_ranks = sum(shape[1] for name, shape in zip(layout.names, layout.shapes) if ".lora_B." in name)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return ModelCount(
        params=params,
        quantized=quantized,
        layers=len(layers),
        layer_params=layer_params,
        lora_dim=layout.dim,
        lora_inputs=lora_inputs // len(layers),
        lora_ranks=lora_ranks // len(layers),
        heads=hf_config.num_attention_heads,
        hidden=hf_config.hidden_size,
        intermediate=hf_config.intermediate_size,
        vocab=hf_config.vocab_size,
        kv_width=hf_config.num_key_value_heads * head_dim,
        context=hf_config.max_position_embeddings,
    )


def nf4_weight_bytes(numel: int, double_quant: bool) -> int:
    """One weight as bitsandbytes holds it in NF4: two 4-bit codes per byte, the 16-value code (float32) and a
    float32 absmax per block of 64 values; double quant holds each absmax in 8 bits instead, plus a float32
    absmax per 256 of them, their 256-value code and an offset."""
    blocks = math.ceil(numel / 64)
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + 4 * 16 + scales


def base_bytes(count: ModelCount, precision: str, double_quant: bool = False) -> int:
    """The base's weights: every parameter in float32 or bfloat16, or (`nf4`) the quantised weights in 4 bits and
    the rest in bfloat16, the dtype `model.dtype: auto` gives them on a GPU."""
    if precision == "nf4":
        rest = count.params - sum(count.quantized)
        return sum(nf4_weight_bytes(n, double_quant) for n in count.quantized) + 2 * rest
    return count.params * {"float32": 4, "bfloat16": 2}[precision]


def base_weights(mechanism: str, count: ModelCount, double_quant: bool) -> dict[str, int]:
    """The base's bytes on one rank at its fullest moment."""
    if mechanism == "bf16-replicated":
        return {"base, bf16": base_bytes(count, "bfloat16")}
    if mechanism == "nf4":
        return {
            "base, nf4": base_bytes(count, "nf4", double_quant),
            # a batched 4-bit matmul dequantises its weight to bf16 first, one Linear at a time
            "one Linear dequantised": 2 * max(count.quantized),
        }
    root = count.params - count.layers * count.layer_params
    return {
        "base, bf16 shard": math.ceil(base_bytes(count, "bfloat16") / GPUS),
        # FSDP2 keeps the root unit gathered from forward to backward, where it is needed again at once
        "root unit gathered": 2 * root,
        # the layer computing and the next one, prefetched
        "two layers gathered": 2 * 2 * count.layer_params,
    }


def layer_activation_bytes(count: ModelCount, tokens: int, lora_input_bytes: int) -> int:
    """Bytes one decoder layer keeps per token for its backward (a Llama layer, flash / memory-efficient attention):
    each RMSNorm its float32 upcast of the input and reciprocal RMS (2 × (4h + 4)); attention q, k, v and its output
    in bf16 (4 × 2h: k and v repeated to every head, as transformers' SDPA path does under a padding mask), a
    float32 log-sum-exp per head and the padding mask in its additive bf16 form (2T: a [B, 1, T, T] per layer); the
    MLP SiLU's input, its output and up_proj's output, which the product needs (3 × 2i); each LoRA module its input
    cast to the adapter's dtype for A's weight gradient, and A's r outputs for B's (float32 in the gradient pass,
    bf16 under Trainer's autocast). A frozen base Linear keeps nothing: its weight's gradient is never asked for.
    `tests/test_scale.py` checks this against what autograd saves."""
    h, i = count.hidden, count.intermediate
    lora = (count.lora_inputs + count.lora_ranks) * lora_input_bytes
    return 2 * (4 * h + 4) + 4 * 2 * h + 4 * count.heads + 2 * tokens + 3 * 2 * i + lora


def activation_bytes(count: ModelCount, batch: int, tokens: int, lora_input_bytes: int, checkpointing: bool) -> int:
    one_layer = batch * tokens * layer_activation_bytes(count, tokens, lora_input_bytes)
    if checkpointing:
        # each layer's bf16 input kept at its boundary; one layer recomputed at a time, its tensors and their gradients
        return count.layers * batch * tokens * count.hidden * 2 + 2 * one_layer
    # every layer's tensors, and the gradients of one layer's as backward walks through it
    return (count.layers + 1) * one_layer


def loss_bytes(count: ModelCount, batch: int, tokens: int) -> int:
    """The output layer and loss, if every position predicts a labelled token (`response_losses` computes logits
    only where one does): bf16 logits, their float32 copy, the float32 log-probabilities cross-entropy keeps and
    the gradient it hands back, 12·B·T·V (scoring, without the gradient, is counted alike: an upper bound)."""
    return 12 * batch * tokens * count.vocab


def mask_bytes(rows: int, tokens: int) -> int:
    """transformers' boolean [B, 1, T, T] attention mask, built whenever a batch is padded."""
    return rows * tokens * tokens


def forward_bytes(count: ModelCount, rows: int, tokens: int) -> int:
    """A no-grad forward's fullest moment, inside one layer's MLP: gate, SiLU(gate) and up outputs in bf16 (3 × 2i),
    beside the residual stream and its normed copy in bf16 (2 × 2h), RMSNorm's float32 upcast and product (2 × 4h)
    and a LoRA input cast to float32 (4h)."""
    return rows * tokens * (3 * 2 * count.intermediate + 16 * count.hidden)


def kv_bytes(count: ModelCount, rows: int, tokens: int) -> int:
    """The KV cache: bf16 keys and values of every layer for every token."""
    return rows * tokens * count.layers * 2 * count.kv_width * 2


def merged_shards(rank: int) -> int:
    """How many ranks' shards `distributed.tree_merge` leaves on `rank`: rank 0 all of them, rank r the lowest set
    bit of r (it receives from r + 1, r + 2, r + 4 … below that bit; an odd rank only sends)."""
    return GPUS if rank == 0 else rank & -rank


def total(parts: dict[str, int]) -> int:
    return sum(parts.values())


def memory_plan(count: ModelCount, config: RunConfig) -> dict:
    """GiB per rank of every stage under each mechanism, for `count`'s model and `config`'s settings."""
    import inspect

    import torch

    from gradientspace.config import internal_rank
    from gradientspace.evaluation.scores import BATCH_SIZE as SCORE_BATCH
    from gradientspace.models.loading import quantization_config
    from gradientspace.routing.model import StrategyModel

    double_quant = quantization_config("nf4", torch.bfloat16).bnb_4bit_use_double_quant
    d, r_int, m = count.lora_dim, internal_rank(config.sketch), config.sketch.block_size
    tokens, lora = config.data.max_length, 4 * count.lora_dim  # LoRA weights stay float32 over any base
    decode_batch = inspect.signature(StrategyModel.generate).parameters["batch_size"].default
    k = config.cluster.k if isinstance(config.cluster.k, int) else config.cluster.k_max
    # The scoring and evaluation bank holds every adapter the run trained or blended (`scored_folders`), at most
    # (in adapters of rank r): per strategy K experts and K blends of rank 2r (peft's `cat` adds the ranks), the
    # generalist, single-continued and its blend, and the warm-up adapter (the gradient oracle's).
    bank_adapters = len(config.experts.strategies) * k * 3 + 1 + 1 + 2 + 1
    # `serve` holds one strategy's K experts and its fall-back, each a blend of rank 2r at most, and their
    # `StackedLoRA` copy
    serve_adapters = (k + 1) * 2 * 2
    prompt = min(config.serve.max_prompt_tokens or count.context, count.context - 1)

    def gradient_pass(weights: dict, shards: int, sketch_shards: int) -> list[dict]:
        """Each rank's fullest phase: the backward, a sketch update, or (a dense sketch) the tree merge.

        The sketch is float32 (`sketch.dtype`): U (d × r'), up to m pending gradient rows and, at an update, the
        d × m block they are copied into (its Q written over it), V (N_rank × r'). Row-sharded, one sketch spans
        every rank, each holding d/P rows of U and of each block (each batch's rows all-to-all'd), and V whole."""
        batch, rows = config.gradients.batch_size, math.ceil(d / sketch_shards)
        model = {**weights, "LoRA weights": lora // shards}
        sketch = {
            "sketch U": 4 * rows * r_int,
            "sketch pending rows": 4 * rows * m,
            "sketch V": 4 * SAMPLES * r_int // (GPUS if sketch_shards == 1 else 1),
        }
        backward = {
            **model,
            **sketch,
            "LoRA .grad": lora // shards,  # backward() also sums the batch's gradient into .grad
            "activations": activation_bytes(count, batch, tokens, 4, config.gradients.activation_checkpointing),
            "logits and loss": loss_bytes(count, batch, tokens),
            "attention mask": mask_bytes(batch, tokens),
            # the engine's [batch, d] buffer being written, and the previous batch's, which `stream_gradients` holds
            # until the new one returns (its normalised copy is among the pending rows)
            "per-sample gradients": 2 * 4 * batch * d,
        }
        update = {**model, **sketch, "sketch block": 4 * rows * m, "per-sample gradients": 4 * batch * d}
        if sketch_shards > 1:
            backward["all-to-all receive buffer"] = 4 * batch * d
            return [max(backward, update, key=total)] * GPUS
        per_rank = []
        for rank in range(GPUS):
            v = {"sketch V": 4 * SAMPLES // GPUS * merged_shards(rank) * r_int}
            # a sender holds its sketch and the copy on the device that NCCL sends
            send = {**model, **v, "sketch U, own and sent": 2 * 4 * d * r_int, "sketch pending rows": 2 * 4 * d * m}
            # a receiver flushes its own rows into a block beside the received U and rows, then folds in the
            # received U scaled by S: a third U
            flush = {
                **model,
                **v,
                "sketch U, own and received": 2 * 4 * d * r_int,
                "sketch rows and block": 3 * 4 * d * m,
            }
            fold = {**model, **v, "sketch U, own, received and scaled": 3 * 4 * d * r_int}
            merge = send if rank % 2 else max(flush, fold, key=total)
            per_rank.append(max(backward, update, merge, key=total))
        return per_rank

    def train(weights: dict, shards: int, batch: int) -> dict:
        """One adapter trained by Trainer (bf16 autocast on a GPU): float32 LoRA weights, their gradient and AdamW's
        two moments; bf16 LoRA inputs."""
        return {
            **weights,
            "LoRA weights, .grad, Adam moments": 4 * lora // shards,
            "activations": activation_bytes(count, batch, tokens, 2, config.train.activation_checkpointing),
            "logits and loss": loss_bytes(count, batch, tokens),
            "attention mask": mask_bytes(batch, tokens),
        }

    def scoring(weights: dict, shards: int) -> dict:
        """Teacher-forced NLL of every record under every adapter; the prompt features' pass keeps every layer's
        hidden state (`output_hidden_states`)."""
        bank = {**weights, "adapters": bank_adapters * lora // shards}
        nll = {
            **bank,
            "forward": forward_bytes(count, SCORE_BATCH, tokens),
            "logits and loss": loss_bytes(count, SCORE_BATCH, tokens),
        }
        hidden = {
            **bank,
            "forward": forward_bytes(count, SCORE_BATCH, tokens),
            "hidden states": (count.layers + 1) * SCORE_BATCH * tokens * count.hidden * 2,
        }
        return max(nll, hidden, key=total)

    def decoding(weights: dict, shards: int, rows: int, adapters: int, prompt: int, longest: int) -> dict:
        """transformers' `generate`: the prefill of `rows` prompts at once, then the KV cache grown to `longest`."""
        held = {**weights, "adapters": adapters * lora // shards}
        prefill = {
            **held,
            "KV cache": kv_bytes(count, rows, prompt),
            "forward": forward_bytes(count, rows, prompt),
            "attention mask": mask_bytes(rows, prompt),
        }
        end = {**held, "KV cache": kv_bytes(count, rows, longest), "attention mask": mask_bytes(rows, longest)}
        return max(prefill, end, key=total)

    mechanisms = {}
    for mechanism, what in MECHANISMS.items():
        weights = base_weights(mechanism, count, double_quant)
        shards = GPUS if mechanism == "fsdp2" else 1
        # rank 0 alone runs the warm-up (a MAIN stage) and `serve` (one process), unless FSDP2 needs every rank
        alone = [{}] * (GPUS - 1 if shards == 1 else 0)
        dense = gradient_pass(weights, shards, 1)
        sketch_shards = 1 if max(map(total, dense)) <= GPU_GIB * GIB else GPUS

        def serve(rows: int) -> dict:
            # each row up to the whole context: a request may ask for completion tokens up to it
            return decoding(weights, shards, rows, serve_adapters, prompt, count.context)

        one_row = total(serve(1)) - total(serve(0))  # a row's KV cache, prefill and mask
        # evaluation decodes prompts of at most `data.max_length` tokens, as the records it scores
        evaluation = decoding(
            weights, shards, decode_batch, bank_adapters, tokens, tokens + config.evaluate.max_new_tokens
        )
        stages = {
            "warm-up": [train(weights, shards, config.warmup.batch_size)] * (GPUS - len(alone)) + alone,
            "gradient pass": dense if sketch_shards == 1 else gradient_pass(weights, shards, sketch_shards),
            "expert training": [train(weights, shards, config.experts.batch_size)] * GPUS,
            "scoring": [scoring(weights, shards)] * GPUS,
            "decoding": [evaluation] * GPUS,
            "serve": [serve(config.serve.max_batch_size)] * (GPUS - len(alone)) + alone,
        }
        mechanisms[mechanism] = {
            "what": what,
            "sketch": "dense on every rank, merged by tree_merge"
            if sketch_shards == 1
            else f"row-sharded over {GPUS} ranks (the dense sketch does not fit beside the rest; not implemented: "
            "OnlineSVD holds all of U)",
            "stages": {
                name: {
                    "per_rank_gib": [round(total(parts) / GIB, 2) for parts in per_rank],
                    "fullest_rank_gib": {k: round(v / GIB, 3) for k, v in max(per_rank, key=total).items()},
                }
                for name, per_rank in stages.items()
            },
            "fits": all(total(parts) <= GPU_GIB * GIB for per_rank in stages.values() for parts in per_rank),
            "serve_rows_that_fit": max(0, (GPU_GIB * GIB - total(serve(0))) // one_row),
        }
    return {
        "settings": {
            "model.lora_rank": config.model.lora_rank,
            "model.target_modules": config.model.target_modules,
            "data.max_length": tokens,
            "warmup.batch_size": config.warmup.batch_size,
            "gradients.batch_size": config.gradients.batch_size,
            "gradients.activation_checkpointing": config.gradients.activation_checkpointing,
            "experts.batch_size": config.experts.batch_size,
            "train.activation_checkpointing": config.train.activation_checkpointing,
            "sketch.rank": config.sketch.rank,
            "sketch.internal_rank": r_int,
            "sketch.block_size": m,
            "sketch.dtype": config.sketch.dtype,
            "samples N": SAMPLES,
            "cluster.k": k,
            "experts.strategies": config.experts.strategies,
            "score batch (evaluation.scores.BATCH_SIZE)": SCORE_BATCH,
            "decode batch (StrategyModel.generate)": decode_batch,
            "evaluate.max_new_tokens": config.evaluate.max_new_tokens,
            "serve.max_batch_size": config.serve.max_batch_size,
            "serve prompt tokens": prompt,
            "nf4 double quant": double_quant,
        },
        "mechanisms": mechanisms,
    }


def memory() -> dict:
    """The plan at the project's defaults, then with the settings a 70 B run needs: every layer recomputed in the
    gradient pass and in training, and `serve` limited to the rows of full context that fit beside the nf4 base."""
    import gradientspace.experts.strategies  # noqa: F401  registers the strategies `experts.strategies` defaults to
    from gradientspace.config import load_config

    config, shape = load_config(), llama3_70b()
    count = count_model(shape, config.model)
    defaults = memory_plan(count, config)
    rows = defaults["mechanisms"]["nf4"]["serve_rows_that_fit"]
    overrides = {
        "gradients.activation_checkpointing": True,
        "train.activation_checkpointing": True,
        "serve.max_batch_size": max(rows, 1),
    }
    return {
        "model": {
            "shape": f"Llama-3-70B: hidden {shape.hidden_size}, {shape.num_hidden_layers} layers, "
            f"{shape.num_attention_heads} heads, {shape.num_key_value_heads} KV heads, intermediate "
            f"{shape.intermediate_size}, vocabulary {shape.vocab_size}, context {shape.max_position_embeddings}",
            "parameters": count.params,
            "nf4_parameters": sum(count.quantized),
            "lora_dim": count.lora_dim,
            "base_gib": {
                "float32": round(base_bytes(count, "float32") / GIB, 2),
                "bfloat16": round(base_bytes(count, "bfloat16") / GIB, 2),
                "nf4": round(base_bytes(count, "nf4") / GIB, 2),
                "nf4, double quant": round(base_bytes(count, "nf4", double_quant=True) / GIB, 2),
            },
        },
        "gpus": GPUS,
        "gpu_gib": GPU_GIB,
        "defaults": defaults,
        "at_scale_overrides": overrides,
        "at_scale": memory_plan(count, load_config(overrides=overrides)),
    }


def memory_markdown(result: dict) -> str:
    model, settings = result["model"], result["defaults"]["settings"]
    names = {"bf16-replicated": "bf16, replicated", "nf4": "nf4, replicated", "fsdp2": f"bf16, FSDP2 over {GPUS}"}

    def table(plan: dict) -> list[str]:
        lines = ["| stage | " + " | ".join(names.values()) + " |", "| --- |" + " ---: |" * len(names)]
        for stage in next(iter(plan["mechanisms"].values()))["stages"]:
            cells = []
            for mechanism in names:
                gib = max(plan["mechanisms"][mechanism]["stages"][stage]["per_rank_gib"])
                cells.append(f"{gib:.1f}" + (" ✗" if gib > GPU_GIB else ""))
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        fullest = [max(max(s["per_rank_gib"]) for s in plan["mechanisms"][m]["stages"].values()) for m in names]
        fits = ["yes" if plan["mechanisms"][m]["fits"] else "no" for m in names]
        return lines + [
            "| headroom of the fullest stage (GiB) | " + " | ".join(f"{GPU_GIB - gib:.1f}" for gib in fullest) + " |",
            f"| **every stage ≤ {GPU_GIB} GiB** | " + " | ".join(fits) + " |",
        ]

    overrides = result["at_scale_overrides"]
    sketch = {m: p["sketch"] for m, p in result["at_scale"]["mechanisms"].items()}
    return (
        "\n".join(
            [
                f"# A 70 B base on {GPUS} × {GPU_GIB} GB: memory per stage and rank",
                "",
                f"{model['shape']} ({model['parameters'] / 1e9:.1f} B parameters, counted on the meta device); base "
                f"{model['base_gib']['bfloat16']} GiB in bf16, nf4 "
                f"{model['base_gib']['nf4, double quant']} GiB with the double quantisation `model.quantization: nf4` uses; "
                f"{model['base_gib']['nf4']} without. "
                f"LoRA r = {settings['model.lora_rank']} on {'/'.join(settings['model.target_modules'])} "
                f"(d = {model['lora_dim']:,}); batch {settings['gradients.batch_size']} × {settings['data.max_length']} "
                f"tokens; sketch r = {settings['sketch.rank']} (r' = {settings['sketch.internal_rank']}, "
                f"m = {settings['sketch.block_size']}, {settings['sketch.dtype']}), N = {settings['samples N']:,}. "
                f"GiB on the fullest rank (each rank's in `memory` of scale.json); ✗: over {GPU_GIB} GiB.",
                "",
                "At the project's defaults:",
                "",
                *table(result["defaults"]),
                "",
                "With " + ", ".join(f"`{key}: {str(value).lower()}`" for key, value in overrides.items()) + ":",
                "",
                *table(result["at_scale"]),
                "",
                "Sketch: " + "; ".join(f"{names[m]}: {s}" for m, s in sketch.items()) + ". A dense sketch's "
                "gradient pass is fullest in the tree merge on an even rank, the model still loaded: its U and the "
                "received one, both sides' unflushed rows (m − 1 at most, counted as m) and the block they are "
                "flushed into.",
                "",
                "Weights and parameter counts come from the module tree (transformers' Llama on `meta`, peft's LoRA "
                "on the project's targets, the engine's gradient layout, transformers' rule for which Linears "
                "bitsandbytes quantises); activations, logits, per-sample buffers, KV cache and sketch are formulas "
                "(`bench/scale.py`, each commented). Warm-up and `serve` run on rank 0 alone unless FSDP2 needs every "
                "rank; FSDP2 decoding gathers every layer for every token (fits, slow). The MiniLM router (0.1 GiB) "
                "and the CUDA context are left out.",
            ]
        )
        + "\n"
    )


# ---------------------------------------------------------------- driver


def _load(case: dict) -> str:
    """The 1-minute load average around a case, or the shared-machine load of the cases measured before it was recorded."""
    before_after = case.get("load_average_1min_before_after")
    return " / ".join(str(v) for v in before_after) if before_after else "10–14 (shared)"


def write_section(markdown: str) -> None:
    """scale.md holds one `# ` section per part that writes one (plan, memory): this one's replaced, the others kept."""
    path = RESULTS / "scale.md"
    text = path.read_text() if path.exists() else ""
    sections = [s.rstrip("\n") + "\n" for s in re.split(r"(?m)^(?=# )", text) if s.strip()]
    titles = [s.split("\n", 1)[0] for s in sections]
    title = markdown.split("\n", 1)[0]
    if title in titles:
        sections[titles.index(title)] = markdown
    else:
        sections.append(markdown)
    RESULTS.mkdir(exist_ok=True)
    path.write_text("\n".join(sections))


def child(part: str, spec: dict) -> dict:
    """Run one case in a fresh interpreter (its own peak RSS); returns its JSON."""
    env = {**os.environ, "PYTHONPATH": str(RESULTS.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    load_before = os.getloadavg()[0]
    out = subprocess.run(
        [sys.executable, __file__, "--child", part, json.dumps(spec)], capture_output=True, text=True, env=env
    )
    # the timings move with what else runs on the cores: each case says how busy they were
    load = {"load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if out.returncode != 0:
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
            **spec,
            **load,
        }
    return {**json.loads(out.stdout.strip().splitlines()[-1]), **load}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="sketch,engine,loader,plan,memory")
    parser.add_argument("--loader-records", type=int, default=1_000_000)
    parser.add_argument("--sketch-dims", default=",".join(str(d) for d in SKETCH_CASES))
    parser.add_argument("--engine-variants", default="plain,previous,new,new+checkpointing")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument(
        "--tokenize-records",
        type=int,
        default=5_000,
        help="records the loader case tokenises (all: the same as --loader-records)",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        part, spec = args.child[0], json.loads(args.child[1])
        print(json.dumps({"sketch": sketch_case, "engine": engine_case, "loader": loader_case}[part](**spec)))
        return

    out_file = RESULTS / "scale.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    parts = args.parts.split(",")
    results["machine"] = {
        "cpus": os.cpu_count(),
        "note": "CPU only, no GPU in these sessions; each case records the 1-minute load average "
        "before and after it (cases without it ran beside other jobs at load 10–14, several times slower than idle)",
    }

    def save() -> None:
        """After every part, so a stopped run keeps what it measured; re-read first, so that runs of
        other parts that finished meanwhile are kept."""
        RESULTS.mkdir(exist_ok=True)
        on_disk = json.loads(out_file.read_text()) if out_file.exists() else {}
        parts_here = {"engine", "loader", "plan", "memory", "machine"} & set(results) & (set(parts) | {"machine"})
        merged = {**on_disk, **{k: results[k] for k in parts_here}}
        if "sketch" in results and "sketch" in parts:
            dims = {c["dim"] for c in results["sketch"]}
            merged["sketch"] = sorted(
                [c for c in on_disk.get("sketch", []) if c["dim"] not in dims] + results["sketch"],
                key=lambda c: c["dim"],
            )
        results.update(merged)
        out_file.write_text(json.dumps(results, indent=2) + "\n")

    if "sketch" in parts:
        for dim in [int(d) for d in args.sketch_dims.split(",")]:
            d, n, m = SKETCH_CASES[dim]
            kept = [c for c in results.get("sketch", []) if c.get("dim") != d]
            results["sketch"] = sorted(
                kept + [child("sketch", {"dim": d, "samples": n, "block": m})], key=lambda c: c["dim"]
            )
            save()
    if "engine" in parts:
        variants = args.engine_variants.split(",")
        results["engine"] = [c for c in results.get("engine", []) if c["variant"] not in variants] + [
            child("engine", {"variant": v, "dtype": "float32", "targets": "qkvo", "batch_size": 4, "max_length": 128})
            for v in variants
        ]
        save()
    if "loader" in parts:
        results["loader"] = [
            child(
                "loader",
                {
                    "records": args.loader_records,
                    "num_proc": args.num_proc,
                    "mode": mode,
                    "tokenize_records": args.tokenize_records,
                },
            )
            for mode in ("python-list", "datasets")
        ]
        save()
    if "plan" in parts:
        results["plan"], markdown = plan(results)
        write_section(markdown)
        save()
    if "memory" in parts:
        results["memory"] = memory()
        write_section(memory_markdown(results["memory"]))
        save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
