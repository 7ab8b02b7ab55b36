"""Which experts need not be trained? A rule on the interference statistics, chosen on development runs and tested on one more.

bench/interference.py found one statistic whose rank correlation with an expert's validation gain
excludes zero: the cosine between a gradient cluster's mean gradient and the rest's (a cluster
that points where the rest of the data points gains little from an expert of its own). Its level
differs between data sets (mix4's clusters sit at 0.28 … 0.50, skills4's at −0.10 … 0.25), so a
cut-off on the cosine itself would not carry from one data set to another; the rule ranks the
clusters of one run instead: skip the share q of them with the highest cosine (⌊q·K⌋ clusters).

For every run of bench/experts.py (its result file in `--results`, its gradient clusters'
statistics in the `interference-<run>.json` files of `--interference`) and each q, this counts
what the rule would have skipped: experts the keep rule had kept or blended on validation (a loss)
and optimizer steps of expert training (the saving). q is chosen on those development runs: the
largest share that skipped no kept expert. Every number it reads comes from training and validation;
the test split is not read, except for the what-if below.

- Leave one run out: q chosen on the other runs, applied to the one left out.
- Chance: the probability that ranking the clusters at random skips no kept expert in any run, at the
  chosen q (the product over runs of C(K − kept, m) / C(K, m), m = ⌊q·K⌋). The rule's direction and
  statistic were found on these same runs, so this is a description, not a test; a run made after
  the rule was fixed is the test.
- Test what-if: routed with the skipped clusters' prompts served by the generalist. Where every
  skipped expert had fallen back it is routed's own number (the rule changes nothing but the
  compute); otherwise it needs the result's `per_record_adapter`.

The rule (q = ¼) was chosen on the first nine runs and its prediction for skills4 seed 4 committed
before that run's experts trained (bench/results/experts-v2-predictions/). It failed there: the
keep rule blended the expert it would have skipped. With that run among them, no share skips no kept
expert (`chosen_share` is null), so the package has no `experts.select` option.

    python bench/selection.py --results bench/results/experts-v2 --interference bench/results --out bench/results/selection.json
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path

GENERALIST_ADAPTER = "single__0"
SHARES = (0.25, 0.5, 0.75)


def run_tag(result: dict) -> str:
    return f"{result['dataset']}-{result['per_label']}-seed{result['seed']}"


def clusters_of(result: dict, statistics: list[dict]) -> list[dict]:
    """A run's gradient clusters, highest cosine with the rest first: the order the rule skips them in."""
    experts = result["arms"]["routed"]["experts"]
    rows = [
        {
            "cluster": row["cluster"],
            "mean_cosine": row["mean_cosine"],
            "size": row["size"],
            "lambda": experts[row["cluster"]]["lambda"],
            "steps": experts[row["cluster"]]["steps"],
        }
        for row in statistics
    ]
    return sorted(rows, key=lambda row: -row["mean_cosine"])


def skipped(clusters: list[dict], share: float) -> list[dict]:
    return clusters[: int(share * len(clusters))]


def what_if_test_nll(result: dict, skip: list[dict]) -> float | None:
    """Routed's test NLL with the skipped clusters' prompts served by the generalist; None where that cannot be computed."""
    routed = result["arms"]["routed"]
    if all(row["lambda"] == 0 for row in skip):
        return routed["by_label"]["overall"]["nll"]
    if "per_record_adapter" not in routed:
        return None
    names = {f"routed__{row['cluster']}" for row in skip}
    generalist = result["arms"]["single"]["per_record_nll"]
    # a blended expert is served under its expert's name, so the name alone says which group served the record
    nll = [
        generalist[i] if adapter in names else own
        for i, (own, adapter) in enumerate(zip(routed["per_record_nll"], routed["per_record_adapter"]))
    ]
    return sum(nll) / len(nll)


