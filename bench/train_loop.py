"""Train-loop throughput: the Trainer path (`train.train_adapter`) against the old hand-kept loop, same batches.

  trainer : transformers' Trainer with the project's loss, schedule and checkpointing (no validation)
  hand    : the loop the project used before: AdamW, forward, per-sample mean loss, backward, step

Both see the same batches in the same order (the old loop's length-sorted shuffled batches; the
Trainer reads them sequentially), one epoch each; rounds alternate them so machine drift hits both
alike. Throughput counts the non-padding tokens per second. Prints JSON.

    python bench/train_loop.py --model smollm2-135m --samples 64 --batch-size 8 --max-length 128
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from gradientspace.config import ModelConfig
from gradientspace.data.loading import load_records
from gradientspace.data.tokens import collate, shuffled_length_batches, tokenize
from gradientspace.gradients.engine import ADAM_BETAS, ADAM_EPS, per_sample_mean_loss
from gradientspace.models.loading import load_lora_model
from gradientspace.models.train import TrainPlan, train_adapter

SHARED_MIX4 = Path(__file__).resolve().parents[2] / "shared" / "data" / "mix4" / "train.jsonl"


def hand_loop(model, batches, pad_id, device, learning_rate):
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=learning_rate,
        betas=ADAM_BETAS,
        eps=ADAM_EPS,
        weight_decay=0.0,
    )
    model.train()
    for batch in batches:
        input_ids, mask, labels = (t.to(device) for t in collate(batch, pad_id))
        loss = per_sample_mean_loss(model(input_ids=input_ids, attention_mask=mask).logits, labels).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def trainer_loop(model, batches, pad_id, device, learning_rate, folder: Path):
    examples = [example for batch in batches for example in batch]
    plan = TrainPlan(
        1,
        learning_rate,
        len(batches[0]),
        seed=0,
        schedule="constant",
        warmup_ratio=0.0,
        patience=None,
        sampling="sequential",
    )
    train_adapter(model, examples, [], pad_id, device, plan, folder, "bench", "trainer")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(SHARED_MIX4) if SHARED_MIX4.exists() else "mix4-packaged")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    loaded = load_lora_model(ModelConfig(name=args.model), seed=0)
    records, _ = load_records(args.data, limit=args.samples)
    examples = tokenize(records, loaded.tokenizer, args.max_length)
    batches = shuffled_length_batches(examples, args.batch_size, chunk_size=256, seed=0)
    # the Trainer drops nothing and reorders nothing in `sequential` mode only if every batch is full
    batches = [b for b in batches if len(b) == args.batch_size]
    tokens = sum(len(e.input_ids) for b in batches for e in b)
    pad_id = loaded.tokenizer.pad_token_id
    hand_loop(loaded.model, batches[:1], pad_id, loaded.device, 1e-4)  # warm the allocator and kernels once
    seconds = {"trainer": [], "hand": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(args.rounds):
            for name in ("trainer", "hand"):
                start = time.perf_counter()
                if name == "hand":
                    hand_loop(loaded.model, batches, pad_id, loaded.device, 1e-4)
                else:
                    trainer_loop(
                        loaded.model, batches, pad_id, loaded.device, 1e-4, Path(scratch) / f"round{round_number}"
                    )
                seconds[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in seconds.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                "device": str(loaded.device),
                "threads": torch.get_num_threads(),
                "batches": len(batches),
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "tokens": tokens,
                "rounds": args.rounds,
                "seconds": {k: [round(v, 2) for v in vs] for k, vs in seconds.items()},
                "tokens_per_second": {k: round(tokens / v, 1) for k, v in best.items()},
                "ratio_trainer_vs_hand": round(best["hand"] / best["trainer"], 3),
                "note": "trainer seconds include saving the adapter, its Adam moments and the log once per run",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
