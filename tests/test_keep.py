"""Keep, blend or fall back (`keep.py`): the rule, the blended adapter's arithmetic, decisions on routed validation records,
and every stage that reads an adapter keyed by it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_records

from gradientspace import cluster, load_config
from gradientspace.clustering.kmeans import interference
from gradientspace.experts.adapters import served_groups, train_experts
from gradientspace.experts.strategies import get
from gradientspace.routing.keep import bootstrap_upper_bound, keep_rule
from gradientspace.routing.router import train_routers
from gradientspace.runner import Run
from gradientspace.runs import RunDirectory

pytestmark = pytest.mark.heavy(seconds=45)  # tiny runs whose experts are kept, blended and dropped


def test_the_upper_bound_of_constant_differences_is_the_constant_and_noise_around_zero_is_not_a_gain():
    assert bootstrap_upper_bound(np.full(10, -0.25), 0.95, seed=0) == pytest.approx(-0.25)
    noise = np.random.default_rng(1).normal(0.0, 1.0, size=400)
    upper = bootstrap_upper_bound(noise, 0.95, seed=0)
    # the bound sits about 1.645 standard errors above the mean
    assert upper - noise.mean() == pytest.approx(1.645 * noise.std() / np.sqrt(len(noise)), rel=0.15)


def test_the_keep_rule_needs_enough_records_and_a_gain_beyond_noise():
    generalist = [1.0] * 20
    clear = {1.0: [0.8] * 20, 0.5: [0.9] * 20}
    assert keep_rule(clear, generalist, 0.95, 5, seed=0)["lambda"] == 1.0
    blend_best = {1.0: [1.1] * 20, 0.5: [0.9] * 20}
    assert keep_rule(blend_best, generalist, 0.95, 5, seed=0)["lambda"] == 0.5
    tiny_gain_on_one_record = {1.0: [0.9997]}  # the kind of gain the old rule kept an expert on
    decision = keep_rule(tiny_gain_on_one_record, [1.0], 0.95, 5, seed=0)
    assert decision["lambda"] == 0.0 and "fewer than experts.keep_min_records" in decision["reason"]
    rng = np.random.default_rng(0)
    noisy = {1.0: list(1.0 + rng.normal(0.0, 0.5, size=20) - 0.01)}  # a mean gain far inside the noise
    decision = keep_rule(noisy, generalist, 0.95, 5, seed=0)
    assert decision["lambda"] == 0.0 and decision["upper_bound"] >= 0
    assert (
        keep_rule({1.0: [0.8] * 20, 0.5: [0.8] * 20}, generalist, 0.95, 5, seed=0)["lambda"] == 1.0
    )  # a tie: the expert as trained


def test_a_blend_is_one_plain_peft_adapter_that_interpolates_the_two_updates():
    """λ = 0 gives the generalist's logits, λ = 1 the expert's, λ = ½ those of W + ½ΔG + ½ΔE merged by hand."""
    from peft import get_peft_model_state_dict

    from gradientspace.config import ModelConfig
    from gradientspace.models.loading import load_lora_model

    loaded = load_lora_model(ModelConfig(name="tiny-random", lora_rank=2, lora_alpha=4), seed=0)
    model = loaded.model
    model.add_adapter("expert", model.peft_config["default"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    ids = torch.randint(0, 100, (2, 9), generator=generator)

    def logits(adapter):
        model.set_adapter(adapter)
        with torch.no_grad():
            return model(input_ids=ids).logits

    for weight in (0.0, 0.5, 1.0):
        name = f"blend{round(weight * 100)}"
        model.add_weighted_adapter(["default", "expert"], [1 - weight, weight], name, combination_type="cat")
        assert model.peft_config[name].r == 4  # rank 2r: one adapter, loadable as it is
        if weight == 0.0:
            torch.testing.assert_close(logits(name), logits("default"), rtol=1e-5, atol=1e-5)
        if weight == 1.0:
            torch.testing.assert_close(logits(name), logits("expert"), rtol=1e-5, atol=1e-5)
    blended = logits("blend50")
    state = {k: v.clone() for k, v in model.base_model.model.state_dict().items()}
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.base_layer.weight += 0.5 * module.get_delta_weight("default") + 0.5 * module.get_delta_weight(
                    "expert"
                )
        with model.disable_adapter():
            merged = model(input_ids=ids).logits
    model.base_model.model.load_state_dict(state)
    torch.testing.assert_close(blended, merged, rtol=1e-4, atol=1e-4)
    assert get_peft_model_state_dict(model, adapter_name="blend50")


def test_interference_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    coordinates = torch.tensor(rng.normal(size=(60, 6)))
    labels = np.repeat([0, 1, 2], 20)
    coordinates[labels == 2] += torch.tensor([0, 0, 0, 0, 0, 6.0])  # cluster 2 points its own way
    statistics = interference(coordinates, labels, energy=0.9)
    x = coordinates.numpy()
    for group in range(3):
        members, others = x[labels == group], x[labels != group]
        a, b = members.mean(0), others.mean(0)
        assert statistics[str(group)]["mean_cosine"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        values, vectors = np.linalg.eigh(
            others.T @ others
        )  # eigenvectors of the Gram matrix: the right singular vectors
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
        count = int(np.searchsorted(np.cumsum(values) / values.sum(), 0.9) + 1)
        inside = np.square(members @ vectors[:, :count]).sum() / np.square(members).sum()
        assert statistics[str(group)]["outside_energy"] == pytest.approx(1 - inside)
        assert statistics[str(group)]["size"] == 20
    assert statistics["2"]["mean_cosine"] < statistics["0"]["mean_cosine"]


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory):
    """A tiny run through experts and routers: the generalist, three branched experts, `single-continued`."""
    root = tmp_path_factory.mktemp("keep")
    data = root / "train.jsonl"
    write_records(data, 36)
    config = load_config(
        None,
        {
            "model.name": "tiny-random",
            "model.lora_rank": 2,
            "data.path": str(data),
            "data.max_length": 64,
            "out": str(root / "run"),
            "sketch.rank": 4,
            "cluster.k": 3,
            "gradients.batch_size": 4,
            "warmup.fraction": 0.25,
            "data.validation_fraction": 0.25,
            "experts.batch_size": 4,
            "experts.epochs": 1,
            "experts.branch_epochs": 1,
            "experts.keep_min_records": 1,
            "experts.keep_confidence": 0.5,
            "experts.strategies": ["routed", "single", "single-continued"],
            "router.epochs": 5,
        },
    )
    cluster(config)
    train_experts(config)
    train_routers(config)
    return config


def test_decisions_are_made_on_the_records_the_router_sends_and_the_served_adapters_follow_them(
    routed_run, monkeypatch
):
    from gradientspace.commands import decide_experts, router_thresholds
    from gradientspace.experts.strategies import RoutedPartition

    config, seen = routed_run, {}
    real = RoutedPartition.serving_groups

    def recording(self, model, records):
        groups = real(self, model, records)
        seen[self.name] = (sorted(r.id for r in records), groups)
        return groups

    monkeypatch.setattr(RoutedPartition, "serving_groups", recording)
    decisions = decide_experts(config)
    run = Run(config)
    validation_ids = sorted(r for r, in_validation in _split(config).items() if in_validation)
    assert seen["routed"][0] == validation_ids  # every validation record, routed as a test prompt would be
    routed_counts = np.bincount(seen["routed"][1], minlength=3)
    for group, decision in decisions["routed"].items():
        assert decision["validation_records"] == routed_counts[int(group)]
        path, weight = served_groups(run, "routed")[group]
        assert weight == decision["lambda"]
        if weight == 0:
            assert path is None
        elif weight < 1:
            blended = json.loads((path / "adapter_config.json").read_text())
            assert blended["r"] == 2 * config.model.lora_rank and path.name == "blended"
    assert set(decisions) == {"routed", "single-continued"}  # the generalist itself is never dropped
    assert decisions["single-continued"]["0"]["validation_records"] == len(validation_ids)
    assert router_thresholds(config)["routed"] is not None


def test_every_served_adapter_folder_carries_a_model_card_that_the_hub_and_peft_read(routed_run):
    """Each served folder's README.md: hub metadata `ModelCard.load` reads, the group's terms and keep decision, and a peft
    snippet that, run as it stands, loads exactly the folder's weights."""
    import re

    from huggingface_hub import ModelCard
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from gradientspace.serving.cards import CardStage

    run = Run(routed_run)
    strategies = ["single", "single-continued", "routed"]
    run.build(*[CardStage(s) for s in strategies])
    cards = 0
    for strategy in strategies:
        decisions = run.stage_entry(f"keep/{strategy}").get("groups", {})
        terms = run.stage_entry(f"partition/{strategy}")["terms"]
        for group, (folder, _) in served_groups(run, strategy).items():
            if folder is None:  # the fall-back answers this group: no folder of its own to describe
                continue
            card = ModelCard.load(folder / "README.md")
            adapter = json.loads((folder / "adapter_config.json").read_text())
            assert card.data.library_name == "peft" and card.data.base_model == adapter["base_model_name_or_path"]
            assert f"# {strategy}-{group}: {', '.join(terms[group])}\n" in card.text and terms[group]
            if group in decisions:
                assert f"λ = {decisions[group]['lambda']:g}, {decisions[group]['reason']}" in card.text
            assert f"--max-lora-rank {adapter['r']} --lora-modules {strategy}-{group}={folder}" in card.text
            snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
            namespace: dict = {}
            exec(snippet, namespace)
            loaded = get_peft_model_state_dict(namespace["model"])
            saved = load_file(str(folder / "adapter_model.safetensors"))
            assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k].cpu(), saved[k]) for k in saved)
            cards += 1
    assert (
        cards >= 2
    )  # the generalist and, in this run, at least one branched adapter (an expert, a blend or single-continued)


