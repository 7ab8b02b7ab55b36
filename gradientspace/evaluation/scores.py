"""The score matrices: every record of a split scored under every adapter the run trained or blended, with what each router
said of it, so that any strategy, fall-back or routing policy is a lookup rather than another run.

For each split — `validation` (the records every decision is made on) and `test` (`evaluate.data`) —
`RUN/scores/<split>/` holds, as arrays that `numpy.load` reads (`mmap_mode="r"` too) and one `info.json`:

| file | shape | what |
| --- | --- | --- |
| `nll.npy` | [records, adapters] float64 | teacher-forced mean response-token NLL of each record under each adapter |
| `router-<strategy>.npy` | [records, groups] float32 | that strategy's router probabilities over its groups |
| `hidden.npy` | [records, hidden] float32 | the base model's last hidden state over the prompt's tokens, mean-pooled (no adapter) |
| `embedding.npy` | [records, 384] float32 | the MiniLM prompt embedding the routers read |
| `sketch.npy` | [records, r] float64 | each record's own response gradient (w.r.t. the warm-up adapter) on the sketch basis, unit norm: the gradient oracle's space; only where the run has gradient clusters |
| `info.json` | | record ids and labels; the adapters (a column each: the folder it was loaded from, relative to the run); per router its groups, threshold, top pick and whether the threshold sent the record to the fall-back; per strategy the column serving each record as it is served (null: a mixture of adapters), the column it falls back to, the column serving each of its groups, and the columns of every adapter it trained or blended; the gradient clusters' centroids on the sketch basis |

The adapters are every trained adapter of the strategies the run builds (dropped experts included: a
later question may want them) and every served blend. Records are scored in batches of similar
length (less padding; the NLL of a record does not depend on its batch beyond float rounding).

The test folder is written by the evaluation, after every stage that decides something (keep,
blend, threshold, router), and none of those reads it: `tests/test_scores.py` garbles it and
re-decides byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gradientspace import distributed
from gradientspace.config import keyed
from gradientspace.data.loading import fingerprint, load_records
from gradientspace.data.records import Record
from gradientspace.data.tokens import collate, tokenize
from gradientspace.experts.adapters import read_partition, served_groups
from gradientspace.experts.strategies import get, routed, trained
from gradientspace.models.encoder import shared_embeddings
from gradientspace.routing.model import StrategyModel
from gradientspace.routing.pipeline import serving_stages
from gradientspace.runner import Run
from gradientspace.runs import Placement, Stage, atomic_path, config_hash, write_json

SPLITS = ("validation", "test")
BATCH_SIZE = 8


def evaluation_records(config) -> list[Record]:
    """The test split as `evaluate` reads it: `evaluate.data` (`evaluate.split` of a dataset id), its `limit`, `data.per_source` per label,
    `data.columns`."""
    records, _ = load_records(
        config.evaluate.data,
        limit=config.evaluate.limit,
        per_source=config.data.per_source,
        seed=config.seed,
        columns=config.data.columns,
        subset=config.data.subset,
        split=config.evaluate.split,
    )
    return records


def scored_folders(run, strategies: list[str]) -> list[Path]:
    """Every adapter folder the run trained or blended for `strategies`: each trained adapter, then its served blend."""
    folders = []
    for strategy in trained(strategies, run.config):
        empty = set(read_partition(run, strategy)["empty"])
        for group, (path, weight) in served_groups(run, strategy).items():
            if group not in empty:
                folders.append(get(strategy).folder(run) / group)
                if 0 < weight < 1:
                    folders.append(path)
    return folders


def length_batches(examples, size: int = BATCH_SIZE) -> list[list[int]]:
    """Indices of `examples` in batches of similar length, longest first (the first batch shows the memory peak)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    return [order[start : start + size] for start in range(0, len(order), size)]


