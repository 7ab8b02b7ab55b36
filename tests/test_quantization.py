"""`model.quantization: nf4`: the base model's Linear layers in 4 bits (bitsandbytes), LoRA weights and gradients in float32.

The gradients are checked as the engine always is, against one backward per sample, and once more against a
float32 model whose base weights are the 4-bit ones dequantised (`bitsandbytes.functional.dequantize_4bit`): the
4-bit base must change the weights and nothing else.
"""

import importlib.util
import sys
import warnings

import pytest
import torch
from conftest import make_records, tiny_run_config
from test_gradients import hooked_gradients, naive_gradients, relative_error

from gradientspace.config import ConfigError, ModelConfig, key_help, load_config
from gradientspace.data.tokens import tokenize
from gradientspace.models.loading import ModelError, load_base_model, load_lora_model

needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'gradientspace[quantization]')",
)


def nf4_model(dtype: str = "float32", targets=("all-linear",), rank: int = 4, seed: int = 2):
    """tiny-random in 4 bits with LoRA on every Linear layer and a non-zero B (seeded), so every LoRA weight has a gradient."""
    loaded = load_lora_model(
        ModelConfig(
            name="tiny-random",
            lora_rank=rank,
            lora_alpha=2 * rank,
            target_modules=list(targets),
            dtype=dtype,
            device="cpu",
            quantization="nf4",
        ),
        seed=0,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return loaded


def dequantised_twin(quantized):
    """The same LoRA model in float32 over a plain base whose Linear weights are the 4-bit ones dequantised."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    twin = load_lora_model(
        ModelConfig(name="tiny-random", lora_rank=4, lora_alpha=8, target_modules=["all-linear"], device="cpu"), seed=0
    )
    four_bit = dict(quantized.model.named_modules())
    lora = dict(quantized.model.named_parameters())
    replaced = 0
    with torch.no_grad():
        for name, module in twin.model.named_modules():
            if isinstance(four_bit.get(name), bnb.nn.Linear4bit):
                weight = four_bit[name].weight
                module.weight.copy_(dequantize_4bit(weight.data, weight.quant_state))
                replaced += 1
        for name, parameter in twin.model.named_parameters():
            if "lora_" in name:
                parameter.copy_(lora[name])
    assert replaced == 14, "every projection of both layers is 4-bit"
    return twin


def four_bit_layers(model) -> dict:
    """What a model holds: its 4-bit base layers, whether each weight is a Params4bit (and repacked), its LoRA dtypes."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return {
        "linear4bit": len(layers),
        "params4bit": all(isinstance(m.weight, bnb.nn.Params4bit) and m.weight.dtype == torch.uint8 for m in layers),
        "repacked": sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers),
        "lora_dtypes": {p.dtype for n, p in model.named_parameters() if "lora_" in n},
    }


@pytest.fixture(scope="module")
def pair():
    quantized = nf4_model()
    return quantized, dequantised_twin(quantized)


@needs_bitsandbytes
def test_per_sample_gradients_match_backward_and_the_dequantised_model(pair):
    quantized, twin = pair
    held = four_bit_layers(quantized.model)
    assert held["linear4bit"] == 14 and held["params4bit"], "q, k, v, o, gate, up, down of both layers in 4 bits"
    assert held["lora_dtypes"] == {torch.float32}
    examples = tokenize(make_records(6), quantized.tokenizer, max_length=128)
    pad = quantized.tokenizer.pad_token_id
    hooked = hooked_gradients(quantized.model, examples, pad, batch_size=3)  # padded batches
    assert hooked.dtype == torch.float32 and hooked.norm(dim=1).min() > 0
    assert relative_error(hooked, naive_gradients(quantized.model, examples, pad)) < 1e-5
    assert relative_error(hooked, naive_gradients(twin.model, examples, pad)) < 1e-5