def _split(config) -> dict[str, bool]:
    from gradientspace.data.loading import load_records
    from gradientspace.data.records import validation_ids

    records, _ = load_records(config.data.path)
    held = validation_ids(records, config.data.validation_fraction, config.seed)
    return {r.id: r.id in held for r in records}


def test_the_keep_decisions_threshold_and_evaluation_follow_the_experts_they_serve(routed_run, capsys):
    """A re-run that changes only how experts train re-decides keep, recalibrates the threshold and re-evaluates: their keys
    are made of the experts' keys (the stage graph), so a stale threshold cannot be reused."""
    from dataclasses import replace

    from gradientspace.routing.threshold import ThresholdStage

    config = routed_run
    before = RunDirectory(config.out).manifest["stages"]
    retrained = replace(
        config, experts=replace(config.experts, branch_learning_rate=config.experts.branch_learning_rate / 2)
    )
    capsys.readouterr()
    Run(retrained).build(ThresholdStage("routed"))
    said = capsys.readouterr().out
    after = RunDirectory(config.out).manifest["stages"]
    assert (
        after["experts/single/0"]["key"] == before["experts/single/0"]["key"]
    )  # the generalist ignores the branch rate
    assert (
        after["router/routed"]["key"] == before["router/routed"]["key"]
    )  # so does the router: it reads only the partition
    for stage in ("experts/routed/0", "adapters/routed", "keep/routed", "threshold/routed"):
        assert after[stage]["key"] != before[stage]["key"], stage
        assert f"re-run {stage}:" in said
    assert "re-run threshold/routed: stage keep/routed changed" in said


