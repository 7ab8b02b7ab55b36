"""Training on transformers' Trainer: resume to the same adapter, keep the best epoch, never resume stale state."""

import json

import pytest
import torch
from conftest import collated, make_records
from safetensors.torch import load_file

from gradientspace.config import ModelConfig
from gradientspace.data.tokens import tokenize
from gradientspace.gradients.engine import per_sample_mean_loss
from gradientspace.models import train as train_module
from gradientspace.models.loading import load_lora_model
from gradientspace.models.train import TrainPlan, train_adapter


def fresh():
    return load_lora_model(ModelConfig(name="tiny-random", lora_rank=2), seed=0)


def split(loaded, n=16, held=4):
    examples = tokenize(make_records(n), loaded.tokenizer, 96)
    return examples[held:], examples[:held]


def mean_nll(model, examples, pad_id) -> float:
    """The naive reference: one forward per example, the project's per-sample loss, averaged."""
    with torch.no_grad():
        return sum(
            float(per_sample_mean_loss(model(input_ids=i, attention_mask=m).logits, l)[0])
            for i, m, l in (collated([e], pad_id, model) for e in examples)
        ) / len(examples)


def test_interrupted_training_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    plan = TrainPlan(max_epochs=3, learning_rate=1e-2, batch_size=4, seed=0, patience=None, snapshot_epochs=(1,))
    loaded = fresh()
    train, validation = split(loaded)
    pad = loaded.tokenizer.pad_token_id
    summary = train_adapter(loaded.model, train, validation, pad, loaded.device, plan, tmp_path / "clean", "k", "clean")
    assert summary["steps"] == 9 and summary["epochs_run"] == 3
    assert (tmp_path / "clean" / "epoch-1" / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob("*.trainer-*"))  # checkpoints are removed once the adapter is saved

    real_loss = train_module.response_losses
    calls = {"n": 0}

    def crash_during_epoch_two(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # 1 initial evaluation + 3 steps + 1 evaluation, then a step of epoch 2
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train_module, "response_losses", crash_during_epoch_two)
    loaded = fresh()
    with pytest.raises(KeyboardInterrupt):
        train_adapter(loaded.model, train, validation, pad, loaded.device, plan, tmp_path / "resumed", "k", "resumed")
    assert (tmp_path / "resumed.trainer-k" / "checkpoint-3").exists()
    # the interrupted run's seconds count in the resumed adapter's compute (made large so that only a sum reaches them)
    seconds_file = tmp_path / "resumed.trainer-k" / "train_seconds.json"
    assert json.loads(seconds_file.read_text())["seconds"] > 0
    seconds_file.write_text(json.dumps({"seconds": 1000.0}))
    monkeypatch.setattr(train_module, "response_losses", real_loss)
    loaded = fresh()
    resumed = train_adapter(
        loaded.model, train, validation, pad, loaded.device, plan, tmp_path / "resumed", "k", "resumed"
    )
    assert 1000.0 < resumed["train_seconds"] < 1000.0 + summary["train_seconds"] * 10
    a = load_file(str(tmp_path / "clean" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(
        not torch.equal(a[k], load_file(str(tmp_path / "clean" / "epoch-1" / "adapter_model.safetensors"))[k])
        for k in a
    )


def test_a_changed_key_never_resumes_a_stale_checkpoint(tmp_path, monkeypatch, capsys):
    plan = TrainPlan(max_epochs=2, learning_rate=1e-2, batch_size=4, seed=0, patience=None)
    loaded = fresh()
    train, validation = split(loaded)
    real_loss = train_module.response_losses
    calls = {"n": 0}

    def crash(*args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train_module, "response_losses", crash)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(
            loaded.model,
            train,
            validation,
            loaded.tokenizer.pad_token_id,
            loaded.device,
            plan,
            tmp_path / "a",
            "old-key",
            "a",
        )
    monkeypatch.setattr(train_module, "response_losses", real_loss)
    capsys.readouterr()
    loaded = fresh()
    summary = train_adapter(
        loaded.model,
        train,
        validation,
        loaded.tokenizer.pad_token_id,
        loaded.device,
        plan,
        tmp_path / "a",
        "new-key",
        "a",
    )
    assert "resuming" not in capsys.readouterr().out and summary["steps"] == 6
    assert (tmp_path / "a.trainer-old-key").exists() and not (tmp_path / "a.trainer-new-key").exists()


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    """The saved adapter scores the minimum of the validation curve (checked by a naive forward loop)."""
    plan = TrainPlan(max_epochs=6, learning_rate=3e-2, batch_size=4, seed=0, patience=1)
    loaded = fresh()
    train, validation = split(loaded, n=20, held=6)
    pad = loaded.tokenizer.pad_token_id
    summary = train_adapter(loaded.model, train, validation, pad, loaded.device, plan, tmp_path / "best", "k", "best")
    log = json.loads((tmp_path / "best" / "trainer_log.json").read_text())
    curve = [row["eval_loss"] for row in log["validation_curve"]]
    assert summary["best_eval_loss"] == pytest.approx(min(curve))
    assert summary["best_epoch"] == 1 + curve.index(min(curve))
    if summary["epochs_run"] < plan.max_epochs:  # it stopped: patience epochs came after the best without improving
        assert summary["epochs_run"] == summary["best_epoch"] + plan.patience
    reloaded = load_lora_model(ModelConfig(name="tiny-random", lora_rank=2), adapter=tmp_path / "best")
    assert mean_nll(reloaded.model.eval(), validation, pad) == pytest.approx(min(curve), rel=1e-4)
    assert summary["initial_eval_loss"] == pytest.approx(mean_nll(fresh().model.eval(), validation, pad), rel=1e-4)


def scalars(folder, tag: str) -> list[tuple[int, float]]:
    """The (step, value) points TensorBoard recorded under `tag` in `folder`, read back as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_curves_land_under_the_runs_logs_and_match_the_trainer_log(tmp_path):
    from gradientspace.clustering.stages import train_warmup
    from gradientspace.config import load_config

    config = load_config(
        None,
        {
            "model.name": "tiny-random",
            "model.lora_rank": 2,
            "warmup.fraction": 1.0,
            "warmup.epochs": 2,
            "data.validation_fraction": 0.0,
            "train.report_to": "[tensorboard]",
        },
    )
    loaded = fresh()
    summary = train_warmup(tmp_path / "run" / "warmup", config, make_records(12), loaded, "k")
    curve = scalars(tmp_path / "run" / "logs" / "warmup", "train/loss")
    logged = json.loads((tmp_path / "run" / "warmup" / "trainer_log.json").read_text())["loss"]
    assert [step for step, _ in curve] == list(range(1, summary["steps"] + 1))  # one point per optimizer step
    assert [round(value, 5) for _, value in curve] == pytest.approx(logged, abs=1e-5)
    assert not (tmp_path / "run" / "warmup" / "runs").exists()  # nothing left where Trainer would have put it


@pytest.mark.parametrize("visible", [1, 2, 8])
def test_a_ranks_trainer_uses_its_own_gpu_and_the_configs_batch_however_many_gpus_it_sees(
    visible, monkeypatch, tmp_path
):
    """On a GPU node Trainer's one-process job would take cuda:0 and split each batch over every visible GPU
    (DataParallel, batch × GPUs, fewer steps): bound, rank 3 trains on cuda:3 (or its only GPU), n_gpu 1, batch as given."""
    from transformers import TrainingArguments

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(str(device)))
    monkeypatch.setenv("LOCAL_RANK", "3")
    from gradientspace.models.loading import pick_device

    device = pick_device("auto")
    assert device == torch.device("cuda", 3 % visible)
    with train_module._processes(data_parallel=False):
        plain = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[])
        assert (plain.device.index, plain.n_gpu, plain.train_batch_size) == (0, visible, 8 * visible)  # what was wrong
        current.clear()
        bound = train_module.OnOneDevice(
            device=device, output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[]
        )
        assert (bound.device, bound.n_gpu, bound.train_batch_size) == (device, 1, 8)
    assert current == [str(device)]  # cuda:0 was never made current (a CUDA context on GPU 0 for every rank)
    import pickle

    assert pickle.loads(pickle.dumps(bound)).bound_device == device  # Trainer saves its arguments in every checkpoint


def test_a_pinned_gpu_under_torchrun_is_refused_and_experts_are_dealt_whatever_the_gpus(monkeypatch):
    from gradientspace.config import ConfigError, load_config
    from gradientspace.experts.adapters import AdapterStage
    from gradientspace.runs import Placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ConfigError, match=r"config key `model.device`: 'cuda:1' would put every rank of this torchrun job on one GPU"
    ):
        load_config(None, {"model.device": "cuda:1"})
    assert load_config(None, {"model.device": "cuda"}).model.device == "cuda"
    monkeypatch.setattr("gradientspace.distributed.world", lambda: (1, 2))
    # 8 GPUs seen: the experts are still dealt over the ranks, the generalist still trained by all of them together
    assert AdapterStage("routed", "0").placement is Placement.SPREAD
    assert AdapterStage("single", "0").placement is Placement.EVERY


def test_activation_checkpointing_trains_the_same_adapter(tmp_path):
    """`train.activation_checkpointing` recomputes each layer in backward: the memory changes, the adapter does not."""
    adapters = {}
    for checkpointing in (False, True):
        plan = TrainPlan(
            max_epochs=1,
            learning_rate=1e-2,
            batch_size=4,
            seed=0,
            patience=None,
            activation_checkpointing=checkpointing,
        )
        loaded = fresh()
        train, _ = split(loaded, n=12, held=0)
        folder = tmp_path / str(checkpointing)
        summary = train_adapter(
            loaded.model, train, [], loaded.tokenizer.pad_token_id, loaded.device, plan, folder, "k", "t"
        )
        assert summary["steps"] == 3
        assert loaded.model.base_model.model.is_gradient_checkpointing == checkpointing  # Trainer turned it on, or not
        adapters[checkpointing] = load_file(str(folder / "adapter_model.safetensors"))
    assert adapters[True].keys() == adapters[False].keys()
    for name, plain in adapters[False].items():
        assert torch.allclose(adapters[True][name], plain, atol=1e-6), name


def test_each_rank_takes_its_share_of_every_global_batch_weighted_to_the_one_process_loss():
    """A data-parallel adapter (`TrainPlan.data_parallel`): each global batch of the one-process order is cut into the
    ranks' shares, a rank left without a sample gets one weighted 0, and the shares' losses averaged as DDP averages their
    gradients give the one-process gradient of the global batch's mean loss, the short last batch included."""
    order = list(range(10))  # batches of 4: [0-3], [4-7], [8, 9]
    shares = {rank: list(train_module._RankShare(order, 4, rank, 3)) for rank in range(3)}
    assert [[i for i, *_ in batch] for batch in shares[0]] == [[0, 1], [4, 5], [8]]
    assert [[i for i, *_ in batch] for batch in shares[2]] == [
        [0],
        [4],
        [8],
    ]  # nothing of its own: the first, unweighted
    assert [[w for _, w, _ in batch] for batch in shares[2]] == [[0.0], [0.0], [0.0]]
    assert {n for batches in shares.values() for batch in batches for *_, n in batch} == {4, 2}
    assert len(train_module._RankShare(order, 4, 0, 3)) == 3  # one step per global batch, as one process takes

    loaded = fresh()
    examples, _ = split(loaded, n=10, held=0)
    dataset, collate_rows = (
        train_module._ExampleDataset(examples),
        train_module._collator(loaded.tokenizer.pad_token_id),
    )
    trainer = object.__new__(train_module._trainer_class())  # compute_loss reads only the number of ranks
    trainer.args = type("Args", (), {"world_size": 3})()
    lora = [p for p in loaded.model.parameters() if p.requires_grad]

    def gradient(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, lora)])

    for step, batch in enumerate([[0, 1, 2, 3], [8, 9]]):
        one = collate_rows([dataset[i] for i in batch])
        expected = gradient(trainer.compute_loss(loaded.model, one))  # the plain mean over the global batch
        averaged = (
            sum(
                gradient(
                    trainer.compute_loss(loaded.model, collate_rows([dataset[item] for item in shares[rank][2 * step]]))
                )
                for rank in range(3)
            )
            / 3
        )
        assert torch.allclose(averaged, expected, atol=1e-6, rtol=1e-5)
