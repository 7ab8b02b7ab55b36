"""Serving throughput and latency: routed experts vs one adapter through the same server, vs the ELREA ensemble.

A small real run (smollm2-135m on `--per-source` records per mix4-packaged domain, K = 4, one
epoch; made once, then reused) is served by `gradientspace serve` in its own process. N
concurrent streaming clients (`--concurrency`, default 1, 4, 16) send `--requests` chat requests
(at least `clients` per round)
from the mix4 test split (greedy, `--max-tokens`), once with `model: gradientspace` (each request
routed to its expert, experts mixed inside batches) and once pinned to the generalist (every
request on one adapter: a single-adapter server), the two alternating in `--rounds` rounds. Then the server stops and the ELREA-style
ensemble (one gradient per prompt, K + 1 forward passes per token) decodes the same prompts one
at a time through the Python API, the only way it runs.

Per setting: requests/s, p50 / p95 time to first token (request sent → first text chunk), and
completion tokens/s; then the ratios the serving claims rest on. In-process, one batch (`--mixed-rows`) is
also decoded on one adapter and mixing all adapters (peft's `adapter_names` vs StackedLoRA).

    python bench/serve.py > bench/results/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gradientspace.config import ServeConfig, config_from_run, load_config
from gradientspace.data.loading import load_records

ROOT = Path(__file__).resolve().parents[1]


def make_run(folder: Path, per_source: int) -> Path:
    """The run the bench serves: built once (every stage resumes), reused afterwards."""
    from gradientspace.clustering.stages import cluster
    from gradientspace.commands import elrea_centroids
    from gradientspace.experts.adapters import train_experts
    from gradientspace.routing.router import train_routers

    config = load_config(
        None,
        {
            "out": str(folder),
            "model.name": "smollm2-135m",
            "data.path": "mix4-packaged",
            "data.per_source": per_source,
            "data.max_length": 192,
            "cluster.method": "gradientspace",
            "cluster.k": 4,
            "experts.epochs": 1,
            "experts.strategies": ["routed", "single", "elrea-ensemble"],
        },
    )
    cluster(config)
    train_experts(config)
    train_routers(config)
    elrea_centroids(config)
    return folder


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(round(q * (len(ordered) - 1))), len(ordered) - 1)]


def summary(wall: float, first: list[float], tokens: int, requests: int) -> dict:
    return {
        "requests": requests,
        "seconds": round(wall, 2),
        "requests_per_second": round(requests / wall, 3),
        "ttft_p50_ms": round(1000 * percentile(first, 0.5), 1),
        "ttft_p95_ms": round(1000 * percentile(first, 0.95), 1),
        "tokens_per_second": round(tokens / wall, 2),
    }


async def load(url: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` concurrent streaming clients share the prompts; each sends its next one when the last is done."""
    queue: asyncio.Queue = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    first, tokens, experts = [], [0], {}

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            start, seen = time.perf_counter(), False
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                expert = response.headers["x-gradientspace-expert"]
                experts[expert] = experts.get(expert, 0) + 1
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens[0] += chunk["usage"]["completion_tokens"]
                    elif not seen and (
                        chunk["choices"][0]["delta"].get("content") or chunk["choices"][0]["finish_reason"]
                    ):
                        first.append(time.perf_counter() - start)
                        seen = True

    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"wall": wall, "first": first, "tokens": tokens[0], "requests": len(prompts), "experts": experts}


def interleaved(url: str, prompts: list[str], clients: int, max_tokens: int, rounds: int) -> dict:
    """Routed and single alternate, `rounds` times over halves of the prompts, so drifting load on a shared machine hits both alike."""
    parts: dict[str, list[dict]] = {"routed": [], "single": []}
    for round in range(rounds):
        share = prompts[round::rounds]
        for mode, model in (("routed", "gradientspace"), ("single", "generalist")):
            parts[mode].append(asyncio.run(load(url, model, share, clients, max_tokens)))
    merged = {}
    for mode, runs in parts.items():
        experts: dict[str, int] = {}
        for part in runs:
            for name, count in part["experts"].items():
                experts[name] = experts.get(name, 0) + count
        merged[mode] = {
            **summary(
                sum(r["wall"] for r in runs),
                [f for r in runs for f in r["first"]],
                sum(r["tokens"] for r in runs),
                sum(r["requests"] for r in runs),
            ),
            "experts": experts,
        }
    return merged


def start_server(run: Path, port: int, batch_window_ms: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gradientspace.cli",
            "serve",
            str(run),
            "--port",
            str(port),
            "--set",
            f"serve.batch_window_ms={batch_window_ms}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not start within 300 s")


def mixed_batch_decode(model, records, max_tokens: int, repeats: int = 2) -> dict:
    """Seconds to decode one batch of these prompts, `max_tokens` each: on one adapter, and mixing every served adapter
    through peft's `adapter_names` and through the adapter bank's StackedLoRA."""
    import torch

    from gradientspace.data.tokens import prompt_text
    from gradientspace.models.bank import StackedLoRA
    from gradientspace.routing.model import serving_names

    adapters = list(serving_names(model).values())
    rows = [adapters[i % len(adapters)] for i in range(len(records))]
    prompts = [model.tokenizer(prompt_text(model.tokenizer, r), add_special_tokens=False)["input_ids"] for r in records]
    width = max(map(len, prompts))
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stacked = StackedLoRA(model.model, adapters)

    def decode(**extra) -> None:
        model.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad,
            **extra,
        )

    def one_adapter() -> None:
        model.model.set_adapter(rows[0])
        decode()

    def stacked_mix() -> None:
        with stacked.batch(rows):
            decode()

    ways = {
        "one adapter": one_adapter,
        "mixed, peft adapter_names": lambda: decode(adapter_names=rows),
        "mixed, StackedLoRA": stacked_mix,
    }
    seconds = {}
    with torch.no_grad():
        one_adapter()  # untimed warm-up
        for name, way in ways.items():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                way()
                times.append(time.perf_counter() - start)
            seconds[name] = round(min(times), 3)
    return {
        "rows": len(rows),
        "adapters": len(adapters),
        "new_tokens": max_tokens,
        "seconds": seconds,
        "one adapter / peft mixed": round(seconds["one adapter"] / seconds["mixed, peft adapter_names"], 3),
        "one adapter / stacked mixed": round(seconds["one adapter"] / seconds["mixed, StackedLoRA"], 3),
    }


