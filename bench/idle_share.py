"""How much of an 8-GPU node would sit idle during a run: its stages' times replayed on N ranks, with each stage placed
where the code places it now and where it placed it before issue 33 (the warm-up, the generalist and the other
adapters on every record now train data-parallel; the routers and thresholds of the strategies, and the keep decisions
of their groups, are now dealt over the ranks).

    python bench/idle_share.py RUN/manifest.json … --recorded-ranks 2 --ranks 8 --out bench/results

A manifest's stage seconds are turned into one process's seconds first, by where the code that made the run placed
each stage (the runs replayed here were made before issue 33, placed as `placement_before`): a stage every rank shared,
`EVERY`, took `--recorded-ranks` times its seconds in one process; a stage one rank ran took its own. Replayed on N ranks:
a `MAIN` stage keeps rank 0 busy while the others wait; an `EVERY` stage keeps all N busy for 1/N of its seconds (an
ideal split: the real one is no better, so the "now" column is a lower bound); consecutive `SPREAD` stages of one kind
(the experts, the routers, the keep decisions, the thresholds) are dealt as the runner deals them, the longest first to
the least-loaded rank (the keep decision of the strategy the others fall back to, one group, is an `EVERY` stage of its
own before theirs). A run made before the keep decisions were dealt per group has one keep stage per strategy: for
"now", its seconds are split over its groups in proportion to the validation records each was decided on (what a group
stage scores; the fixed cost of each stage, loading the adapters and routing the validation split, is left out, so the
split is optimistic). The idle share is 1 − busy / (N × wall). Writes `idle-share.json` and `idle-share.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradientspace.experts.strategies import GENERALIST  # noqa: E402
from gradientspace.runs import Placement  # noqa: E402

# Where a stage ran under torchrun before issue 33's changes (commit 1ba9b06), where it differs from now.
BEFORE = {
    "warmup": Placement.MAIN,
    f"experts/{GENERALIST}/0": Placement.MAIN,
    "router": Placement.MAIN,
    "keep": Placement.MAIN,
    "threshold": Placement.MAIN,
}


def placement_now(name: str) -> Placement:
    """The placement of the stage called `name`, read off the stage class that makes it."""
    from gradientspace.clustering.stages import ClusterStage, DataStage, GradientStage, WarmupStage
    from gradientspace.evaluation.evaluate import EvaluateStage
    from gradientspace.evaluation.scores import ScoreStage
    from gradientspace.experts.adapters import AdapterStage
    from gradientspace.routing.keep import KeepGroupStage, KeepStage
    from gradientspace.routing.router import RouterStage
    from gradientspace.routing.threshold import ThresholdStage

    kind, _, rest = name.partition("/")
    fixed = {"data": DataStage, "warmup": WarmupStage, "gradients": GradientStage, "cluster": ClusterStage}
    if kind in fixed:
        return fixed[kind].placement
    if kind == "keep":  # keep/<strategy>/<group> decides one group, keep/<strategy> writes the strategy's keep.json
        strategy, _, group = rest.partition("/")
        return KeepGroupStage(strategy, group).placement if group else KeepStage.placement
    by_strategy = {"router": RouterStage, "threshold": ThresholdStage}
    if kind in by_strategy:
        return by_strategy[kind].placement
    if kind == "experts":
        strategy, group = rest.split("/")
        return AdapterStage(strategy, group).placement
    if kind == "scores":
        return ScoreStage.placement
    if kind == "evaluate":
        return EvaluateStage.placement
    return Placement.MAIN  # partitions, summaries, cards, the report: seconds or less, on rank 0


def placement_before(name: str) -> Placement:
    if name.startswith("experts/") and name not in BEFORE:  # every adapter but the generalist was dealt
        return Placement.SPREAD
    return BEFORE.get(name, BEFORE.get(name.partition("/")[0], placement_now(name)))


def one_process_seconds(stages: dict, recorded_ranks: int) -> dict[str, float]:
    """Each finished stage's seconds in one process, for a run made before issue 33 on `recorded_ranks` processes."""
    return {
        name: entry.get("seconds", 0.0) * (recorded_ranks if placement_before(name) is Placement.EVERY else 1)
        for name, entry in stages.items()
        if entry.get("done")
    }


def keep_per_group(stages: dict, seconds: dict[str, float]) -> dict[str, float]:
    """`seconds` with each strategy's one keep stage (a run made before they were dealt per group) split over its groups,
    `keep/<strategy>/<group>`, in proportion to the validation records each group was decided on (evenly where none were)."""
    if any(name.startswith("keep/") and name.count("/") == 2 for name in seconds):
        return seconds  # recorded per group already
    split = {}
    for name, value in seconds.items():
        groups = stages[name].get("groups") if name.startswith("keep/") else None
        if not groups:
            split[name] = value
            continue
        records = {group: decision.get("validation_records", 0) for group, decision in groups.items()}
        total = sum(records.values())
        for group, count in records.items():
            split[f"{name}/{group}"] = value * (count / total if total else 1 / len(records))
    return split


def replay(seconds: dict[str, float], placement, ranks: int) -> dict:
    """Wall and busy seconds of the stages, in manifest order, on `ranks` ranks."""
    wall = busy = 0.0
    names = list(seconds)
    i = 0
    while i < len(names):
        name, where = names[i], placement(names[i])
        if where is Placement.SPREAD:
            kind, deal = name.partition("/")[0], []
            for following in names[i:]:  # the run of stages of this kind, dealt together
                if following.partition("/")[0] != kind or placement(following) is not Placement.SPREAD:
                    break
                deal.append(following)
            load = [0.0] * ranks
            for item in sorted(deal, key=lambda n: -seconds[n]):
                load[load.index(min(load))] += seconds[item]
            wall, busy, i = wall + max(load), busy + sum(load), i + len(deal)
            continue
        wall += seconds[name] / ranks if where is Placement.EVERY else seconds[name]
        busy += seconds[name]
        i += 1
    return {"wall_seconds": round(wall, 1), "idle_share": round(1 - busy / (ranks * wall), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifests", nargs="+", type=Path)
    parser.add_argument("--recorded-ranks", type=int, default=1, help="the ranks the runs were made with")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    rows = []
    for path in args.manifests:
        manifest = json.loads(path.read_text())
        seconds = one_process_seconds(manifest["stages"], args.recorded_ranks)
        now = keep_per_group(manifest["stages"], seconds)
        rows.append(
            {
                "run": path.parent.parent.name,
                "one_process_seconds": round(sum(seconds.values()), 1),
                "before": replay(seconds, placement_before, args.ranks),
                "now": replay(now, placement_now, args.ranks),
                "stage_seconds": seconds,  # one process's, as recorded: "before" replays these
                "stage_seconds_now": now,  # and "now" these (keep decisions split per group): redone from this file
            }
        )
    result = {"ranks": args.ranks, "recorded_ranks": args.recorded_ranks, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "idle-share.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Idle share of {args.ranks} ranks, replayed from stage times (bench/idle_share.py)",
        "",
        f"Stage times of runs made on {args.recorded_ranks} process(es), as one process's (`idle-share.json` holds them); a"
        " stage every rank shares is assumed to split perfectly, so both columns are lower bounds of the idle share.",
        "",
        "| run | one process (s) | wall before (s) | idle before | wall now (s) | idle now |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ] + [
        f"| {r['run']} | {r['one_process_seconds']} | {r['before']['wall_seconds']} | {r['before']['idle_share']:.0%} "
        f"| {r['now']['wall_seconds']} | {r['now']['idle_share']:.0%} |"
        for r in rows
    ]
    (args.out / "idle-share.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
