"""Routing policies compared from the score matrices alone: which adapter should answer each prompt?

Every run of bench/experts.py leaves, beside its result, `<result>-scores/{validation,test}/`: the NLL of
every record under every adapter the run trained or blended, each router's probabilities, and the
prompt features (`gradientspace/evaluation/scores.py`). A policy here picks, for each record, one
adapter among a candidate set, so no policy needs a new run. Two sets: `served`, the adapters routed
experts serve (each gradient cluster's adapter as served — expert, blend, or the fall-back where its
expert was not kept — and the fall-back); `trained`, every adapter the gradient clusters trained or
blended, dropped experts included, and the fall-back.
Every choice a policy makes (a regularisation strength, a number of neighbours) is made on the
validation records; the test records are scored once.

| policy | what picks the adapter |
| --- | --- |
| fall-back | always the fall-back (the single adapter of record): the baseline |
| router | the run's MiniLM router with its validation-chosen threshold, as served |
| nearest-centroid | the gradient cluster whose centroid is nearest the record's own response gradient on the sketch basis (needs the answer: the gradient oracle) |
| logistic-hidden | multinomial logistic regression on the base model's mean-pooled prompt hidden state, trained on validation to predict each record's best adapter; C by 5-fold cross-validation |
| knn-embedding | the adapter with the lowest mean validation NLL among the record's k nearest validation prompts (MiniLM cosine); k by leave-one-out |
| oracle | each test record's best adapter among the same ones (the ceiling) |

Per data set: each policy's test NLL, and its paired difference from the fall-back over seeds (the
t-interval over seeds) and over records (bootstrap). Writes `policies.md` and `policies.json` in `--out`.

    python bench/policies.py --results bench/results/confirmatory --out bench/results
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from arms import t_interval
from plot_experts import paired_bootstrap

STRATEGY = "routed"
C_GRID = (0.01, 0.1, 1.0, 10.0)
K_GRID = (1, 3, 5, 10, 20)


CANDIDATES = ("served", "trained")


class Split:
    """One split's matrices, restricted to a candidate set of adapters (`candidates`, matrix columns)."""

    def __init__(self, folder: Path, candidates: str):
        self.info = json.loads((folder / "info.json").read_text())
        groups = self.info["group_columns"][STRATEGY]
        own = groups if candidates == "served" else self.info["trained_columns"][STRATEGY]
        self.candidates = sorted(set(own) | set(groups) | {self.info["fallback"][STRATEGY]})
        self.nll = np.load(folder / "nll.npy")[:, self.candidates]  # [records, candidates]
        self.index = {column: i for i, column in enumerate(self.candidates)}
        self.group_choice = np.array([self.index[c] for c in groups])  # candidate serving each group
        self.fallback = self.index[self.info["fallback"][STRATEGY]]
        self.router = np.array([self.index[c] for c in self.info["served"][STRATEGY]])
        self.hidden = np.load(folder / "hidden.npy")
        self.embedding = np.load(folder / "embedding.npy")
        self.sketch = np.load(folder / "sketch.npy") if (folder / "sketch.npy").exists() else None

    def score(self, choice: np.ndarray) -> np.ndarray:
        return self.nll[np.arange(len(choice)), choice]


