"""Budget curves from bench/experts.py results: test NLL per strategy against epochs, per data set.

    python bench/plot_experts.py bench/results/experts-mix4.json bench/results/experts-skills4.json \
        --out bench/results/budget_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"routed": ("C0", "o", "-"), "single": ("C1", "s", "-"), "oracle": ("C2", "^", "--"), "random-clusters": ("C7", "x", ":"),
         "embedding-clusters": ("C4", "D", "--"), "projection-clusters": ("C5", "v", "--"), "elrea-ensemble": ("C3", "*", "-.")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/results/budget_curves.png"))
    args = parser.parse_args()
    panels = []
    for path in args.results:
        report = json.loads(path.read_text())
        panels.extend((name, data) for name, data in report["datasets"].items())
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for axis, (name, data) in zip(axes[0], panels):
        epochs = sorted(data["by_epochs"], key=int)
        for strategy, (colour, marker, line) in STYLE.items():
            values = [data["by_epochs"][e][strategy]["overall"]["nll"] for e in epochs]
            axis.plot([int(e) for e in epochs], values, color=colour, marker=marker, linestyle=line, label=strategy)
        axis.set_title(f"{name}: {data['train']} train / {data['test']} test records")
        axis.set_xlabel("epochs over each adapter's own data (equal tokens)")
        axis.set_xticks([int(e) for e in epochs])
        axis.set_ylabel("held-out response NLL, overall (lower is better)")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=150)
    print(args.out)


if __name__ == "__main__":
    main()
