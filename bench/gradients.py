"""Speed of per-sample gradient extraction, A/B in one process on the same batches.

  hooked  : PerSampleGradients — one batched backward, per-sample gradients by einsum
  naive   : one forward + loss.backward() per sample (the reference loop)
  plain   : one batched forward + backward with no per-sample gradients (the floor)

Rounds alternate the three so machine drift hits all of them alike. Prints JSON.

    python bench/gradients.py --model smollm2-135m --samples 32 --batch-size 8 --max-length 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gradientspace.config import ModelConfig
from gradientspace.data.loading import load_records
from gradientspace.data.tokens import collate, shuffled_length_batches, tokenize
from gradientspace.gradients.engine import PerSampleGradients, layout_of, per_sample_mean_loss
from gradientspace.models.loading import load_lora_model

SHARED_MIX4 = Path(__file__).resolve().parents[2] / "shared" / "data" / "mix4" / "train.jsonl"


def hooked(model, batches, pad_id, device):
    rows = []
    with PerSampleGradients(model) as engine:
        for batch in batches:
            grads, _ = engine.batch(*(t.to(device) for t in collate(batch, pad_id)))
            rows.append(grads)
    return torch.cat(rows)


def naive(model, batches, pad_id, device):
    names = layout_of(model).names
    parameters = dict(model.named_parameters())
    rows = []
    for batch in batches:
        for example in batch:
            model.zero_grad(set_to_none=True)
            input_ids, mask, labels = (t.to(device) for t in collate([example], pad_id))
            per_sample_mean_loss(model(input_ids=input_ids, attention_mask=mask).logits, labels).sum().backward()
            rows.append(torch.cat([parameters[n].grad.reshape(-1) for n in names]))
    return torch.stack(rows)


def plain(model, batches, pad_id, device):
    for batch in batches:
        model.zero_grad(set_to_none=True)
        input_ids, mask, labels = (t.to(device) for t in collate(batch, pad_id))
        per_sample_mean_loss(model(input_ids=input_ids, attention_mask=mask).logits, labels).sum().backward()
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(SHARED_MIX4) if SHARED_MIX4.exists() else "mix4-packaged")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    loaded = load_lora_model(ModelConfig(name=args.model), seed=0)
    model, device = loaded.model, loaded.device
    with torch.no_grad():  # B = 0 at init; give it values so both halves of the gradient are non-trivial
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)
    model.eval()
    records, _ = load_records(args.data, limit=args.samples)
    examples = tokenize(records, loaded.tokenizer, args.max_length)
    batches = shuffled_length_batches(examples, args.batch_size, chunk_size=256, seed=0)
    pad_id = loaded.tokenizer.pad_token_id
    methods = {"hooked": hooked, "naive": naive, "plain": plain}
    plain(model, batches[:1], pad_id, device)  # warm the allocator and kernels once

    seconds = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, function in methods.items():
            start = time.perf_counter()
            function(model, batches, pad_id, device)
            seconds[name].append(time.perf_counter() - start)
    check = batches[:1]
    a, b = hooked(model, check, pad_id, device), naive(model, check, pad_id, device)
    n = len(examples)
    best = {name: min(values) for name, values in seconds.items()}
    result = {
        "model": args.model,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "samples": n,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "dim": layout_of(model).dim,
        "tokens": sum(len(e.input_ids) for e in examples),
        "rounds": args.rounds,
        "seconds": {k: [round(v, 3) for v in vs] for k, vs in seconds.items()},
        "samples_per_second": {k: round(n / v, 3) for k, v in best.items()},
        "ratio_hooked_vs_plain": round(best["plain"] / best["hooked"], 3),
        "ratio_hooked_vs_naive": round(best["naive"] / best["hooked"], 3),
        "max_relative_error_hooked_vs_naive": float(((a - b).norm(dim=1) / b.norm(dim=1)).max()),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