@needs_bitsandbytes
def test_a_no_grad_forward_leaves_the_gradients_exact(pair):
    """The trap: on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at the first eval-mode forward
    whose input needs no gradient, and later gradients no longer flow back through it (loading.py switches that off)."""
    quantized, twin = pair
    examples = tokenize(make_records(4, seed=1), quantized.tokenizer, max_length=128)
    pad = quantized.tokenizer.pad_token_id
    before = hooked_gradients(quantized.model, examples, pad, batch_size=4)
    hooked_gradients(quantized.model, examples, pad, batch_size=4)
    quantized.model.eval()
    with torch.no_grad():  # what Trainer's evaluation and the bank's scoring do
        quantized.model(input_ids=torch.tensor([examples[0].input_ids]))
    assert four_bit_layers(quantized.model)["repacked"] == 0
    after = hooked_gradients(quantized.model, examples, pad, batch_size=4)
    assert relative_error(after, before) < 1e-6
    assert relative_error(after, naive_gradients(twin.model, examples, pad)) < 1e-5


@needs_bitsandbytes
def test_the_trap_is_real_where_the_cpu_has_avx512_bf16(pair):
    """With bitsandbytes' own setting back on, the same steps give wrong gradients with only a warning: what the test
    above guards against, shown on this CPU (skipped where bitsandbytes would never repack)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here")
    _, twin = pair
    quantized = nf4_model()
    for module in quantized.model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    examples = tokenize(make_records(4, seed=1), quantized.tokenizer, max_length=128)
    pad = quantized.tokenizer.pad_token_id
    quantized.model.eval()
    with torch.no_grad():
        quantized.model(input_ids=torch.tensor([examples[0].input_ids]))
    if not four_bit_layers(quantized.model)["repacked"]:
        pytest.skip(f"bitsandbytes {bnb.__version__} no longer repacks 4-bit weights in a no-grad forward")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrong = hooked_gradients(quantized.model, examples, pad, batch_size=4)
    assert relative_error(wrong, naive_gradients(twin.model, examples, pad)) > 0.05
    assert any("autograd kernel was not registered" in str(w.message) for w in caught)


@needs_bitsandbytes
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batches_mixing_adapters_apply_each_rows_own_over_a_4_bit_base(dtype):
    """The bank's `StackedLoRA` (serving's mixed batches) finds peft's 4-bit LoRA layers and computes in the adapters' dtype."""
    from gradientspace.models.bank import StackedLoRA

    loaded = nf4_model(dtype, targets=("q_proj", "v_proj"), rank=2)
    model = loaded.model
    model.add_adapter("other", model.peft_config["default"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name and ".other." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    model.eval()
    ids = torch.randint(10, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    rows = ["default", "other"]
    stack = StackedLoRA(model, rows)
    assert len(stack.layers) == 4  # q and v of both layers
    with torch.no_grad():
        reference = model(input_ids=ids, adapter_names=rows).logits.float()  # peft's own mixed batch
        with stack.batch(rows):
            stacked = model(input_ids=ids).logits.float()
        model.set_adapter("other")
        other_on_row_0 = model(input_ids=ids[:1]).logits.float()
        model.set_adapter("default")
    assert not torch.allclose(reference[:1], other_on_row_0, atol=1e-3), "the two adapters must differ"
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(stacked, reference, rtol=tolerance, atol=tolerance)


@needs_bitsandbytes
@pytest.mark.heavy(seconds=30)
def test_a_tiny_run_in_4_bits(tmp_path, monkeypatch):
    """`gradientspace run` with `quantization: nf4`: the gradient pass, every adapter's training and the bank's scoring
    and decoding on a 4-bit base, LoRA in float32, no weight ever repacked."""
    from safetensors.torch import load_file
    from transformers import Trainer

    import gradientspace.clustering.stages as stages
    from gradientspace.cli import main
    from gradientspace.models.bank import AdapterBank

    seen = {"gradients": [], "training": [], "banks": []}
    stream = stages.stream_gradients

    def spied_stream(model, *args, **kwargs):
        seen["gradients"].append(four_bit_layers(model))
        yield from stream(model, *args, **kwargs)

    train = Trainer.train

    def spied_train(self, *args, **kwargs):
        seen["training"].append(four_bit_layers(self.model))
        return train(self, *args, **kwargs)

    make_bank = AdapterBank.__init__

    def spied_bank(self, *args, **kwargs):
        make_bank(self, *args, **kwargs)
        seen["banks"].append(self)

    monkeypatch.setattr(stages, "stream_gradients", spied_stream)
    monkeypatch.setattr(Trainer, "train", spied_train)
    monkeypatch.setattr(AdapterBank, "__init__", spied_bank)
    config = tiny_run_config(tmp_path, ["routed", "single"], experts="fallback: generalist, branch_epochs: 1")
    config.write_text(config.read_text().replace("lora_rank: 2}", "lora_rank: 2, quantization: nf4}"))
    assert main(["run", str(config)]) == 0
    assert (tmp_path / "run" / "eval.json").exists()

    four_bit = {"linear4bit": 14, "params4bit": True, "repacked": 0, "lora_dtypes": {torch.float32}}
    assert seen["gradients"] and all(held == four_bit for held in seen["gradients"])
    assert len(seen["training"]) >= 5 and all(held == four_bit for held in seen["training"])  # warm-up, single, experts
    assert len(seen["banks"]) == 1, "one bank per process"
    bank = seen["banks"][0]
    assert len(bank.model.peft_config) >= 2  # the generalist and experts, every one over the same 4-bit base
    assert four_bit_layers(bank.model) == four_bit  # after scoring and decoding under no_grad
    for weights in (tmp_path / "run").rglob("adapter_model.safetensors"):
        assert {t.dtype for t in load_file(str(weights)).values()} == {torch.float32}, weights


def test_the_key_has_help_and_refuses_other_values():
    assert load_config(None).model.quantization == "none"
    assert load_config(None, {"model.quantization": "nf4"}).model.quantization == "nf4"
    text = key_help("model.quantization")
    assert "`nf4`" in text and "bitsandbytes" in text and "gradientspace[quantization]" in text
    with pytest.raises(ConfigError) as refused:
        load_config(None, {"model.quantization": "int4"})
    assert str(refused.value) == "config key `model.quantization`: 'int4' is not one of none, nf4"


def test_nf4_without_bitsandbytes_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """Preflight names the key and the extra before anything runs; `serve`, which loads the bank without preflight,
    says the same through `load_base_model`."""
    from gradientspace.cli import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importlib's find_spec answers None: not installed
    config = tiny_run_config(tmp_path, ["single"])
    config.write_text(config.read_text().replace("lora_rank: 2}", "lora_rank: 2, quantization: nf4}"))
    assert main(["run", str(config)]) == 2
    out, err = capsys.readouterr()
    expected = (
        "config key `model.quantization`: `nf4` needs bitsandbytes, which is not installed: "
        "pip install 'gradientspace[quantization]'"
    )
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "run" / "manifest.json").exists()
    with pytest.raises(ModelError, match="`model.quantization`: `nf4` needs bitsandbytes"):
        load_base_model("tiny-random", torch.device("cpu"), quantization="nf4")


def test_an_older_bitsandbytes_is_refused_in_one_line(monkeypatch):
    """Before 0.50 bitsandbytes had no CPU backend: named with the version found, not an error deep in transformers."""
    import importlib.metadata

    from gradientspace.models import loading

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.5" if name == "bitsandbytes" else real(name))
    assert loading.quantization_problem("nf4") == (
        "config key `model.quantization`: `nf4` needs bitsandbytes, at least 0.50, and 0.45.5 is installed: "
        "pip install 'gradientspace[quantization]'"
    )
    assert loading.quantization_problem("none") is None