def test_a_saved_blend_reloads_as_a_plain_peft_folder_with_the_same_losses(routed_run):
    from peft import PeftModel

    from gradientspace.commands import validation_records
    from gradientspace.experts.strategies import Choice
    from gradientspace.models.loading import load_base_model
    from gradientspace.routing.keep import blend_name, save_blend
    from gradientspace.routing.model import StrategyModel

    config = routed_run
    engine = StrategyModel(config, ["routed"], undecided="routed")
    expert = engine.adapter_for("routed", 0)
    engine.model.add_weighted_adapter(
        [engine.generalist, expert], [0.25, 0.75], blend_name("routed", "0", 0.75), combination_type="cat"
    )
    records = validation_records(config)
    in_memory = engine.nll_for_choices([Choice({blend_name("routed", "0", 0.75): 1.0}, 0, 1.0)] * len(records), records)
    save_blend(engine, "routed", "0", 0.75)
    folder = RunDirectory(config.out).path("experts", "0", "blended")
    engine.model = PeftModel.from_pretrained(
        load_base_model(config.model.name, engine.device), str(folder), adapter_name="reloaded"
    ).eval()
    reloaded = engine.nll_for_choices([Choice({"reloaded": 1.0}, 0, 1.0)] * len(records), records)
    assert reloaded == pytest.approx(in_memory, abs=1e-5)
    # a group decided at λ = 0.75 is served from that folder, by `serve` and by the vLLM launch command alike
    from gradientspace.routing.model import served_adapters
    from gradientspace.runs import write_json
    from gradientspace.serving.backends import launch_command

    write_json(
        RunDirectory(config.out).path("experts", "keep.json"),
        {"strategy": "routed", "groups": {"0": {"lambda": 0.75}, "1": {"lambda": 0.0}}},
    )
    served = {s.name: s.folder for s in served_adapters(Run(config))}
    assert served["expert-0"] == folder and "expert-1" not in served
    command = launch_command("vllm", "base", served_adapters(Run(config)), 8001)
    assert (
        f"expert-0={folder}" in command and command[command.index("--max-lora-rank") + 1] == "8"
    )  # rank 2r = 4, rounded up to vLLM's 8


