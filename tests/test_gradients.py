"""The batched hooked engine must equal one backward pass per sample."""

import pytest
import torch

from conftest import make_records
from gradientspace.data import collate, tokenize
from gradientspace.gradients import AdamState, PerSampleGradients, layout_of, per_sample_mean_loss, transform


def naive_gradients(model, examples, pad_id):
    """Reference: one forward and one loss.backward() per sample, read from parameter .grad."""
    layout = layout_of(model)
    parameters = dict(model.named_parameters())
    rows = []
    model.eval()
    for example in examples:
        model.zero_grad(set_to_none=True)
        input_ids, mask, labels = collate([example], pad_id)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        per_sample_mean_loss(logits, labels).sum().backward()
        rows.append(torch.cat([parameters[name].grad.reshape(-1) for name in layout.names]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def hooked_gradients(model, examples, pad_id, batch_size):
    rows = {}
    with PerSampleGradients(model) as engine:
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            grads, _ = engine.batch(*collate(batch, pad_id))
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
        assert grads[:, offset:offset + size].abs().sum() > 0, name
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
    adam = AdamState(torch.randn(dim, generator=generator) * 1e-3, torch.rand(dim, generator=generator) * 1e-5, step=7)
    # Reference Adam step written out from the definition (bias-corrected moments after one more step).
    m = 0.9 * adam.exp_avg + 0.1 * naive
    v = 0.999 * adam.exp_avg_sq + 0.001 * naive**2
    expected = (m / (1 - 0.9**8)) / ((v / (1 - 0.999**8)).sqrt() + 1e-8)
    assert relative_error(transform(hooked, adam, normalize=False), expected) < 1e-5
    normalised = transform(hooked, adam, normalize=True)
    assert torch.allclose(normalised.norm(dim=1), torch.ones(len(examples)), atol=1e-5)
    assert relative_error(normalised, expected / expected.norm(dim=1, keepdim=True)) < 1e-5