def outcome(runs: dict[str, list[dict]], share: float) -> dict:
    """What skipping the top `share` of each run's clusters would have cost and saved, over the given runs."""
    lost = sum(row["lambda"] > 0 for clusters in runs.values() for row in skipped(clusters, share))
    saved = sum(row["steps"] for clusters in runs.values() for row in skipped(clusters, share))
    chance = 1.0
    for clusters in runs.values():
        kept, m = sum(row["lambda"] > 0 for row in clusters), int(share * len(clusters))
        chance *= comb(len(clusters) - kept, m) / comb(len(clusters), m)
    return {
        "share": share,
        "kept_experts_skipped": lost,
        "kept_experts": sum(row["lambda"] > 0 for c in runs.values() for row in c),
        "expert_steps_saved": saved,
        "expert_steps": sum(row["steps"] for c in runs.values() for row in c),
        "chance_of_skipping_no_kept_expert": chance,
    }


def choose_share(runs: dict[str, list[dict]]) -> float | None:
    """The largest share that skipped no kept expert on these runs (None: even a quarter would have)."""
    safe = [share for share in SHARES if outcome(runs, share)["kept_experts_skipped"] == 0]
    return max(safe) if safe else None


def analyse(results: list[dict], statistics: dict[str, list[dict]]) -> dict:
    by_tag = {run_tag(r): r for r in results if run_tag(r) in statistics and "routed" in r["arms"]}
    runs = {tag: clusters_of(result, statistics[tag]) for tag, result in sorted(by_tag.items())}
    chosen = choose_share(runs)
    held_out = {}
    for tag, clusters in runs.items():
        share = choose_share({t: c for t, c in runs.items() if t != tag})
        skip = skipped(clusters, share) if share else []
        held_out[tag] = {
            "share_chosen_on_the_others": share,
            "skipped": [row["cluster"] for row in skip],
            "kept_experts_skipped": sum(row["lambda"] > 0 for row in skip),
            "expert_steps_saved": sum(row["steps"] for row in skip),
            "expert_steps": sum(row["steps"] for row in clusters),
            "routed_test_nll": by_tag[tag]["arms"]["routed"]["by_label"]["overall"]["nll"],
            "routed_test_nll_with_skips": what_if_test_nll(by_tag[tag], skip),
        }
    return {
        "runs": runs,
        "by_share": [outcome(runs, share) for share in SHARES],
        "chosen_share": chosen,
        "leave_one_run_out": held_out,
    }


def load(results_folder: Path, interference_folder: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    results = [json.loads(p.read_text()) for p in sorted(results_folder.glob("*.json"))]
    statistics = {}
    for path in sorted(interference_folder.glob("interference-*-seed*.json")):
        rows = [row for row in json.loads(path.read_text())["clusters"] if row.get("strategy", "routed") == "routed"]
        statistics[path.stem.removeprefix("interference-")] = rows
    return results, statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results", type=Path, default=Path("bench/results/experts-v2"), help="bench/experts.py result files"
    )
    parser.add_argument(
        "--interference", type=Path, default=Path("bench/results"), help="folder of the interference-<run>.json files"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/selection.json"))
    args = parser.parse_args()
    analysis = analyse(*load(args.results, args.interference))
    args.out.write_text(json.dumps(analysis, indent=1) + "\n")
    print(f"{len(analysis['runs'])} runs; clusters by cosine with the rest, highest first (λ kept, steps):")
    for tag, clusters in analysis["runs"].items():
        print(
            f"  {tag:<20} "
            + "  ".join(
                f"{row['cluster']}: {row['mean_cosine']:+.2f} λ {row['lambda']:g} {row['steps']} steps"
                for row in clusters
            )
        )
    for row in analysis["by_share"]:
        print(
            f"skip the top {row['share']:.0%}: {row['kept_experts_skipped']} of {row['kept_experts']} kept experts skipped, "
            f"{row['expert_steps_saved']} of {row['expert_steps']} expert steps saved; at random, no kept expert skipped with "
            f"probability {row['chance_of_skipping_no_kept_expert']:.4f}"
        )
    print(f"chosen on these runs: {analysis['chosen_share']}")
    for tag, row in analysis["leave_one_run_out"].items():
        what_if = row["routed_test_nll_with_skips"]
        print(
            f"  left out {tag:<20} q = {row['share_chosen_on_the_others']} skips {row['skipped']}: {row['kept_experts_skipped']} kept expert(s), "
            f"{row['expert_steps_saved']} of {row['expert_steps']} steps; routed test NLL {row['routed_test_nll']:.4f} → "
            + (f"{what_if:.4f}" if what_if is not None else "not computable (no per_record_adapter)")
        )


if __name__ == "__main__":
    main()
