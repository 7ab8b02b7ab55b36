"""The batched hooked engine must equal one backward pass per sample."""

import pytest
import torch
from conftest import collated, make_records

from gradientspace.data.tokens import tokenize
from gradientspace.gradients.engine import AdamState, PerSampleGradients, layout_of, per_sample_mean_loss, transform


def naive_gradients(model, examples, pad_id):
    """Reference: one forward and one loss.backward() per sample, read from parameter .grad."""
    layout = layout_of(model)
    parameters = dict(model.named_parameters())
    rows = []
    model.eval()
    for example in examples:
        model.zero_grad(set_to_none=True)
        input_ids, mask, labels = collated([example], pad_id, model)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        per_sample_mean_loss(logits, labels).sum().backward()
        rows.append(torch.cat([parameters[name].grad.reshape(-1) for name in layout.names]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def hooked_gradients(model, examples, pad_id, batch_size):
    rows = {}
    with PerSampleGradients(model) as engine:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            grads, _ = engine.batch(*collated(batch, pad_id, model))
            for example, row in zip(batch, grads):
                rows[example.index] = row
    return torch.stack([rows[e.index] for e in examples])


def relative_error(a, b):
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


@pytest.mark.parametrize("tokens", ["response", "instruction"])
def test_batched_equals_per_sample_backward(tiny, tokens):
    examples = tokenize(make_records(9), tiny.tokenizer, max_length=128, tokens=tokens)
    lengths = {len(e.input_ids) for e in examples}
    assert len(lengths) > 3, "the test needs uneven lengths so that padding happens"
    naive = naive_gradients(tiny.model, examples, tiny.tokenizer.pad_token_id)
    hooked = hooked_gradients(tiny.model, examples, tiny.tokenizer.pad_token_id, batch_size=4)
    assert naive.shape[1] == layout_of(tiny.model).dim
    assert naive.norm(dim=1).min() > 0
    assert relative_error(hooked, naive) < 1e-5


def test_gradient_has_both_a_and_b_parts(tiny):
    examples = tokenize(make_records(2), tiny.tokenizer, max_length=128)
    grads = hooked_gradients(tiny.model, examples, tiny.tokenizer.pad_token_id, batch_size=2)
    layout = layout_of(tiny.model)
    offset = 0
    for name, shape in zip(layout.names, layout.shapes):
        size = torch.Size(shape).numel()
        assert grads[:, offset : offset + size].abs().sum() > 0, name
        offset += size


def test_padding_does_not_leak(tiny):
    """A sample's gradient is the same alone and in a batch with a much longer neighbour."""
    records = make_records(12)
    examples = tokenize(records, tiny.tokenizer, max_length=128)
    short = min(examples, key=lambda e: len(e.input_ids))
    long = max(examples, key=lambda e: len(e.input_ids))
    alone = hooked_gradients(tiny.model, [short], tiny.tokenizer.pad_token_id, 1)
    padded = hooked_gradients(tiny.model, [short, long], tiny.tokenizer.pad_token_id, 2)[:1]
    assert relative_error(padded, alone) < 1e-5


def test_adam_and_normalised_variants(tiny):
    examples = tokenize(make_records(6), tiny.tokenizer, max_length=128)
    naive = naive_gradients(tiny.model, examples, tiny.tokenizer.pad_token_id)
    hooked = hooked_gradients(tiny.model, examples, tiny.tokenizer.pad_token_id, batch_size=3)
    dim = naive.shape[1]
    generator = torch.Generator().manual_seed(3)
    moments = (torch.randn(dim, generator=generator) * 1e-3, torch.rand(dim, generator=generator) * 1e-5)
    adam = AdamState(*(moment.to(naive.device) for moment in moments), step=7)  # on the gradients' device, as loaded
    # Reference Adam step written out from the definition (bias-corrected moments after one more step).
    m = 0.9 * adam.exp_avg + 0.1 * naive
    v = 0.999 * adam.exp_avg_sq + 0.001 * naive**2
    expected = (m / (1 - 0.9**8)) / ((v / (1 - 0.999**8)).sqrt() + 1e-8)
    assert relative_error(transform(hooked, adam, normalize=False), expected) < 1e-5
    normalised = transform(hooked, adam, normalize=True)
    assert torch.allclose(normalised.norm(dim=1).cpu(), torch.ones(len(examples)), atol=1e-5)
    assert relative_error(normalised, expected / expected.norm(dim=1, keepdim=True)) < 1e-5


@pytest.mark.parametrize("names", ["activation", "gradient"])
def test_activation_checkpointing_gives_the_same_gradients(tiny, names, monkeypatch):
    """With either of transformers' names for it: an older 5.x has only `gradient_checkpointing_enable`."""
    from transformers import PreTrainedModel

    if names == "gradient" and hasattr(PreTrainedModel, "activation_checkpointing_enable"):
        # the API of an older transformers 5.x (5.17): only the old names, doing what the new ones do now
        enable, disable = (
            PreTrainedModel.activation_checkpointing_enable,
            PreTrainedModel.activation_checkpointing_disable,
        )
        monkeypatch.delattr(PreTrainedModel, "activation_checkpointing_enable")
        monkeypatch.delattr(PreTrainedModel, "activation_checkpointing_disable")
        monkeypatch.setattr(
            PreTrainedModel,
            "gradient_checkpointing_enable",
            lambda model, gradient_checkpointing_kwargs=None: enable(
                model, activation_checkpointing_kwargs=gradient_checkpointing_kwargs
            ),
            raising=False,
        )
        monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_disable", disable, raising=False)
    examples = tokenize(make_records(7), tiny.tokenizer, max_length=128)
    naive = naive_gradients(tiny.model, examples, tiny.tokenizer.pad_token_id)
    rows = []
    with PerSampleGradients(tiny.model, checkpointing=True) as engine:
        checkpointed = [m for m in tiny.model.modules() if getattr(m, "gradient_checkpointing", False)]
        assert checkpointed, "checkpointing must actually be switched on inside the engine"
        for start in range(0, len(examples), 4):
            rows.append(
                engine.batch(*collated(examples[start : start + 4], tiny.tokenizer.pad_token_id, tiny.model))[0]
            )
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny.model.modules()), (
        "switched off again on exit"
    )
    assert relative_error(torch.cat(rows), naive) < 1e-5


def test_per_sample_gradients_sum_to_the_batch_gradient_and_leave_grad_alone(tiny):
    examples = tokenize(make_records(5), tiny.tokenizer, max_length=128)
    layout = layout_of(tiny.model)
    parameters = dict(tiny.model.named_parameters())
    sentinel = {name: torch.full_like(parameters[name], 7.0) for name in layout.names}
    for name in layout.names:
        parameters[name].grad = sentinel[name].clone()
    grads = hooked_gradients(tiny.model, examples, tiny.tokenizer.pad_token_id, batch_size=5)
    assert all(torch.equal(parameters[n].grad, sentinel[n]) for n in layout.names), (
        "an earlier .grad must survive the engine"
    )
    tiny.model.zero_grad(set_to_none=True)
    input_ids, mask, labels = collated(examples, tiny.tokenizer.pad_token_id, tiny.model)
    per_sample_mean_loss(tiny.model(input_ids=input_ids, attention_mask=mask).logits, labels).sum().backward()
    batch = torch.cat([parameters[n].grad.reshape(-1) for n in layout.names])
    tiny.model.zero_grad(set_to_none=True)
    assert ((grads.sum(0) - batch).norm() / batch.norm()).item() < 1e-5


def test_layout_covers_every_trainable_parameter(tiny):
    trainable = {n for n, p in tiny.model.named_parameters() if p.requires_grad}
    layout = layout_of(tiny.model)
    assert set(layout.names) == trainable
    assert layout.dim == sum(p.numel() for n, p in tiny.model.named_parameters() if n in trainable)
    norm = next(p for n, p in tiny.model.named_parameters() if "norm" in n)
    norm.requires_grad_(True)  # e.g. a `modules_to_save` layer: trains, but has no per-sample gradient here
    try:
        with pytest.raises(ValueError, match="outside the LoRA gradient layout"):
            with PerSampleGradients(tiny.model):
                pass
    finally:
        norm.requires_grad_(False)


@pytest.fixture(scope="module")
def all_linear_pair():
    """The same all-linear LoRA model in float32 and in bfloat16 (weights copied, B non-zero)."""
    from gradientspace.config import ModelConfig
    from gradientspace.models.loading import load_lora_model

    loaded = {}
    for dtype in ("float32", "bfloat16"):
        loaded[dtype] = load_lora_model(
            ModelConfig(
                name="tiny-random", lora_rank=4, lora_alpha=8, target_modules=["all-linear"], dtype=dtype, device="cpu"
            ),
            seed=0,
        )
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in loaded["float32"].model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        state = dict(loaded["float32"].model.named_parameters())
        for name, parameter in loaded["bfloat16"].model.named_parameters():
            if "lora_" in name:
                parameter.copy_(state[name])
    return loaded


def test_all_linear_targets_every_projection(all_linear_pair):
    names = layout_of(all_linear_pair["float32"].model).names
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f".{projection}.lora_A." in n for n in names), projection
    assert not any("lm_head" in n for n in names)


def test_bfloat16_base_model_gives_float32_gradients_close_to_float32(all_linear_pair):
    fp32, bf16 = all_linear_pair["float32"], all_linear_pair["bfloat16"]
    assert next(p for n, p in bf16.model.named_parameters() if "q_proj.base_layer" in n).dtype == torch.bfloat16
    examples = tokenize(make_records(6), fp32.tokenizer, max_length=128)
    pad = fp32.tokenizer.pad_token_id
    reference = naive_gradients(fp32.model, examples, pad)
    assert relative_error(hooked_gradients(fp32.model, examples, pad, batch_size=3), reference) < 1e-5
    half = hooked_gradients(bf16.model, examples, pad, batch_size=3)
    assert half.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: a few per cent per sample, never a different direction.
    assert relative_error(half, reference) < 0.1
    assert torch.nn.functional.cosine_similarity(half, reference).min() > 0.99
