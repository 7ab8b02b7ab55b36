"""`gradientspace report RUN`: PNG figures of a run and one self-contained `report.html`, from its files only.

sketch map (by cluster, by source) · cluster × source composition · captured-energy curve ·
silhouette per K (`k: auto`) · per-domain NLL per strategy · latency per strategy (when timed) ·
training-loss curves.

`report.html` holds everything in one file a person can mail or open offline (figures embedded
as base64 PNG, no scripts, no external resources): the config, per-stage timings, the test data
scored and the result table, the clustering scores (NMI, purity, captured energy, the silhouette
of each K tried), each router's held-out accuracy, threshold and fall-backs, every figure, and a
cluster browser (its most distinctive terms, size, label composition, the prompts nearest each centroid in the sketch, and
the adapter that serves the cluster: the expert, its blend with the generalist, or the generalist
where its expert fell back, with the keep decision's reason and the cluster's interference statistics).
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from gradientspace.experts.adapters import served_fallback, served_groups
from gradientspace.experts.strategies import GENERALIST, ROUTED, STRATEGIES
from gradientspace.runner import Run
from gradientspace.runs import RunError, Stage, atomic_path


def _rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RunError(f"{path}:{number}: invalid JSON ({err.msg}); re-run the stage that wrote it") from None
    return rows


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); re-run the stage that wrote it") from None


def _subplots(*args, **kwargs):
    """pyplot's `subplots`, imported on first use: matplotlib takes a second to import, and every command imports this
    module for its stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path


def sketch_map(run: Run, out: Path) -> Path | None:
    if not run.path("sketch.safetensors").exists() or not run.path("clusters.jsonl").exists():
        return None
    coordinates = load_file(str(run.path("sketch.safetensors")))["coordinates"].double().numpy()
    unit = coordinates / np.maximum(np.linalg.norm(coordinates, axis=1, keepdims=True), 1e-30)
    clusters = [row["cluster"] for row in _rows(run.path("clusters.jsonl"))]
    sources = [row["source"] for row in _rows(run.path("samples.jsonl"))]
    panels = [("cluster", [str(c) for c in clusters])] + (
        [("source", sources)] if all(s is not None for s in sources) else []
    )
    figure, axes = _subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8), squeeze=False)
    for axis, (title, labels) in zip(axes[0], panels):
        for label in sorted(set(labels)):
            mask = np.array([l == label for l in labels])
            axis.scatter(unit[mask, 0], unit[mask, 1], s=12, alpha=0.75, label=label)
        axis.set_title(f"gradient sketch, coloured by {title}")
        axis.set_xlabel("component 1 (unit-normalised)")
        axis.set_ylabel("component 2")
        axis.legend(fontsize=8, markerscale=1.5)
    return _save(figure, out / "sketch_map.png")