def _delta(tensors: dict, config: dict, module: str) -> torch.Tensor:
    """A LoRA folder's update s·B·A of one module, from its saved tensors and adapter_config."""
    a, b = (next(v for k, v in tensors.items() if module in k and f"lora_{m}" in k) for m in "AB")
    return config["lora_alpha"] / config["r"] * b @ a


def test_keep_blend_and_threshold_are_decided_against_the_best_single_adapter(routed_run, tmp_path, monkeypatch):
    """With `single-continued` served as a blend (the keep rule forced to λ = ½ for every group, so the fall-back is not the
    generalist), each routed expert is judged against that blend on its records, blended with it, and the threshold chosen
    against it; serving, `backend-command` and the manifest name it; `experts.fallback: generalist` re-decides as before."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from gradientspace.commands import decide_experts, router_thresholds, validation_records
    from gradientspace.experts.strategies import ROUTER_UNSURE, Choice
    from gradientspace.routing import keep
    from gradientspace.routing.model import StrategyModel, served_adapters, serving_names

    config = replace(routed_run, out=str(shutil.copytree(routed_run.out, tmp_path / "run")))
    real = keep.keep_rule
    monkeypatch.setattr(
        keep, "keep_rule", lambda candidates, *args, **kwargs: {**real(candidates, *args, **kwargs), "lambda": 0.5}
    )
    decisions = decide_experts(config)
    run = RunDirectory(config.out)
    continued = run.path("strategies", "single-continued", "0", "blended")
    assert json.loads(run.path("experts", "keep.json").read_text())["fallback"] == "single-continued"
    assert run.manifest["experts"]["routed"]["fallback_adapter"] == {
        "strategy": "single-continued",
        "folder": "strategies/single-continued/0/blended",
    }

    engine = StrategyModel(config, ["routed"])
    assert (
        engine.fallback_for("routed") == "single-continued__0"
        and engine.fallback_for("single-continued") == engine.generalist
    )
    validation = validation_records(config)
    fallback_nll = engine.nll_for_choices(
        [Choice({"single-continued__0": 1.0}, ROUTER_UNSURE, 1.0)] * len(validation), validation
    )
    generalist_nll = engine.nll_for_choices(
        [Choice({engine.generalist: 1.0}, ROUTER_UNSURE, 1.0)] * len(validation), validation
    )
    groups = engine.routers["routed"].probabilities([r.prompt_text for r in validation]).argmax(dim=1).tolist()
    judged = 0
    for group, decision in decisions["routed"].items():
        members = [i for i, g in enumerate(groups) if g == int(group)]
        if not members or "fallback_nll" not in decision:
            continue
        judged += 1
        assert decision["fallback_nll"] == pytest.approx(np.mean([fallback_nll[i] for i in members]), abs=1e-6)
        assert decision["fallback_nll"] != pytest.approx(np.mean([generalist_nll[i] for i in members]), abs=1e-6)
        # the blend is ½ of the fall-back's update plus ½ of the expert's, one plain peft folder of their ranks added
        blended, expert = run.path("experts", group, "blended"), run.path("experts", group)
        configs = {f: json.loads((f / "adapter_config.json").read_text()) for f in (blended, expert, continued)}
        assert configs[blended]["r"] == configs[continued]["r"] + configs[expert]["r"] == 3 * config.model.lora_rank
        tensors = {f: load_file(str(f / "adapter_model.safetensors")) for f in configs}
        module = next(k for k in tensors[expert] if "lora_A" in k).split(".lora_A")[0].removeprefix("base_model.model.")
        torch.testing.assert_close(
            _delta(tensors[blended], configs[blended], module),
            0.5 * _delta(tensors[continued], configs[continued], module)
            + 0.5 * _delta(tensors[expert], configs[expert], module),
            rtol=1e-5,
            atol=1e-6,
        )
    assert judged > 0
    threshold = router_thresholds(config)["routed"]
    calibration = json.loads(run.path("router", "router.json").read_text())["calibration"]
    assert calibration["fallback"] == "single-continued__0" and threshold == calibration["threshold"]
    assert calibration["validation_nll_always_fallback"] == pytest.approx(np.mean(fallback_nll), abs=1e-6)
    # what serves it: the public id names the continued adapter, from its blended folder, the same adapter the model loads
    served = served_adapters(Run(config))
    assert (served[-1].name, served[-1].folder) == ("single-continued", continued)
    assert serving_names(StrategyModel(config, ["routed"]))["single-continued"] == "single-continued__0"

    monkeypatch.setattr(keep, "keep_rule", real)
    as_before = replace(config, experts=replace(config.experts, fallback="generalist"))
    decide_experts(as_before)
    assert json.loads(run.path("experts", "keep.json").read_text())["fallback"] == "single"
    assert served_adapters(Run(as_before))[-1].name == "generalist"
    assert StrategyModel(as_before, ["routed"]).fallback_for("routed") == engine.generalist


def test_the_groups_of_every_strategy_but_the_fallback_are_decided_in_one_deal(routed_run, tmp_path, monkeypatch):
    """Under torchrun the keep decisions are dealt over the ranks group by group: the fall-back's first (the others are
    decided against it), then every group of every other strategy in one `build`, the runner's unit of dealing; each
    strategy's `keep.json` holds its groups' decisions."""
    from dataclasses import replace

    from gradientspace.routing.keep import keep_decisions

    config = replace(routed_run, out=str(shutil.copytree(routed_run.out, tmp_path / "run")))
    strategies = ["routed", "single-continued", "random-clusters"]
    run = Run(replace(config, experts=replace(config.experts, strategies=["single", *strategies])))
    builds, build = [], run.build

    def recording(*stages):
        builds.append([stage.name for stage in stages if stage.name not in run.built])  # what this build runs
        return build(*stages)

    monkeypatch.setattr(run, "build", recording)
    decisions = keep_decisions(run, strategies)
    deals = [names for names in builds if names and all(n.startswith("keep/") and n.count("/") == 2 for n in names)]
    groups = {s: json.loads(get(s).folder(run).joinpath("partition.json").read_text())["groups"] for s in strategies}
    assert deals == [
        ["keep/single-continued/0"],
        [f"keep/{s}/{g}" for s in ("routed", "random-clusters") for g in groups[s]],
    ]
    for strategy in strategies:
        written = json.loads(get(strategy).folder(run).joinpath("keep.json").read_text())["groups"]
        assert decisions[strategy] == written and list(written) == groups[strategy]
        for group, decision in written.items():
            assert run.directory.stage_entry(f"keep/{strategy}/{group}")["decision"] == decision


def test_switching_to_keep_all_serves_every_expert_as_trained_not_the_earlier_decisions(
    routed_run, tmp_path, monkeypatch
):
    """`experts.keep: all` after a run that decided on validation: the earlier `keep.json` (blends, and the continued adapter
    as the fall-back) is not read, so every expert is served as trained and the generalist answers below the threshold;
    the evaluation and the score matrices run on it and serving names the generalist."""
    from dataclasses import replace

    from gradientspace.commands import decide_experts, run_until
    from gradientspace.routing import keep
    from gradientspace.routing.model import StrategyModel, served_adapters

    config = replace(routed_run, out=str(shutil.copytree(routed_run.out, tmp_path / "run")))
    real = keep.keep_rule
    monkeypatch.setattr(
        keep, "keep_rule", lambda candidates, *args, **kwargs: {**real(candidates, *args, **kwargs), "lambda": 0.5}
    )
    decide_experts(config)
    assert json.loads(Path(config.out, "experts", "keep.json").read_text())["fallback"] == "single-continued"

    every = replace(config, experts=replace(config.experts, keep="all"))
    run = Run(every)
    experts = get("routed").folder(run)
    assert served_groups(run, "routed") == {g: (experts / g, 1.0) for g in served_groups(run, "routed")}
    assert (served_adapters(run)[-1].name, served_adapters(run)[-1].folder) == (
        "generalist",
        run.path("strategies", "single", "0"),
    )
    engine = StrategyModel(every, ["routed"])
    assert engine.fallback_for("routed") == engine.generalist
    result = run_until(every, "evaluate")
    assert set(result["eval"]) >= {"routed", "single", "single-continued"}
    assert (
        "single-continued__0" not in result["eval"]["experts_used"]["routed"]
    )  # its prompts: experts or the generalist
    calibration = json.loads(run.path("router", "router.json").read_text())["calibration"]
    assert calibration["fallback"] == engine.generalist  # the threshold chosen against the generalist again
