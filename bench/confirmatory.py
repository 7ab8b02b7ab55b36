"""The confirmatory test of bench/protocol.md, recomputed from the committed result files alone.

Reads every result of `--results` (bench/experts.py runs named in the protocol), checks that each
was made by the protocol's code (its `code` is the protocol's commit), and judges H1–H3 by the
decision rules fixed there: per run, the mean over the test records of the paired difference in
NLL; over runs, the mean over seeds and its 95 % t-interval (the deciding interval), with each
run's record bootstrap and the two-level bootstrap over seeds and records beside it. Until every
run the protocol names is in, each hypothesis is `pending`. Also reports compute per arm and what
the score matrices cost (their stages' seconds against the rest of the run).

Writes `confirmatory.md` and `confirmatory.json` in `--out` and prints the Markdown.

    python bench/confirmatory.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from arms import compare, with_best_single
from plot_experts import paired_bootstrap

PROTOCOL = Path(__file__).resolve().parent / "protocol.md"
SEEDS = {("skills4", 200): [5, 6, 7, 8, 9, 10], ("mix4", 100): [5, 6, 7]}
# (name, data set, arm, comparator, rule): "below 0" — the interval's upper end below 0; "at most +0.003" — its upper end
HYPOTHESES = [
    ("H1", ("skills4", 200), [("routed", "best-single")], 0.0),
    ("H2", ("skills4", 200), [("routed", "embedding-clusters"), ("routed", "projection-clusters")], 0.0),
    ("H3", ("mix4", 100), [("routed", "best-single")], 0.003),
]
SECONDARY = [
    (("mix4", 100), "routed", "embedding-clusters"),
    (("mix4", 100), "routed", "projection-clusters"),
    (("skills4", 200), "single-continued", "single"),
    (("mix4", 100), "single-continued", "single"),
]


def protocol_commit() -> str:
    """The commit that added bench/protocol.md: the code every confirmatory run must be made with."""
    import subprocess

    done = subprocess.run(
        ["git", "-C", str(PROTOCOL.parent), "log", "--diff-filter=A", "--format=%H", "--", PROTOCOL.name],
        capture_output=True,
        text=True,
    )
    commits = done.stdout.split()
    if done.returncode or not commits:
        raise SystemExit(f"no commit adds {PROTOCOL} (a shallow clone? `git fetch --unshallow`)")
    return commits[-1]


def load(folder: Path) -> dict[tuple[str, int], dict[int, dict]]:
    runs: dict = {}
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        if isinstance(result, dict) and "dataset" in result:
            runs.setdefault((result["dataset"], result["per_label"]), {})[result["seed"]] = {
                **result,
                "file": path.name,
            }
    return runs


def per_run_bootstrap(run: dict, arm: str, baseline: str) -> tuple[float, float]:
    difference = np.array(run[arm]["per_record_nll"]) - np.array(run[baseline]["per_record_nll"])
    _, low, high = paired_bootstrap(difference)
    return low, high


def judge(comparisons: list[dict | None], bound: float, complete: bool) -> str:
    if not complete or any(c is None for c in comparisons):
        return "pending"
    highs = [c["t_interval_over_seeds"][1] for c in comparisons]
    if all(high < bound if bound == 0 else high <= bound for high in highs):
        return "confirmed"
    if bound == 0 and all(c["t_interval_over_seeds"][0] > 0 for c in comparisons):
        return "not confirmed: the arm is worse"
    return "not confirmed"


def scoring_cost(run: dict) -> float | None:
    """Seconds of the score matrices' stages over the seconds of everything else in the run."""
    seconds = run.get("stage_seconds") or {}
    matrices = sum(v or 0 for k, v in seconds.items() if k.startswith("scores/"))
    rest = sum(v or 0 for k, v in seconds.items() if not k.startswith("scores/"))
    return matrices / rest if rest else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("bench/results/confirmatory"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--commit", help="the protocol's commit (default: the one that added bench/protocol.md)")
    args = parser.parse_args()
    commit = args.commit or protocol_commit()
    loaded = load(args.results)
    lines = [
        "# Confirmatory test (bench/protocol.md → bench/confirmatory.py)",
        "",
        f"Protocol commit `{commit}`. Differences are test NLL, arm − comparator, per run the mean over the test records; "
        "the deciding interval is the 95 % t-interval over seeds.",
        "",
    ]
    report: dict = {"protocol_commit": commit, "runs": {}, "hypotheses": {}, "secondary": []}
    arms_by_key: dict = {}
    for key, wanted in SEEDS.items():
        present = loaded.get(key, {})
        foreign = {seed: run["code"] for seed, run in present.items() if run.get("code") != commit}
        runs = {
            seed: with_best_single(run)
            for seed, run in sorted(present.items())
            if seed in wanted and seed not in foreign
        }
        arms_by_key[key] = runs
        report["runs"][f"{key[0]}-{key[1]}"] = {
            "wanted": wanted,
            "present": sorted(runs),
            "not_from_the_protocol_commit": foreign,
            "best_single": {s: r["best-single"]["chosen"] for s, r in runs.items()},
            "scoring_cost": {s: scoring_cost(present[s]) for s in runs},
        }
        lines.append(
            f"- {key[0]}, {key[1]} per label: runs in for seeds {sorted(runs)} of {wanted}"
            + (f"; **not from the protocol's commit** (left out): {foreign}" if foreign else "")
            + (
                f"; best single (chosen on validation) per seed: {report['runs'][f'{key[0]}-{key[1]}']['best_single']}"
                if runs
                else ""
            )
        )
    lines.append("")
    lines += [
        "| hypothesis | comparison | seeds | mean | 95 % t-interval over seeds | record bootstrap (pooled) | per seed (record bootstrap) | verdict |",
        "| --- | --- | ---: | ---: | --- | --- | --- | --- |",
    ]
    for name, key, pairs, bound in HYPOTHESES:
        runs = arms_by_key[key]
        complete = sorted(runs) == SEEDS[key]
        comparisons = [compare(list(runs.values()), arm, base) for arm, base in pairs]
        verdict = judge(comparisons, bound, complete)
        report["hypotheses"][name] = {
            "data": f"{key[0]}-{key[1]}",
            "bound": bound,
            "verdict": verdict,
            "comparisons": comparisons,
        }
        for (arm, base), c in zip(pairs, comparisons):
            if c is None:
                lines.append(f"| {name} | {arm} − {base} | 0 | – | – | – | – | {verdict} |")
                continue
            low, high = c["t_interval_over_seeds"]
            seeds = "; ".join(
                f"{d:+.4f} ({a:+.4f} … {b:+.4f})"
                for d, (a, b) in zip(c["per_seed"], (per_run_bootstrap(r, arm, base) for r in runs.values()))
            )
            lines.append(
                f"| {name} | {arm} − {base} | {c['seeds']} | {c['mean']:+.4f} | {low:+.4f} … {high:+.4f} | "
                f"{c['record_bootstrap'][0]:+.4f} … {c['record_bootstrap'][1]:+.4f} | {seeds} | {verdict} |"
            )
    lines += ["", "Secondary (not deciding):", ""]
    for key, arm, base in SECONDARY:
        c = compare(list(arms_by_key[key].values()), arm, base)
        if c:
            report["secondary"].append({"data": f"{key[0]}-{key[1]}", **c})
            low, high = c["t_interval_over_seeds"]
            lines.append(
                f"- {key[0]}: {arm} − {base} ({c['seeds']} seeds): {c['mean']:+.4f}, t-interval {low:+.4f} … {high:+.4f}"
            )
    lines += [
        "",
        "Compute per arm (means over the runs in; steps, tokens and training seconds include the generalist branched from):",
        "",
        "| data | arm | test NLL | validation NLL | optimizer steps | tokens | train s | fall-back share |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, runs in arms_by_key.items():
        for arm in ("single", "single-continued", "routed", "embedding-clusters", "projection-clusters"):
            present = [r[arm] for r in runs.values() if arm in r]
            if not present:
                continue
            compute = [a["compute"] for a in present]
            mean = lambda field: statistics.mean(c.get(f"{field}_with_generalist", c.get(field)) or 0 for c in compute)
            # the share of test prompts a single adapter (the fall-back) answered: for a clustered arm, how often it fell back
            fallback = [
                sum(n for name, n in a["adapters_used"].items() if name.startswith(("single__", "single-continued__")))
                / max(sum(a["adapters_used"].values()), 1)
                for a in present
            ]
            share = f"{statistics.mean(fallback):.0%}" if arm not in ("single", "single-continued") else "–"
            lines.append(
                f"| {key[0]} | {arm} | {statistics.mean(a['by_label']['overall']['nll'] for a in present):.4f} | "
                f"{statistics.mean(a['validation_nll'] for a in present):.4f} | {mean('steps'):.0f} | {mean('tokens'):.0f} | "
                f"{mean('train_seconds'):.0f} | {share} |"
            )
    costs = [c for r in report["runs"].values() for c in r["scoring_cost"].values() if c is not None]
    if costs:
        lines += [
            "",
            f"Score matrices (both splits, every adapter): {statistics.mean(costs):.1%} of the rest of a run's stage time "
            f"(range {min(costs):.1%} … {max(costs):.1%}); the protocol's bound is 33 %.",
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "confirmatory.md").write_text("\n".join(lines) + "\n")
    (args.out / "confirmatory.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
