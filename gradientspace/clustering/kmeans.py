"""Clustering in gradient space, the baselines behind the same interface, and cluster metrics.

Methods (all end in k-means from scikit-learn on unit-norm rows, i.e. spherical k-means):
- `gradientspace`: the online-SVD coordinates of the full gradients (the project's method);
- `random-projection`: full gradients × a seeded Rademacher matrix (LESS / ELREA style);
- `exact`: the full gradients themselves, kept in memory (the ceiling; small N×d only);
- `embedding`: all-MiniLM-L6-v2 embeddings of the prompt text;
- `random`: seeded random assignment (the control).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from gradientspace.gradients.consumers import GradientConsumer


class RademacherProjector(GradientConsumer):
    """Projects gradients to k dims with a ±1/√k matrix that is regenerated block by block, never stored.

    Row block j of the d×k matrix comes from a generator seeded with (seed, j), so every call sees
    the same matrix. Regenerating it costs d·k random draws per call, so gradients are buffered
    and projected `buffer_rows` at a time.
    """

    def __init__(self, dim: int, k: int, seed: int, block_rows: int = 8192, buffer_rows: int = 256):
        self.dim, self.k, self.seed = dim, k, seed
        self.block_rows, self.buffer_rows = block_rows, buffer_rows
        self._pending: list[torch.Tensor] = []
        self._pending_indices: list[int] = []
        self.features: list[torch.Tensor] = []
        self.indices: list[int] = []

    def block(self, j: int, device: torch.device) -> torch.Tensor:
        rows = min(self.block_rows, self.dim - j * self.block_rows)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        signs = torch.randint(0, 2, (rows, self.k), generator=generator, dtype=torch.int8)
        return (signs.to(device, torch.float32) * 2 - 1) / math.sqrt(self.k)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(rows), self.k, device=rows.device)
        for j in range(math.ceil(self.dim / self.block_rows)):
            start = j * self.block_rows
            out += rows[:, start : start + self.block_rows].float() @ self.block(j, rows.device)
        return out

    def add(self, rows: torch.Tensor, indices: list[int]) -> None:
        self._pending.append(rows.float())
        self._pending_indices.extend(indices)
        if sum(len(p) for p in self._pending) >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.features.append(self.project(torch.cat(self._pending)).cpu())
            self.indices.extend(self._pending_indices)
            self._pending, self._pending_indices = [], []

    def result(self) -> tuple[torch.Tensor, list[int]]:
        self.flush()
        return torch.cat(self.features) if self.features else torch.zeros(0, self.k), list(self.indices)

    def merge(self, other: RademacherProjector) -> RademacherProjector:
        """Take over a disjoint shard's projected rows (same seed, so the same matrix)."""
        self.flush()
        features, indices = other.result()
        self.features.append(features)
        self.indices.extend(indices)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        features, indices = self.result()
        return {"features": features, "indices": torch.tensor(indices, dtype=torch.long)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> RademacherProjector:
        self._pending, self._pending_indices = [], []
        self.features, self.indices = [tensors["features"]], tensors["indices"].tolist()
        return self


class ExactStore(GradientConsumer):
    """Keeps every full gradient (float32): the ceiling for the sketch, affordable only for small N×d."""

    def __init__(self, dim: int, expected_rows: int, max_bytes: int):
        needed = dim * expected_rows * 4
        if needed > max_bytes:
            raise ValueError(
                f"method `exact` would hold {needed / 2**30:.1f} GiB of gradients ({expected_rows} × {dim}); "
                f"raise config key `cluster.exact_max_bytes` ({max_bytes / 2**30:.1f} GiB) or use `gradientspace`"
            )
        self.dim = dim
        self.rows: list[torch.Tensor] = []
        self.indices: list[int] = []

    def add(self, rows: torch.Tensor, indices: list[int]) -> None:
        self.rows.append(rows.float().cpu())
        self.indices.extend(indices)

    def result(self) -> tuple[torch.Tensor, list[int]]:
        return torch.cat(self.rows) if self.rows else torch.zeros(0, self.dim), list(self.indices)

    def merge(self, other: ExactStore) -> ExactStore:
        self.rows.extend(other.rows)
        self.indices.extend(other.indices)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        features, indices = self.result()
        return {"features": features, "indices": torch.tensor(indices, dtype=torch.long)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> ExactStore:
        self.rows, self.indices = [tensors["features"]], tensors["indices"].tolist()
        return self


def _unit_rows(features: torch.Tensor | np.ndarray) -> np.ndarray:
    array = features.double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, 1e-30)


MINIBATCH_ABOVE = 50_000  # Lloyd's k-means touches every row every iteration; above this, mini-batches
SILHOUETTE_SAMPLE = 10_000  # the silhouette is O(n²) in memory and time; it is estimated on this many rows


# scikit-learn (with scipy) is imported where it is used: it takes seconds to import, and only the stages that cluster need it


def _kmeans(k: int, n: int, seed: int, n_init: int, minibatch_above: int):
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if n > minibatch_above:
        return MiniBatchKMeans(n_clusters=k, n_init=n_init, random_state=seed, batch_size=4096)
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed)