def ensemble(model, records, max_tokens: int) -> dict:
    """The ELREA-style ensemble through the Python API, one prompt at a time (each prompt mixes its own weights)."""
    model.generate("elrea-ensemble", records[:1], max_new_tokens=2)  # untimed warm-up
    first, tokens = [], 0
    start = time.perf_counter()
    for record in records:
        (generation,) = model.generate("elrea-ensemble", [record], max_new_tokens=max_tokens)
        first.append(generation.routing_seconds + generation.first_token_seconds)
        tokens += generation.new_tokens
    return summary(time.perf_counter() - start, first, tokens, len(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "bench" / "out" / "serve-run")
    parser.add_argument("--per-source", type=int, default=8, help="training records per mix4 domain for the run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per (mode, concurrency)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="routed and single alternate this many times per concurrency"
    )
    parser.add_argument("--ensemble-requests", type=int, default=4)
    parser.add_argument("--mixed-rows", type=int, default=16, help="rows of the in-process mixed batch")
    parser.add_argument("--repeats", type=int, default=2, help="in-process decodes per way (the fastest counts)")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=ServeConfig.batch_window_ms,
        help="how long the server waits for more requests to join a batch (serve.batch_window_ms)",
    )
    args = parser.parse_args()

    with contextlib.redirect_stdout(sys.stderr):  # the runner's skip / run lines; stdout is the JSON
        run = make_run(args.run, args.per_source)
    # every round keeps all clients busy: at least `clients` requests per round
    needed = {clients: max(args.requests, clients * args.rounds) for clients in args.concurrency}
    records, _ = load_records("mix4-packaged:test", per_source=-(-max(needed.values()) // 4), seed=0)
    prompts = [r.messages[-1]["content"] for r in records]
    url = f"http://127.0.0.1:{args.port}"
    server = start_server(run, args.port, args.batch_window_ms)
    results: dict = {
        "model": "smollm2-135m",
        "run": str(args.run),
        "max_tokens": args.max_tokens,
        "cpu_threads": os.cpu_count(),
        "batch_window_ms": args.batch_window_ms,
        "modes": {
            "routed": "model=gradientspace: routed, experts mixed in a batch",
            "single": "model=generalist: every request on one adapter",
        },
    }
    try:
        asyncio.run(load(url, "gradientspace", prompts[:4], 4, 4))  # untimed warm-up
        for clients in args.concurrency:
            for mode, numbers in interleaved(
                url, prompts[: needed[clients]], clients, args.max_tokens, args.rounds
            ).items():
                results.setdefault(mode, {})[str(clients)] = numbers
                print(f"{mode:<7} clients {clients:>2}: {numbers}", file=sys.stderr)
        results["engine"] = httpx.get(f"{url}/health").json()["engine"]
    finally:
        server.terminate()
        server.wait()
    from gradientspace.routing.model import StrategyModel

    model = StrategyModel(config_from_run(run), ["elrea-ensemble"])  # holds the routed experts too
    results["one batch decoded in-process"] = mixed_batch_decode(
        model, records[: args.mixed_rows], args.max_tokens, args.repeats
    )
    print(f"mixed batch: {results['one batch decoded in-process']}", file=sys.stderr)
    results["elrea-ensemble (Python API, sequential)"] = ensemble(
        model, records[: args.ensemble_requests], args.max_tokens
    )
    rate = lambda mode, n: results[mode][str(n)]["requests_per_second"]
    low, high = min(args.concurrency), max(args.concurrency)
    results["ratios"] = {
        **{
            f"routed / single requests/s at {n} clients": round(rate("routed", n) / rate("single", n), 3)
            for n in args.concurrency
        },
        **{
            f"routed / single tokens/s at {n} clients": round(
                results["routed"][str(n)]["tokens_per_second"] / results["single"][str(n)]["tokens_per_second"], 3
            )
            for n in args.concurrency
        },
        f"routed requests/s, {high} vs {low} clients": round(rate("routed", high) / rate("routed", low), 3),
        f"single requests/s, {high} vs {low} clients": round(rate("single", high) / rate("single", low), 3),
        f"routed at {low} client / ensemble requests/s": round(
            rate("routed", low) / results["elrea-ensemble (Python API, sequential)"]["requests_per_second"], 3
        ),
        f"ensemble / routed p50 time to first token at {low} client": round(
            results["elrea-ensemble (Python API, sequential)"]["ttft_p50_ms"]
            / results["routed"][str(low)]["ttft_p50_ms"],
            3,
        ),
    }
    results["targets"] = {
        "routed >= 0.9 x single requests/s at every concurrency": all(
            rate("routed", n) >= 0.9 * rate("single", n) for n in args.concurrency
        ),
        f"routed requests/s at {high} clients >= 3 x at {low}": rate("routed", high) >= 3 * rate("routed", low),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
