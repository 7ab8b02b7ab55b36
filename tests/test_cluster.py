import math

import numpy as np
import pytest
import torch

from gradientspace.cluster import ExactStore, RademacherProjector, choose_k, label_metrics, random_labels, spherical_kmeans, within_cluster_cosine


def test_projector_equals_explicit_matrix_and_is_reproducible():
    projector = RademacherProjector(dim=1000, k=24, seed=5, block_rows=128, buffer_rows=7)
    matrix = torch.cat([projector.block(j, torch.device("cpu")) for j in range(math.ceil(1000 / 128))])
    assert matrix.shape == (1000, 24)
    assert set(matrix.mul(math.sqrt(24)).unique().tolist()) == {-1.0, 1.0}
    rows = torch.randn(20, 1000)
    for start in range(0, 20, 3):
        projector.add(rows[start:start + 3], list(range(start, min(start + 3, 20))))
    features, indices = projector.result()
    assert indices == list(range(20))
    assert torch.allclose(features, rows @ matrix, atol=1e-4)
    again = RademacherProjector(dim=1000, k=24, seed=5, block_rows=128)
    assert torch.equal(again.project(rows), projector.project(rows))
    assert not torch.equal(RademacherProjector(1000, 24, seed=6, block_rows=128).project(rows), projector.project(rows))


def test_projection_preserves_norms_roughly():
    rows = torch.nn.functional.normalize(torch.randn(50, 4000), dim=1)
    projected = RademacherProjector(4000, 2048, seed=0).project(rows)
    assert (projected.norm(dim=1) - 1).abs().max() < 0.1


def test_spherical_kmeans_recovers_directions():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 30, generator=generator)
    truth = np.repeat(np.arange(3), 20)
    # scale varies per sample: spherical k-means must ignore it
    rows = (centres[truth] + 0.1 * torch.randn(60, 30, generator=generator)) * torch.rand(60, 1, generator=generator).mul(10).add(0.1)
    labels = spherical_kmeans(rows, 3, seed=0)
    assert label_metrics(labels, truth)["nmi"] > 0.99
    k, scores = choose_k(rows, 6, seed=0)
    assert k == 3 and set(scores) == {2, 3, 4, 5, 6}


def test_metrics_against_known_values():
    truth = ["a"] * 4 + ["b"] * 4
    assert label_metrics([0] * 4 + [1] * 4, truth) == {"nmi": 1.0, "ari": 1.0, "purity": 1.0}
    half = label_metrics([0, 0, 1, 1, 0, 0, 1, 1], truth)
    assert half["purity"] == 0.5 and half["nmi"] < 1e-9


def test_within_cluster_cosine_matches_pairwise_loop():
    coordinates = torch.nn.functional.normalize(torch.randn(12, 5, dtype=torch.float64), dim=1)
    labels = np.array([0, 1, 2] * 4)
    expected = []
    for i in range(12):
        for j in range(12):
            if i != j and labels[i] == labels[j]:
                expected.append(float(coordinates[i] @ coordinates[j]))
    assert within_cluster_cosine(coordinates, labels) == pytest.approx(np.mean(expected))


def test_random_labels_are_balanced_and_seeded():
    labels = random_labels(10, 3, seed=1)
    assert sorted(np.bincount(labels).tolist()) == [3, 3, 4]
    assert np.array_equal(labels, random_labels(10, 3, seed=1))


def test_exact_store_refuses_too_much_memory():
    with pytest.raises(ValueError, match="cluster.exact_max_bytes"):
        ExactStore(dim=10**6, expected_rows=10**4, max_bytes=10**9)


def test_minibatch_kmeans_and_sampled_silhouette_above_the_thresholds():
    """Past `minibatch_above` / `silhouette_sample` the cheap estimators still find the clusters and K."""
    from sklearn.metrics import silhouette_score

    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 16, generator=generator)
    truth = np.repeat(np.arange(4), 1500)
    rows = (centres[truth] + 0.3 * torch.randn(6000, 16, generator=generator)) * torch.rand(6000, 1, generator=generator).add(0.5)
    labels = spherical_kmeans(rows, 4, seed=0, n_init=3, minibatch_above=1000)
    assert label_metrics(labels, truth)["nmi"] > 0.95
    k, scores = choose_k(rows, 6, seed=0, n_init=3, minibatch_above=1000, silhouette_sample=500)
    assert k == 4
    unit = rows / rows.norm(dim=1, keepdim=True)
    exact = silhouette_score(unit.numpy(), spherical_kmeans(rows, 4, seed=0, n_init=3, minibatch_above=1000), metric="cosine")
    assert abs(scores[4] - exact) < 0.05