def _fit(unit: np.ndarray, k: int, seed: int, n_init: int, minibatch_above: int) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning

    # scikit-learn warns when the rows hold fewer than K distinct points; the callers find the empty clusters and say so in one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _kmeans(k, len(unit), seed, n_init, minibatch_above).fit_predict(unit)


def spherical_kmeans(
    features, k: int, seed: int, n_init: int = 10, minibatch_above: int = MINIBATCH_ABOVE
) -> np.ndarray:
    return _fit(_unit_rows(features), k, seed, n_init, minibatch_above)


def choose_k(
    features,
    k_max: int,
    seed: int,
    n_init: int = 10,
    minibatch_above: int = MINIBATCH_ABOVE,
    silhouette_sample: int = SILHOUETTE_SAMPLE,
) -> tuple[int, dict[int, float]]:
    """K in 2..min(k_max, N − 1) with the best cosine silhouette (on a seeded sample of rows); returns (K, {K: silhouette}).

    The search stops at the first K that leaves a cluster empty: the rows hold fewer distinct
    points than that, and no larger K can do better.
    """
    from sklearn.metrics import silhouette_score

    unit = _unit_rows(features)
    sample = silhouette_sample if len(unit) > silhouette_sample else None
    scores = {}
    for k in range(2, min(k_max, len(unit) - 1) + 1):
        labels = _fit(unit, k, seed, n_init, minibatch_above)
        if len(set(labels)) < k:
            break
        scores[k] = float(silhouette_score(unit, labels, metric="cosine", sample_size=sample, random_state=seed))
    if not scores:
        raise ValueError(f"`k: auto` needs at least 3 samples that form 2 clusters, got {len(unit)} samples")
    return max(scores, key=scores.get), scores


def random_labels(n: int, k: int, seed: int) -> np.ndarray:
    """Balanced random assignment: a seeded permutation of round-robin labels."""
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def label_metrics(labels, sources) -> dict[str, float]:
    """NMI, ARI and purity of clusters against evaluation-only `source` labels."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    matrix = contingency_matrix(sources, labels)
    return {
        "nmi": float(normalized_mutual_info_score(sources, labels)),
        "ari": float(adjusted_rand_score(sources, labels)),
        "purity": float(matrix.max(axis=0).sum() / matrix.sum()),
    }


def within_cluster_cosine(coordinates: torch.Tensor, labels) -> float:
    """Mean pairwise cosine of gradients inside clusters, from sketch coordinates of unit gradients.

    For unit vectors g_i ≈ U c_i: Σ_{i≠j} cos = ‖Σ c_i‖² − Σ‖c_i‖², so no pair loop is needed.
    The value is a slight underestimate: the part of each gradient outside the top-r basis is left out.
    """
    coordinates = coordinates.double()
    labels = torch.as_tensor(np.asarray(labels))
    total, pairs = 0.0, 0
    for cluster in labels.unique():
        members = coordinates[labels == cluster]
        n = len(members)
        if n > 1:
            total += float(members.sum(0).square().sum() - members.square().sum())
            pairs += n * (n - 1)
    return total / pairs if pairs else float("nan")


def interference(coordinates: torch.Tensor, labels, energy: float = 0.9) -> dict[str, dict[str, float]]:
    """How much each cluster's gradients disagree with the rest of the data, from the sketch coordinates c_i = Uᵀg_i.

    Per cluster C, against the other samples O:
    - `mean_cosine`: cos(mean_{i∈C} c_i, mean_{j∈O} c_j). Near 1, one adapter's update serves both; near 0 or
      below, a step that helps C does nothing for (or undoes) the rest — the interference an expert removes.
    - `outside_energy`: the share of C's gradient energy Σ‖c_i‖² outside the span of O's leading directions (the
      fewest right singular vectors of O's coordinates that hold `energy` of O's energy). Near 0, C lives in
      directions the rest of the data already trains; near 1, in directions of its own.
    Energy outside the sketch's r directions is not seen, as for `within_cluster_cosine`.
    """
    coordinates = coordinates.double()
    labels = torch.as_tensor(np.asarray(labels))
    statistics = {}
    for cluster in labels.unique().tolist():
        members, others = coordinates[labels == cluster], coordinates[labels != cluster]
        if len(others) == 0:
            continue
        cosine = torch.nn.functional.cosine_similarity(members.mean(0), others.mean(0), dim=0)
        _, values, directions = torch.linalg.svd(others, full_matrices=False)
        share = values.square().cumsum(0) / values.square().sum()
        leading = directions[: int((share < energy).sum()) + 1]
        inside = (members @ leading.T).square().sum() / members.square().sum().clamp(min=1e-300)
        statistics[str(cluster)] = {
            "size": len(members),
            "mean_cosine": float(cosine),
            "outside_energy": float(1 - inside),
        }
    return statistics


def composition(labels, sources) -> dict[str, dict[str, int]]:
    """cluster → {source: count}, for reports."""
    table: dict[str, dict[str, int]] = {}
    for label, source in zip(labels, sources):
        row = table.setdefault(str(int(label)), {})
        row[source] = row.get(source, 0) + 1
    return table
