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
Then `plan`: the costed table of a 1 M × 8 B run on 8 and 64 H100s (bench/results/scale.md).

    python bench/scale.py                 # everything, ~20 min on 2 cores
    python bench/scale.py --parts sketch  # one part; results are merged into scale.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

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


# ---------------------------------------------------------------- driver


def _load(case: dict) -> str:
    """The 1-minute load average around a case, or the shared-machine load of the cases measured before it was recorded."""
    before_after = case.get("load_average_1min_before_after")
    return " / ".join(str(v) for v in before_after) if before_after else "10–14 (shared)"


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
    parser.add_argument("--parts", default="sketch,engine,loader,plan")
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
        parts_here = {"engine", "loader", "plan", "machine"} & set(results) & (set(parts) | {"machine"})
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
        (RESULTS / "scale.md").write_text(markdown)
        save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
