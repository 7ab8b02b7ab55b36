"""Model cards: every served adapter folder says, as the Hugging Face hub expects, what it is and how to load it.

peft's `save_pretrained` leaves a template `README.md` of empty sections; once a strategy's adapters
are decided, `CardStage` writes over it, in each folder that serves (the expert, its blend, or the
single adapter of a baseline): the hub's metadata (`base_model`, `library_name: peft`, tags), the
data its group holds (size, most distinctive terms, label mix), its validation scores and keep
decision, and how to load it with peft and vLLM. The metadata block is rendered by
`huggingface_hub.ModelCardData`, so the hub and `ModelCard.load` read it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from gradientspace.experts.adapters import PartitionStage, read_partition, served_groups
from gradientspace.experts.strategies import get
from gradientspace.routing.keep import served_stage
from gradientspace.runs import Stage, atomic_path

CARD = "README.md"


def _nll(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def card_text(run, strategy: str, group: str, folder: Path, weight: float) -> str:
    """The model card of the adapter in `folder`, which serves `strategy`'s `group` at blend weight `weight`."""
    from huggingface_hub import ModelCardData

    adapter = json.loads((folder / "adapter_config.json").read_text())
    base = adapter.get("base_model_name_or_path") or run.config.model.name
    partition = read_partition(run, strategy)
    number = partition["groups"].index(group)
    members = [r for r in run.records if partition["assignment"][r.id] == number]
    validation = sum(r.id in run.validation_ids for r in members)
    terms = run.stage_entry(f"partition/{strategy}").get("terms", {}).get(group) or []
    labels = Counter(r.source for r in members if r.source is not None)
    trained = run.stage_entry(f"experts/{strategy}/{group}")
    decision = run.stage_entry(f"keep/{strategy}").get("groups", {}).get(group)
    name = f"{strategy}-{group}"
    metadata = ModelCardData(
        base_model=base,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["gradientspace", "lora", strategy] + [f"term:{t}" for t in terms[:3]],
    )

    lines = [
        f"---\n{metadata.to_yaml()}\n---",
        "",
        f"# {name}: {', '.join(terms) if terms else 'group ' + group}",
        "",
        f"A LoRA adapter of `{base}` made by GradientSpace: strategy `{strategy}` ({get(strategy).help}), group {group}"
        + (f", blended with the fall-back adapter at λ = {weight:g}" if weight < 1 else "")
        + ".",
        "",
        "## Data",
        "",
        f"{len(members) - validation} training records and {validation} validation records: group {group} of {len(partition['groups'])} "
        f"in the strategy's partition (`{partition_file(run, strategy)}`, record id → group).",
        "",
    ]
    if terms:
        how = (
            "class-based TF-IDF against the other groups"
            if len(partition["groups"]) > 1
            else "the most frequent: the group is all the data"
        )
        lines += [f"Most distinctive terms ({how}): {', '.join(terms)}.", ""]
    if labels:
        lines += [
            "Labels (`source`): " + ", ".join(f"{label} {count}" for label, count in labels.most_common()) + ".",
            "",
        ]
    lines += [
        "## Validation",
        "",
        f"The {'expert' if weight < 1 else 'adapter'}'s validation NLL per response token: {_nll(trained.get('initial_eval_loss'))} before training, "
        f"{_nll(trained.get('best_eval_loss'))} at the epoch kept ({trained.get('best_epoch', '–')} of {trained.get('epochs_run', '–')} run, "
        f"{trained.get('steps', '–')} steps).",
        "",
    ]
    if decision:
        served_nll = decision.get("candidate_nll", {}).get(str(float(weight)))
        lines += [
            f"Keep decision on the {decision.get('validation_records')} validation records routed to this group: λ = {decision['lambda']:g}, "
            f"{decision['reason']}. Fall-back adapter's NLL there {_nll(decision.get('fallback_nll'))}, this adapter's {_nll(served_nll)}.",
            "",
        ]
    lines += [
        "## Use it",
        "",
        "With peft:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        f"model = PeftModel.from_pretrained(base, {str(folder)!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({base!r})",
        "```",
        "",
        "With vLLM (the adapter answers requests whose `model` is its name):",
        "",
        "```bash",
        f"vllm serve {base} --enable-lora --max-lora-rank {adapter.get('r', 8)} --lora-modules {name}={folder}",
        "```",
        "",
        f"Routed behind the run's router: `gradientspace serve {run.directory.root}`, or `gradientspace route` in front of vLLM.",
        "",
    ]
    return "\n".join(lines)


def partition_file(run, strategy: str) -> str:
    return str((get(strategy).folder(run) / "partition.json").relative_to(run.directory.root))


class CardStage(Stage):
    """`README.md` in each of a strategy's served adapter folders, written once its adapters are decided."""

    def __init__(self, strategy: str):
        self.strategy = strategy
        self.name = f"cards/{strategy}"

    def requires(self, run):
        return [PartitionStage(self.strategy), served_stage(run, self.strategy)]

    def inputs(self, run) -> dict[str, str]:
        return {}  # everything a card says comes from the stages it requires

    def run(self, run, key: str, record: dict) -> None:
        outputs = []
        for group, (folder, weight) in served_groups(run, self.strategy).items():
            if folder is None:  # the fall-back serves the group: its own folder carries its card
                continue
            with atomic_path(folder / CARD) as tmp:
                tmp.write_text(card_text(run, self.strategy, group, folder, weight))
            outputs.append(str((folder / CARD).relative_to(run.directory.root)))
        record["outputs"] = outputs
