"""bench/scale.py's memory plan, run on tiny-random: what it counts on the meta device against the loaded model."""

import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from gradientspace.config import ModelConfig, load_config
from gradientspace.data.tokens import IGNORE
from gradientspace.gradients.engine import layout_of, response_losses
from gradientspace.models.loading import load_base_model, lora_config, quantization_config, resolve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import scale  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    hf_config = AutoConfig.from_pretrained(resolve("tiny-random"))
    return hf_config, scale.count_model(hf_config, ModelConfig())


def held_bytes(model: torch.nn.Module) -> int:
    """Every parameter's bytes, a 4-bit weight's quantisation state included: what the loaded model holds."""
    total = 0
    for parameter in model.parameters():
        total += parameter.numel() * parameter.element_size()
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            kept = [state.absmax, state.code]
            if state.nested:
                kept += [state.state2.absmax, state.state2.code, state.offset]
            total += sum(t.numel() * t.element_size() for t in kept)
    return total


def test_meta_count_matches_the_loaded_model(tiny):
    _, count = tiny
    for precision in ("float32", "bfloat16"):
        model = load_base_model("tiny-random", CPU, getattr(torch, precision))
        assert count.params == sum(p.numel() for p in model.parameters())
        assert scale.base_bytes(count, precision) == held_bytes(model)
    assert count.lora_dim == layout_of(get_peft_model(model, lora_config(ModelConfig()))).dim


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_match_bitsandbytes(tiny, double_quant):
    pytest.importorskip("bitsandbytes")
    _, count = tiny
    quantization = quantization_config("nf4", torch.bfloat16)  # as `model.quantization: nf4` loads the base
    quantization.bnb_4bit_use_double_quant = double_quant
    model = AutoModelForCausalLM.from_pretrained(
        resolve("tiny-random"), dtype=torch.bfloat16, quantization_config=quantization, device_map={"": CPU}
    )
    assert scale.base_bytes(count, "nf4", double_quant) == held_bytes(model)
    assert scale.base_bytes(count, "nf4", double_quant) < scale.base_bytes(count, "bfloat16")
    assert scale.base_bytes(count, "bfloat16") < scale.base_bytes(count, "float32")


def test_layer_activations_match_what_autograd_saves(tiny):
    """The per-layer formula against the bytes autograd keeps for backward: a 3-layer model less a 1-layer one."""
    hf_config, count = tiny
    batch, tokens = 4, 64
    input_ids = torch.randint(0, 1000, (batch, tokens))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, :10] = 0  # padded, as a real batch: transformers then repeats k and v for every head
    labels = input_ids.masked_fill(torch.arange(tokens) < tokens // 2, IGNORE)
    saved = {}
    for layers in (1, 3):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(type(hf_config)(**{**hf_config.to_dict(), "num_hidden_layers": layers}))
        base = base.to(torch.bfloat16)
        model = get_peft_model(base, lora_config(ModelConfig()))  # float32 LoRA over a bf16 base, as on a GPU
        storages = {}

        def keep(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            response_losses(model, input_ids, mask, labels)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved[layers] = sum(size for pointer, size in storages.items() if pointer not in weights)
    per_layer = (saved[3] - saved[1]) / 2
    assert per_layer == pytest.approx(batch * tokens * scale.layer_activation_bytes(count, tokens, 4), rel=0.01)


def test_plan_covers_every_stage_and_rank(tiny):
    import gradientspace.experts.strategies  # noqa: F401  registers the strategies the default config names

    _, count = tiny
    config = load_config()
    plan = scale.memory_plan(count, config)
    assert plan["settings"]["gradients.batch_size"] == config.gradients.batch_size
    assert plan["settings"]["sketch.rank"] == config.sketch.rank
    for mechanism in plan["mechanisms"].values():
        assert mechanism["fits"]  # a tiny model fits anywhere
        for stage in mechanism["stages"].values():
            assert len(stage["per_rank_gib"]) == scale.GPUS
        # rank 0 ends the tree merge holding every shard's coordinates: never less than an odd rank, which only sends
        gradients = mechanism["stages"]["gradient pass"]["per_rank_gib"]
        assert gradients[0] >= gradients[1]
