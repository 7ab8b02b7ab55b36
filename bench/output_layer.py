"""A training step with the output layer run only where a loss is taken, against the full forward it replaced, in one process.

`gradients.response_losses` asks the model for logits only at the positions that predict a
labelled (response) token of some sample in the batch (transformers' `logits_to_keep`); before, the
output layer ran at every position and the loss then used the labelled ones. Both sides train the
same LoRA model on the same templated mix4-packaged batches. Prints JSON: the median seconds of
forward + loss + backward per batch for both, their ratio, the share of positions that kept their
logits, and the largest difference between the two sides' losses and LoRA gradients.

    python bench/output_layer.py [--model tiny-random] [--batch 8] [--max-length 256] [--batches 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gradientspace.config import ModelConfig
from gradientspace.data.loading import load_records
from gradientspace.data.tokens import IGNORE, collate, tokenize
from gradientspace.gradients.engine import per_sample_mean_loss, response_losses
from gradientspace.models.loading import load_lora_model


def full_forward_losses(model, input_ids, mask, labels) -> torch.Tensor:
    """The previous step: logits at every position, then the loss over the labelled ones."""
    return per_sample_mean_loss(model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits, labels)


def step(loss_fn, model, batch) -> tuple[float, torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    losses = loss_fn(model, *batch)
    losses.mean().backward()
    seconds = time.perf_counter() - start
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return seconds, losses.detach(), grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = load_lora_model(ModelConfig(name=args.model), seed=0)
    records, _ = load_records("mix4-packaged", limit=args.batch * args.batches, seed=0)
    examples = tokenize(records, loaded.tokenizer, args.max_length, "response")
    batches = [
        tuple(t.to(loaded.device) for t in collate(examples[i : i + args.batch], loaded.tokenizer.pad_token_id))
        for i in range(0, len(examples), args.batch)
    ]
    seconds = {"full": [], "labelled": []}
    loss_difference = gradient_difference = 0.0
    kept = positions = 0
    for _ in range(args.repeats):
        for batch in batches:
            full_seconds, full_loss, full_grad = step(full_forward_losses, loaded.model, batch)
            labelled_seconds, labelled_loss, labelled_grad = step(response_losses, loaded.model, batch)
            seconds["full"].append(full_seconds)
            seconds["labelled"].append(labelled_seconds)
            loss_difference = max(loss_difference, float((full_loss - labelled_loss).abs().max()))
            gradient_difference = max(gradient_difference, float((full_grad - labelled_grad).abs().max()))
    for _, _, labels in batches:
        kept += int((labels[:, 1:] != IGNORE).any(dim=0).sum())
        positions += labels.shape[1] - 1
    median = {side: sorted(values)[len(values) // 2] for side, values in seconds.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                "batch": args.batch,
                "max_length": args.max_length,
                "batches": len(batches),
                "threads": torch.get_num_threads(),
                "positions_with_logits": round(kept / positions, 3),
                "full_forward_seconds": round(median["full"], 4),
                "labelled_only_seconds": round(median["labelled"], 4),
                "speedup": round(median["full"] / median["labelled"], 2),
                "max_loss_difference": loss_difference,
                "max_lora_gradient_difference": gradient_difference,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