def composition_heatmap(run: Run, out: Path) -> Path | None:
    table = run.stage_entry("cluster").get("composition")
    if not table:
        return None
    clusters = sorted(table, key=int)
    sources = sorted({s for row in table.values() for s in row})
    matrix = np.array([[table[c].get(s, 0) for s in sources] for c in clusters])
    figure, axis = _subplots(figsize=(1.2 * len(sources) + 2, 0.6 * len(clusters) + 1.8))
    image = axis.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        axis.text(j, i, str(value), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    axis.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
    axis.set_yticks(range(len(clusters)), [f"cluster {c}" for c in clusters])
    axis.set_title("cluster × source composition")
    figure.colorbar(image, ax=axis, shrink=0.8)
    return _save(figure, out / "composition.png")


def energy_curve(run: Run, out: Path) -> Path | None:
    curve = run.stage_entry("gradients").get("energy_curve")
    if not curve:
        return None
    rank = run.directory.manifest.get("config", {}).get("sketch", {}).get("rank")
    figure, axis = _subplots(figsize=(5.5, 4))
    axis.plot(range(1, len(curve) + 1), curve, marker=".")
    if rank:
        axis.axvline(rank, color="grey", linestyle="--", label=f"reported rank r = {rank}")
        axis.legend()
    axis.set_xlabel("components kept")
    axis.set_ylabel("captured energy ΣS² / Σ‖g‖²")
    axis.set_ylim(0, 1)
    axis.set_title("energy captured by the online SVD")
    return _save(figure, out / "energy_curve.png")


def nll_bars(results: dict, out: Path) -> Path | None:
    strategies = [s for s in results if isinstance(results[s], dict) and "overall" in results[s]]
    if not strategies:
        return None
    domains = results["domains"] + ["overall"]
    width = 0.8 / len(strategies)
    figure, axis = _subplots(figsize=(1.6 * len(domains) + 3, 4.2))
    for i, strategy in enumerate(strategies):
        values = [results[strategy][d]["nll"] or 0 for d in domains]
        axis.bar(np.arange(len(domains)) + i * width, values, width, label=strategy)
    axis.set_xticks(np.arange(len(domains)) + width * (len(strategies) - 1) / 2, domains)
    axis.set_ylabel("held-out response NLL (lower is better)")
    axis.set_title("per-domain NLL by strategy")
    axis.legend(fontsize=8)
    return _save(figure, out / "nll_by_domain.png")


def latency_bars(results: dict, out: Path) -> Path | None:
    """None when no strategy was timed (`evaluate.latency_prompts: 0`): an empty chart says nothing."""
    latency = {s: row for s, row in (results.get("latency") or {}).items() if row.get("first_token_ms") is not None}
    if not latency:
        return None
    strategies = list(latency)
    routing = [latency[s]["routing_ms"] or 0 for s in strategies]
    first = [latency[s]["first_token_ms"] or 0 for s in strategies]
    figure, axis = _subplots(figsize=(1.4 * len(strategies) + 3, 4.2))
    axis.bar(strategies, routing, label="routing / gradient")
    axis.bar(strategies, first, bottom=routing, label="first token")
    axis.set_ylabel("milliseconds per request")
    axis.set_title("time to first token, one request at a time")
    axis.tick_params(axis="x", rotation=25)
    axis.legend()
    return _save(figure, out / "latency.png")


def silhouette_curve(run: Run, out: Path) -> Path | None:
    """`k: auto`: the cosine silhouette of every K tried, the chosen K marked."""
    entry = run.stage_entry("cluster")
    scores = {int(k): v for k, v in (entry.get("silhouette") or {}).items()}
    if not scores:
        return None
    figure, axis = _subplots(figsize=(5.5, 4))
    axis.plot(sorted(scores), [scores[k] for k in sorted(scores)], marker="o")
    if entry.get("k") in scores:
        axis.axvline(entry["k"], color="grey", linestyle="--", label=f"chosen K = {entry['k']}")
        axis.legend()
    axis.set_xlabel("K")
    axis.set_ylabel("cosine silhouette")
    axis.set_title("k: auto — silhouette per K")
    return _save(figure, out / "silhouette.png")


def loss_curves(run: Run, out: Path) -> Path | None:
    """Training loss per step (moving average) and validation NLL per epoch of every adapter."""
    files = (
        sorted(run.directory.root.glob("warmup/trainer_log.json"))
        + sorted(run.directory.root.glob("experts/*/trainer_log.json"))
        + sorted(run.directory.root.glob("strategies/*/*/trainer_log.json"))
    )
    if not files:
        return None
    figure, (train_axis, validation_axis) = _subplots(1, 2, figsize=(11, 4.2))
    for path in files:
        log = json.loads(path.read_text())
        label = str(path.parent.relative_to(run.directory.root))
        losses = log["loss"]
        if len(losses) > 1:
            window = max(1, len(losses) // 20)
            train_axis.plot(np.convolve(losses, np.ones(window) / window, mode="valid"), label=label, linewidth=1.2)
        curve = log.get("validation_curve") or []
        if curve:
            epochs = [0] + [row["epoch"] for row in curve]
            values = [log.get("initial_eval_loss")] + [row["eval_loss"] for row in curve]
            validation_axis.plot(epochs, values, marker="o", label=label, linewidth=1.2)
    train_axis.set_xlabel("optimizer step")
    train_axis.set_ylabel("training loss (moving average)")
    validation_axis.set_xlabel("epoch (0 = where the adapter started)")
    validation_axis.set_ylabel("validation NLL")
    train_axis.set_title("training loss")
    validation_axis.set_title("validation NLL (early stopping keeps the minimum)")
    train_axis.legend(fontsize=7, ncol=2)
    return _save(figure, out / "training_loss.png")


# ---------------------------------------------------------------- report.html

NEAREST = 3  # prompts shown per cluster
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.9em}
th{background:#f0f3f7}td.n{text-align:right}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
details{border:1px solid #ddd;border-radius:4px;padding:.4em .8em;margin:.4em 0}summary{cursor:pointer;font-weight:600}
.prompt{white-space:pre-wrap;background:#f7f7f7;padding:.3em .5em;margin:.3em 0;font-size:.85em}code{font-size:.9em}"""


def _table(header: list[str], rows: list[list[object]]) -> str:
    cell = lambda v, tag: f"<{tag}{' class=n' if isinstance(v, (int, float)) else ''}>{html.escape(str(v))}</{tag}>"
    return (
        "<table><tr>"
        + "".join(cell(h, "th") for h in header)
        + "</tr>"
        + "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows)
        + "</table>"
    )


def _flat(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for name, value in tree.items():
        items.extend(_flat(value, f"{prefix}{name}.") if isinstance(value, dict) else [(f"{prefix}{name}", value)])
    return items


def _result_table(results: dict, strategies: list[str]) -> str:
    """eval.md's table as HTML: the same columns, so the two never disagree."""
    from gradientspace.evaluation.evaluate import markdown_table

    lines = markdown_table(results, strategies).splitlines()
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    return _table(cells(lines[0]), [cells(line) for line in lines[2:]])


def cluster_browser(run: Run) -> str:
    """Per cluster: its most distinctive terms, size, label composition, the prompts nearest its centroid (sketch coordinates), its adapter."""
    if not run.path("clusters.jsonl").exists() or not run.path("samples.jsonl").exists():
        return "<p>No clusters yet: run <code>gradientspace cluster</code>.</p>"
    clusters = np.array([row["cluster"] for row in _rows(run.path("clusters.jsonl"))])
    samples = _rows(run.path("samples.jsonl"))
    unit = None
    if run.path("sketch.safetensors").exists():
        coordinates = load_file(str(run.path("sketch.safetensors")))["coordinates"].double().numpy()
        if len(coordinates) == len(clusters):
            unit = coordinates / np.maximum(np.linalg.norm(coordinates, axis=1, keepdims=True), 1e-30)
    composition = run.stage_entry("cluster").get("composition") or {}
    interference = run.stage_entry("cluster").get("interference") or {}
    terms = run.stage_entry("cluster").get("terms") or {}
    served = served_groups(run, ROUTED) if run.path("experts", "partition.json").exists() else {}
    fallback = html.escape(_fallback_name(run, ROUTED)) if served else None
    decisions = run.stage_entry("keep/routed").get("groups") or {}
    parts = []
    for k in sorted(set(clusters.tolist())):
        members = np.flatnonzero(clusters == k)
        if unit is not None:  # spherical k-means: nearest = highest cosine to the mean direction
            scores = unit[members] @ unit[members].mean(axis=0)
            nearest = members[np.argsort(-scores)[:NEAREST]]
        else:
            nearest = members[:NEAREST]
        expert = run.stage_entry(f"experts/routed/{k}")
        path, weight = served.get(str(k), (None, None))
        reason = html.escape(str(decisions.get(str(k), {}).get("reason", "")))
        if weight is None:
            serves = "no expert trained yet: prompts routed here would get the warm-up adapter"
        elif weight == 0:  # its expert was trained but not kept on the validation records routed to it
            serves = f"the fall-back adapter ({fallback}): expert <code>experts/{k}/</code> is not served ({reason or 'it has no adapter'})"
        elif weight < 1:
            serves = f"<code>experts/{k}/blended/</code>, the fall-back's ({fallback}) and the expert's updates mixed at λ = {weight:g} ({reason})"
        else:
            serves = f"expert <code>experts/{k}/</code> ({expert.get('samples', '?')} samples, {expert.get('steps', '?')} steps{'; ' + reason if reason else ''})"
        body = [f"<p>Served by {serves}.</p>"]
        statistics = interference.get(str(k))
        if statistics:
            body.append(
                f"<p>Interference with the rest of the data: mean-gradient cosine {statistics['mean_cosine']:+.3f} "
                f"(low: this cluster's updates do little for the others), energy outside the others' leading directions "
                f"{statistics['outside_energy']:.3f} (high: directions of its own).</p>"
            )
        labels = composition.get(str(k)) or {}
        if labels:
            body.append(_table(["label", "records"], sorted(labels.items(), key=lambda kv: -kv[1])))
        body.append(f"<p>{'Nearest to the centroid' if unit is not None else 'First members'}:</p>")
        body.extend(
            f"<div class=prompt><b>{html.escape(str(samples[i]['id']))}</b>: {html.escape(samples[i].get('prompt', '(prompt not recorded)'))}</div>"
            for i in nearest
        )
        named = html.escape(", ".join(terms.get(str(k), [])))
        parts.append(
            f"<details open><summary>cluster {k} · {len(members)} samples{' · ' + named if named else ''}</summary>{''.join(body)}</details>"
        )
    return "".join(parts)


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "–" if value is None else str(value)


def clustering_section(run: Run) -> str:
    """How good the clusters are: the label metrics, the sketch's captured energy, and `k: auto`'s scores."""
    entry = run.stage_entry("cluster")
    if not entry.get("done"):
        return "<p>Not clustered yet: run <code>gradientspace cluster</code>.</p>"
    names = {
        "nmi": "NMI against `source`",
        "ari": "ARI against `source`",
        "purity": "purity against `source`",
        "captured_energy": "captured energy ΣS²/Σ‖g‖² (sketch rank r)",
        "within_cluster_cosine": "mean cosine to own centroid",
    }
    metrics = entry.get("metrics") or {}
    rows = [["method", entry.get("method", "–")], ["K", entry.get("k", "–")], ["sizes", entry.get("sizes", "–")]]
    rows += [[names.get(name, name), _number(value)] for name, value in metrics.items()]
    parts = [_table(["measure", "value"], rows)]
    if not any(name in metrics for name in ("nmi", "purity")):
        parts.append("<p>No NMI or purity: not every training record has a <code>source</code> label.</p>")
    silhouette = entry.get("silhouette")
    if silhouette:
        parts.append(
            "<p><code>k: auto</code> chose K by the cosine silhouette:</p>"
            + _table(
                ["K", "silhouette"],
                [[int(k), _number(v)] for k, v in sorted(silhouette.items(), key=lambda kv: int(kv[0]))],
            )
        )
    return "".join(parts)


def _fallback_name(run: Run, strategy: str) -> str:
    owner = served_fallback(run, strategy)[0]
    return "the generalist" if owner == GENERALIST else owner


def routing_section(run: Run) -> str:
    """Per routed strategy: the router's held-out accuracy, the threshold and how it was chosen, which experts fell back."""

    rows = []
    for name, strategy in STRATEGIES.items():
        if strategy.router_folder(run) is None:
            continue
        router_file = strategy.router_folder(run) / "router.json"
        partition_file = strategy.folder(run) / "partition.json"
        if not router_file.exists() and not partition_file.exists():
            continue
        router = _json(router_file) if router_file.exists() else {}
        partition = _json(partition_file) if partition_file.exists() else {}
        calibration = router.get("calibration") or {}
        chosen = (
            f"{_number(router.get('threshold'))}, chosen on {calibration['validation_records']} validation records "
            f"(NLL {_number(calibration.get('validation_nll'))}; always expert {_number(calibration.get('validation_nll_always_expert'))}, "
            f"always the fall-back {_number(calibration.get('validation_nll_always_fallback'))})"
            if calibration
            else _number(router.get("threshold")) + (" (set by hand)" if router.get("threshold") is not None else "")
        )
        served = served_groups(run, name) if partition else {}
        kept = [f"{g} (λ = {w:g})" if w < 1 else g for g, (_, w) in served.items() if w > 0]
        fallback = [g for g, (_, w) in served.items() if w == 0]
        rows.append(
            [
                name,
                _number(router.get("heldout_accuracy")),
                _number(router.get("train_accuracy")),
                chosen,
                _fallback_name(run, name) if partition else "–",
                ", ".join(kept) or "none",
                ", ".join(fallback) or "none",
            ]
        )
    if not rows:
        return "<p>No router yet: run <code>gradientspace train-router</code>.</p>"
    return (
        _table(
            [
                "strategy",
                "router held-out accuracy",
                "router train accuracy",
                "threshold (below it the fall-back answers)",
                "fall-back adapter",
                "experts served (blend weight λ)",
                "not served: the fall-back answers",
            ],
            rows,
        )
        + "<p>Each expert is judged on the validation records its router sends it: it is served, whole or blended with the "
        "fall-back adapter (λ), only if its NLL gain over the fall-back there is beyond a paired-bootstrap margin; otherwise "
        "its cluster's prompts are answered by the fall-back: the single adapter of record (<code>single-continued</code> "
        "where it beat the generalist on validation) unless <code>experts.fallback: generalist</code>.</p>"
    )


def scored_data(run: Run, results: dict) -> str:
    """Which test data the results come from: the run's `evaluate.data` (the last `evaluate --data` sets it) and how much of it."""
    settings = run.directory.manifest.get("config", {}).get("evaluate", {})
    limit = settings.get("limit")
    return (
        f"<p>Scored on <code>{html.escape(str(settings.get('data', '?')))}</code>: {results.get('test_records', '?')} test records"
        f"{f' (evaluate.limit = {limit})' if limit else ''}, domains {html.escape(', '.join(results.get('domains', [])))}.</p>"
    )


def latency_note(results: dict) -> str:
    timed = [row for row in (results.get("latency") or {}).values() if row.get("first_token_ms") is not None]
    return "" if timed else "<p>Latency was not measured (<code>evaluate.latency_prompts: 0</code>).</p>"


def write_html(run: Run, figures: list[Path], results: dict) -> Path:
    config = run.directory.manifest.get("config", {})
    stages = [
        [
            name,
            "done" if e.get("done") else "unfinished",
            e.get("seconds", "–"),
            str(e.get("key", ""))[:8],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(e["finished_at"])) if e.get("finished_at") else "–",
        ]
        for name, e in run.directory.manifest["stages"].items()
    ]
    strategies = [s for s in results if isinstance(results[s], dict) and "overall" in results[s]]
    images = "".join(
        f"<figure><img alt='{f.stem}' src='data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}'>"
        f"<figcaption>{f.name}</figcaption></figure>"
        for f in figures
    )
    sections = [
        f"<h1>GradientSpace run <code>{html.escape(str(run.directory.root))}</code></h1>",
        "<h2>Results</h2>"
        + (
            _result_table(results, strategies) + scored_data(run, results) + latency_note(results)
            if strategies
            else "<p>Not evaluated yet: run <code>gradientspace evaluate</code>.</p>"
        ),
        "<h2>Clustering</h2>" + clustering_section(run),
        "<h2>Routing</h2>" + routing_section(run),
        "<h2>Figures</h2>" + (images or "<p>No figures yet.</p>"),
        "<h2>Clusters</h2>" + cluster_browser(run),
        "<h2>Stages</h2>" + _table(["stage", "state", "seconds", "key", "finished"], stages),
        "<h2>Config</h2>" + _table(["key", "value"], [[k, json.dumps(v)] for k, v in _flat(config)]),
    ]
    page = (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>GradientSpace report: {html.escape(run.directory.root.name)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n"
    )
    with atomic_path(run.path("report.html")) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return run.path("report.html")


def make_report(run: Run) -> list[Path]:
    """Every figure the run's files allow, then report.html; returns their paths."""
    out = run.path("report")
    out.mkdir(parents=True, exist_ok=True)
    results = _json(run.path("eval.json")) if run.path("eval.json").exists() else {}
    figures = [
        sketch_map(run, out),
        composition_heatmap(run, out),
        energy_curve(run, out),
        silhouette_curve(run, out),
        nll_bars(results, out) if results else None,
        latency_bars(results, out) if results else None,
        loss_curves(run, out),
    ]
    figures = [f for f in figures if f is not None]
    return figures + [write_html(run, figures, results)]


class ReportStage(Stage):
    """Figures and `report.html`: cheap, and they read everything, so they are redrawn every time."""

    name = "report"
    always = True

    def inputs(self, run: Run) -> dict[str, str]:
        return {}

    def run(self, run: Run, key: str, record: dict) -> None:
        record["outputs"] = [str(f.relative_to(run.directory.root)) for f in make_report(run)]