def logistic_hidden(validation: Split, test: Split) -> tuple[np.ndarray, dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    target = validation.nll.argmin(axis=1)  # each validation record's best adapter

    def fitted(c: float, rows: np.ndarray):
        """A model of `rows`, or the one adapter they all prefer (a classifier needs two classes)."""
        if len(set(target[rows])) == 1:
            return lambda x: np.full(len(x), target[rows][0])
        return (
            make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
            .fit(validation.hidden[rows], target[rows])
            .predict
        )

    def cross_validated(c: float) -> float:
        """Mean validation NLL of the adapters each fold's records get from a model fitted on the other folds: chosen by
        the quantity a router is for, not by accuracy."""
        total = 0.0
        for fit, held in KFold(5, shuffle=True, random_state=0).split(validation.hidden):
            total += validation.nll[held, fitted(c, fit)(validation.hidden[held])].sum()
        return total / len(target)

    scores = {c: cross_validated(c) for c in C_GRID}
    best = min(scores, key=lambda c: (scores[c], c))
    return fitted(best, np.arange(len(target)))(test.hidden), {"C": best}


def knn_embedding(validation: Split, test: Split) -> tuple[np.ndarray, dict]:
    def choose(similarity: np.ndarray, k: int) -> np.ndarray:
        nearest = np.argsort(-similarity, axis=1)[:, :k]
        return (
            validation.nll[nearest].mean(axis=1).argmin(axis=1)
        )  # [records, k, candidates] → mean over the neighbours

    inside = validation.embedding @ validation.embedding.T
    np.fill_diagonal(inside, -np.inf)  # leave-one-out: a record is not its own neighbour
    ks = [k for k in K_GRID if k < len(validation.nll)]
    loo = {k: float(validation.score(choose(inside, k)).mean()) for k in ks}
    best = min(loo, key=lambda k: (loo[k], k))
    return choose(test.embedding @ validation.embedding.T, best), {"k": best}


def nearest_centroid(validation: Split, test: Split) -> tuple[np.ndarray, dict] | None:
    if test.sketch is None or test.info.get("centroids") is None:
        return None
    groups = (test.sketch @ np.asarray(test.info["centroids"]).T).argmax(axis=1)
    return test.group_choice[groups], {}


def policies_of_run(folder: Path, candidates: str) -> dict[str, np.ndarray]:
    """Each policy's test NLL per record for one run's matrices, choosing among `candidates` (one of CANDIDATES)."""
    validation, test = Split(folder / "validation", candidates), Split(folder / "test", candidates)
    assert validation.candidates == test.candidates, folder
    chosen = {"fall-back": (np.full(len(test.nll), test.fallback), {}), "router": (test.router, {})}
    for name, policy in (
        ("nearest-centroid", nearest_centroid),
        ("logistic-hidden", logistic_hidden),
        ("knn-embedding", knn_embedding),
    ):
        picked = policy(validation, test)
        if picked is not None:
            chosen[name] = picked
    chosen["oracle"] = (test.nll.argmin(axis=1), {})
    return {
        name: {
            "nll": test.score(choice),
            "settings": settings,
            "share_fallback": float(np.mean(choice == test.fallback)),
        }
        for name, (choice, settings) in chosen.items()
    }


def summarize(runs: dict[int, dict]) -> dict:
    names = list(next(iter(runs.values())))
    rows = {}
    for name in names:
        per_seed = [float(np.mean(r[name]["nll"] - r["fall-back"]["nll"])) for r in runs.values()]
        pooled = np.mean([r[name]["nll"] - r["fall-back"]["nll"] for r in runs.values()], axis=0)
        mean, low, high = paired_bootstrap(pooled)
        rows[name] = {
            "test_nll": statistics.mean(float(r[name]["nll"].mean()) for r in runs.values()),
            "minus_fallback": mean,
            "per_seed": per_seed,
            "t_interval_over_seeds": t_interval(per_seed),
            "record_bootstrap": (low, high),
            "share_fallback": statistics.mean(r[name]["share_fallback"] for r in runs.values()),
            "settings": [r[name]["settings"] for r in runs.values()],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("bench/results/confirmatory"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    by_dataset: dict[tuple[str, int, str], dict[int, dict]] = {}
    for path in sorted(args.results.glob("*.json")):
        result = json.loads(path.read_text())
        scores = path.with_name(path.stem + "-scores")
        if isinstance(result, dict) and "dataset" in result and scores.is_dir():
            for candidates in CANDIDATES:
                by_dataset.setdefault((result["dataset"], result["per_label"], candidates), {})[result["seed"]] = (
                    policies_of_run(scores, candidates)
                )
    lines = [
        "# Routing policies from the score matrices (bench/policies.py)",
        "",
        "Each policy picks one adapter of a candidate set per test record (`served`: the adapters routed serves; `trained`: "
        "every adapter the gradient clusters trained or blended, and the fall-back); its settings are chosen on validation. "
        "Differences are against the fall-back (the single adapter of record); negative is better. Exploratory.",
        "",
    ]
    summary = {}
    for (dataset, per_label, candidates), runs in sorted(by_dataset.items()):
        rows = summarize(runs)
        summary[f"{dataset}-{per_label}-{candidates}"] = {
            "seeds": sorted(runs),
            "candidates": candidates,
            "policies": rows,
        }
        lines += [
            f"## {dataset}, {per_label} per label, candidates `{candidates}`, seeds {sorted(runs)}",
            "",
            "| policy | test NLL | − fall-back | t-interval over seeds | bootstrap over records | fall-back share |",
            "| --- | ---: | ---: | --- | --- | ---: |",
        ]
        for name, row in rows.items():
            low, high = row["t_interval_over_seeds"]
            lines.append(
                f"| {name} | {row['test_nll']:.4f} | {row['minus_fallback']:+.4f} | {low:+.4f} … {high:+.4f} | "
                f"{row['record_bootstrap'][0]:+.4f} … {row['record_bootstrap'][1]:+.4f} | {row['share_fallback']:.0%} |"
            )
        lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "policies.md").write_text("\n".join(lines) + "\n")
    (args.out / "policies.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
