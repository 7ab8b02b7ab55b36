"""A golden tiny-random run: proof that a refactor leaves behaviour unchanged.

`save` runs every stage of one tiny-random config (every strategy, so every stage kind runs) and
stores what the pipeline computes — the cluster assignments, every served adapter's tensors, the
router thresholds, keep decisions, the adapter serving each test record, the decoded texts and every test NLL — in `bench/golden/`. `compare` runs the same config
with the code as it is now and checks it against the stored run: the same assignments, adapters
to 1e-6, NLL to 1e-5. Stage keys and timings are not compared: a redesign may change how keys are
hashed, never what is computed.

    python bench/golden.py save      # before the change
    python bench/golden.py compare   # after it; exit 1 and a line per difference when they differ
    python bench/golden.py compare --set experts.fallback=generalist   # a changed default: the old behaviour, still reachable
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gradientspace.commands import run_all
from gradientspace.config import load_config

HERE = Path(__file__).resolve().parent / "golden"
# eval.json keeps each record's NLL to 5 decimals: a difference of 1e-5 is one step of that rounding (the float
# repr of the difference of two such numbers can exceed 1e-5 by a hair, hence the 1e-9)
NLL_TOLERANCE = 1e-5 + 1e-9
STRATEGIES = [
    "routed",
    "single",
    "single-wide",
    "single-continued",
    "gradient-oracle",
    "oracle",
    "random-clusters",
    "embedding-clusters",
    "projection-clusters",
    "elrea-ensemble",
]
CONFIG = {
    "model": {"name": "tiny-random", "lora_rank": 2},
    "data": {"path": "mix4-packaged", "per_source": 6, "max_length": 96},
    "warmup": {"fraction": 0.25},
    "sketch": {"rank": 4},
    "cluster": {"method": "gradientspace", "k": 3, "projection_dim": 16},
    "experts": {"epochs": 2, "strategies": STRATEGIES, "keep_min_records": 1},
    "router": {"epochs": 20},
    "evaluate": {
        "data": "mix4-packaged:test",
        "limit": 8,
        "generate_per_domain": 1,
        "max_new_tokens": 4,
        "latency_prompts": 1,
    },
}


def outcome(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(assignments, thresholds, keep decisions, the adapter serving each test record, decoded texts, NLL per test record;
    every adapter tensor under its folder's name)."""
    clusters = [json.loads(line) for line in (run_dir / "clusters.jsonl").read_text().splitlines()]
    evaluation = json.loads((run_dir / "eval.json").read_text())
    nll = {
        strategy: dict(zip(evaluation["ids"], scored["nll"])) for strategy, scored in evaluation["per_record"].items()
    }
    served = {strategy: scored["adapter"] for strategy, scored in evaluation["per_record"].items()}
    texts = {strategy: [sample["text"] for sample in samples] for strategy, samples in evaluation["samples"].items()}
    thresholds = {
        str(p.relative_to(run_dir)): json.loads(p.read_text()).get("threshold")
        for p in sorted(run_dir.rglob("router.json"))
    }
    keep = {
        str(p.relative_to(run_dir)): {g: d.get("lambda") for g, d in json.loads(p.read_text())["groups"].items()}
        for p in sorted(run_dir.rglob("keep.json"))
    }
    tensors = {}
    for path in sorted(run_dir.rglob("adapter_model.safetensors")):
        if "checkpoints" in path.parts or any(part.startswith("epoch-") for part in path.parts):
            continue
        folder = str(path.parent.relative_to(run_dir))
        tensors.update({f"{folder}::{name}": value for name, value in load_file(str(path)).items()})
    return {
        "clusters": clusters,
        "thresholds": thresholds,
        "keep": keep,
        "served": served,
        "texts": texts,
        "nll": nll,
    }, tensors


def run_golden(out: Path, overrides: dict[str, str]) -> Path:
    config = load_config(tree={**CONFIG, "out": str(out / "run")}, overrides=overrides)
    run_all(config)
    return out / "run"


def differences(expected: dict, tensors: dict, actual: dict, actual_tensors: dict) -> list[str]:
    found = []
    if expected["clusters"] != actual["clusters"]:
        found.append("cluster assignments differ")
    for name in ("thresholds", "keep", "served", "texts"):
        if expected[name] != actual[name]:
            found.append(f"{name} differ: {expected[name]} → {actual[name]}")
    for strategy, values in expected["nll"].items():
        for label, value in values.items():
            now = actual["nll"].get(strategy, {}).get(label)
            if value is None or now is None:
                if value != now:
                    found.append(f"nll {strategy} {label}: {value} → {now}")
            elif abs(value - now) > NLL_TOLERANCE:
                found.append(f"nll {strategy} {label}: {value:.6f} → {now:.6f}")
    if set(tensors) != set(actual_tensors):
        found.append(f"adapter tensors differ in name: {sorted(set(tensors) ^ set(actual_tensors))[:4]}")
    for name in sorted(set(tensors) & set(actual_tensors)):
        gap = (tensors[name].double() - actual_tensors[name].double()).abs().max().item()
        if gap > 1e-6:
            found.append(f"adapter {name}: max difference {gap:.2e}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["save", "compare"])
    parser.add_argument("--golden", type=Path, default=HERE)
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides of the golden config"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        summary, tensors = outcome(run_golden(Path(scratch), dict(item.split("=", 1) for item in args.set)))
    if args.action == "save":
        args.golden.mkdir(parents=True, exist_ok=True)
        (args.golden / "outcome.json").write_text(json.dumps(summary, indent=1) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.golden / "adapters.safetensors"))
        print(
            json.dumps(
                {"saved": str(args.golden), "adapter_tensors": len(tensors), "records": len(summary["clusters"])}
            )
        )
        return 0
    expected = json.loads((args.golden / "outcome.json").read_text())
    found = differences(expected, load_file(str(args.golden / "adapters.safetensors")), summary, tensors)
    print(
        json.dumps(
            {"golden": str(args.golden), "adapter_tensors": len(tensors), "same": not found, "differences": found},
            indent=1,
        )
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