@torch.no_grad()
def adapter_nll(
    engine: StrategyModel, adapters: list[str], records: list[Record], max_length: int, desc: str
) -> np.ndarray:
    """[records, adapters] mean response-token NLL, the same length-grouped batches for every adapter."""
    from tqdm.auto import tqdm

    examples = tokenize(records, engine.tokenizer, max_length, "response")
    table = np.zeros((len(records), len(adapters)))
    # left unset when shown, so that TQDM_DISABLE=1 still hides it (as the other passes' bars)
    with tqdm(
        total=len(records),
        desc=desc,
        unit="record",
        dynamic_ncols=True,
        **({} if distributed.is_main() else {"disable": True}),
    ) as bar:
        for batch in length_batches(examples):
            input_ids, mask, labels = (
                t.to(engine.device) for t in collate([examples[i] for i in batch], engine.tokenizer.pad_token_id)
            )
            for column, adapter in enumerate(adapters):
                table[batch, column] = engine.bank.nll(adapter, input_ids, mask, labels)
            bar.update(len(batch))
    return table


@torch.no_grad()
def prompt_hidden_states(engine: StrategyModel, records: list[Record], max_length: int) -> np.ndarray:
    """[records, hidden] the base model's (no adapter) last hidden state, mean-pooled over each prompt's tokens."""
    examples = tokenize(records, engine.tokenizer, max_length, "instruction")
    rows = [None] * len(records)
    with engine.model.disable_adapter():
        for batch in length_batches(examples):
            input_ids, mask, _ = (
                t.to(engine.device) for t in collate([examples[i] for i in batch], engine.tokenizer.pad_token_id)
            )
            hidden = engine.model(
                input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False
            ).hidden_states[-1]
            pooled = (hidden.float() * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
            for i, row in zip(batch, pooled.cpu().numpy()):
                rows[i] = row
    if not rows:  # a rank's shard of a split smaller than the world: no rows, of the model's width
        return np.zeros((0, engine.model.config.hidden_size), np.float32)
    return np.stack(rows).astype(np.float32)


def score_shard(run, strategies: list[str], split: str, records: list[Record]) -> dict:
    """Everything the matrices hold for `records` (one rank's shard), with the adapter columns of `scored_folders`."""
    config = run.config
    engine = StrategyModel(run, strategies)
    folders = scored_folders(run, strategies)
    adapters = [engine.load_folder(folder) for folder in folders]
    column = {
        adapter: i for i, adapter in enumerate(adapters)
    }  # every served adapter is one of them: `load_folder` says which
    column_of = lambda served: column[engine.load_folder(engine.folders[served])]
    part: dict = {
        "nll": adapter_nll(engine, adapters, records, config.data.max_length, f"score matrix ({split})"),
        "hidden": prompt_hidden_states(engine, records, config.data.max_length),
        "embedding": shared_embeddings([r.prompt_text for r in records], engine.device).float().numpy(),
        "routers": {},
        "served": {},
    }
    for strategy in routed(strategies, config):
        part["routers"][strategy] = (
            engine.routers[strategy].probabilities([r.prompt_text for r in records]).float().numpy()
        )
    for strategy in strategies:
        choices, _ = engine.choose(strategy, records)
        part["served"][strategy] = [column_of(c.single_adapter) if c.single_adapter else None for c in choices]
    if engine.has_sketch_space():
        part["sketch"] = engine.sketch_coordinates(records).numpy()
    part["folders"] = [str(f.relative_to(run.directory.root)) for f in folders]
    part["thresholds"] = {s: engine.routers[s].threshold for s in part["routers"]}
    part["fallback"] = {
        s: column_of(engine.fallback_for(s)) for s in strategies
    }  # the column each strategy falls back to
    owners = dict.fromkeys(get(s).owner for s in strategies)
    part["groups"] = {o: [column_of(engine.adapter_for(o, g)) for g in range(len(engine.groups[o]))] for o in owners}
    part["trained"] = {o: [i for i, f in enumerate(folders) if f.is_relative_to(get(o).folder(run))] for o in owners}
    if (
        "sketch" in part
    ):  # the gradient clusters' unit centroids on the same basis: nearest-centroid routing needs no run
        part["centroids"] = engine.oracle_space[1].tolist()
    return part


def write_scores(run, strategies: list[str], split: str, records: list[Record]) -> list[str]:
    """Score `records` (each rank its strided shard under torchrun) and write `RUN/scores/<split>/` on rank 0; its outputs."""
    mine = distributed.strided_share(len(records))
    gathered = distributed.gather_to_main((mine, score_shard(run, strategies, split, [records[i] for i in mine])))
    if gathered is None:
        return []
    positions = [i for indices, _ in gathered for i in indices]
    parts = [part for _, part in gathered]

    def whole(rows_of) -> list:
        """One shard-wise list of rows per record, back in the records' order."""
        rows = [None] * len(records)
        for position, row in zip(positions, (row for part in parts for row in rows_of(part))):
            rows[position] = row
        return rows

    first = parts[0]
    arrays = {
        name: np.stack(whole(lambda p, name=name: p[name]))
        for name in ("nll", "hidden", "embedding", "sketch")
        if name in first
    }
    arrays.update({f"router-{s}": np.stack(whole(lambda p, s=s: p["routers"][s])) for s in first["routers"]})
    routers = {}
    for strategy, threshold in first["thresholds"].items():
        probabilities = arrays[f"router-{strategy}"]
        routers[strategy] = {
            "groups": read_partition(run, strategy)["groups"],
            "threshold": threshold,
            "pick": probabilities.argmax(axis=1).tolist(),
            "to_fallback": (probabilities.max(axis=1) < threshold).tolist(),
        }
    folder = run.path("scores", split)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        with atomic_path(folder / f"{name}.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, array)
    write_json(
        folder / "info.json",
        {
            "split": split,
            "ids": [r.id for r in records],
            "sources": [r.source for r in records],
            "adapters": first["folders"],
            "routers": routers,
            "served": {s: whole(lambda p, s=s: p["served"][s]) for s in strategies},
            "fallback": first["fallback"],
            "group_columns": first["groups"],
            "trained_columns": first["trained"],
            "centroids": first.get("centroids"),
            "arrays": {name: list(a.shape) for name, a in arrays.items()},
        },
    )
    return [
        str((folder / name).relative_to(run.directory.root)) for name in ["info.json", *(f"{n}.npy" for n in arrays)]
    ]


class Scores:
    """A split's matrices as written (`RUN/scores/<split>/`): each strategy's NLL per record is a lookup."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.info = json.loads((self.folder / "info.json").read_text())
        self.nll = np.load(self.folder / "nll.npy", mmap_mode="r")
        root = self.folder.parent.parent  # the run: this folder is RUN/scores/<split>
        self.column = {(root / adapter).resolve(): i for i, adapter in enumerate(self.info["adapters"])}
        self.row = {record: i for i, record in enumerate(self.info["ids"])}

    def lookup(self, record: str, folder: Path) -> float | None:
        """A record's NLL under the adapter loaded from `folder`; None where the matrix has no such record or adapter."""
        row, column = self.row.get(record), self.column.get(Path(folder).resolve())
        return None if row is None or column is None else float(self.nll[row, column])

    def strategy_nll(self, strategy: str) -> list[float | None]:
        """Each record's NLL as `strategy` serves it (None for a record served by a mixture of adapters)."""
        return [None if c is None else float(self.nll[i, c]) for i, c in enumerate(self.info["served"][strategy])]


class ScoreStage(Stage):
    """A split's score matrices (`evaluation/scores.py`): every record under every adapter the run's strategies trained or
    blended, and what each router said of it; each rank scores its shard. The test split's is built by the evaluation, after
    every decision."""

    placement = Placement.EVERY

    def __init__(self, split: str):
        self.split, self.name = split, f"scores/{split}"

    def requires(self, run: Run):
        return [stage for strategy in run.config.experts.strategies for stage in serving_stages(run, strategy)]

    def inputs(self, run: Run) -> dict[str, str]:
        config = run.config
        if self.split == "validation":
            records = {"validation records": config_hash(sorted(run.validation_ids))}
        else:
            records = {
                "test data": fingerprint(config.evaluate.data, config.data.subset, config.evaluate.split),
                "test selection": config_hash(config.evaluate.limit, config.data.per_source, config.seed),
            }
        return {
            **records,
            "strategies": config_hash(config.experts.strategies),
            "model": config_hash(keyed(config.model), config.data.max_length),
        }

    def run(self, run: Run, key: str, record: dict) -> None:
        records = run.validation if self.split == "validation" else evaluation_records(run.config)
        record["outputs"] = write_scores(run, list(run.config.experts.strategies), self.split, records)
