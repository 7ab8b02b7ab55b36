"""The training loss over labelled positions only, against the full-grid cross-entropy it replaced, in one process.

`gradients.per_sample_mean_loss` runs the softmax over the positions that carry a label (the
response), not over every position of the batch; with a 49 152-token vocabulary (SmolLM2's, which
tiny-random shares) that softmax and its backward were most of a training step. Prints JSON: the
seconds of forward + backward of the loss per batch for both, their ratio, and the largest
difference between the two losses and between their gradients on the logits.

    python bench/loss.py [--batch 8] [--length 128] [--vocab 49152] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from gradientspace.data.tokens import IGNORE
from gradientspace.gradients.engine import per_sample_mean_loss


def full_grid_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The previous definition: cross-entropy at every position, `ignore_index` zeroing the unlabelled ones."""
    shifted = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), shifted, ignore_index=IGNORE, reduction="none")
    return losses.sum(dim=1) / (shifted != IGNORE).sum(dim=1).clamp(min=1)


def timed(
    loss_fn, logits: torch.Tensor, labels: torch.Tensor, repeats: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    seconds = []
    for _ in range(repeats):
        leaf = logits.detach().clone().requires_grad_(True)
        start = time.perf_counter()
        loss = loss_fn(leaf, labels)
        loss.mean().backward()
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2], loss.detach(), leaf.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument(
        "--response-share", type=float, default=0.3, help="share of each sample's positions that carry a label"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.length, args.vocab, generator=generator)
    labels = torch.randint(0, args.vocab, (args.batch, args.length), generator=generator)
    labels[:, : int(args.length * (1 - args.response_share))] = IGNORE  # the prompt carries no loss
    full_seconds, full_loss, full_grad = timed(full_grid_loss, logits, labels, args.repeats)
    labelled_seconds, labelled_loss, labelled_grad = timed(per_sample_mean_loss, logits, labels, args.repeats)
    print(
        json.dumps(
            {
                "batch": args.batch,
                "length": args.length,
                "vocab": args.vocab,
                "response_share": args.response_share,
                "threads": torch.get_num_threads(),
                "full_grid_seconds": round(full_seconds, 4),
                "labelled_only_seconds": round(labelled_seconds, 4),
                "speedup": round(full_seconds / labelled_seconds, 2),
                "max_loss_difference": float((full_loss - labelled_loss).abs().max()),
                "max_gradient_difference": float((full_grad - labelled_grad).abs().max()),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
