"""The LoRA training loop resumes from its checkpoint to the same adapter, and snapshots epochs."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_records
from gradientspace import train as train_module
from gradientspace.config import ModelConfig
from gradientspace.data import tokenize
from gradientspace.models import load_lora_model
from gradientspace.train import TrainPlan, train_adapter


def fresh():
    return load_lora_model(ModelConfig(name="tiny-random", lora_rank=2), seed=0)


def test_interrupted_training_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    plan = TrainPlan(epochs=2, learning_rate=1e-2, batch_size=4, seed=0, checkpoint_every=2, snapshot_epochs=(1, 2))
    loaded = fresh()
    examples = tokenize(make_records(12), loaded.tokenizer, 96)
    summary = train_adapter(loaded.model, examples, loaded.tokenizer.pad_token_id, loaded.device, plan, tmp_path / "clean", "clean")
    assert summary["steps"] == 6
    assert (tmp_path / "clean" / "epoch-1" / "adapter_model.safetensors").exists()
    assert (tmp_path / "clean" / "epoch-2" / "adapter_model.safetensors").exists()

    real_loss = train_module.per_sample_mean_loss
    calls = {"n": 0}

    def crash_on_fifth(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train_module, "per_sample_mean_loss", crash_on_fifth)
    loaded = fresh()
    with pytest.raises(KeyboardInterrupt):
        train_adapter(loaded.model, examples, loaded.tokenizer.pad_token_id, loaded.device, plan, tmp_path / "resumed", "resumed")
    assert (tmp_path / "resumed" / "checkpoint" / "state.json").exists()
    monkeypatch.setattr(train_module, "per_sample_mean_loss", real_loss)
    loaded = fresh()
    train_adapter(loaded.model, examples, loaded.tokenizer.pad_token_id, loaded.device, plan, tmp_path / "resumed", "resumed")
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    a = load_file(str(tmp_path / "clean" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], load_file(str(tmp_path / "clean" / "epoch-1" / "adapter_model.safetensors"))[k]) for k in a)
