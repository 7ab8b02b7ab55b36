import math

import numpy as np
import pytest
import torch

from gradientspace.clustering.kmeans import (
    ExactStore,
    RademacherProjector,
    choose_k,
    label_metrics,
    random_labels,
    spherical_kmeans,
    within_cluster_cosine,
)


def test_projector_equals_explicit_matrix_and_is_reproducible():
    projector = RademacherProjector(dim=1000, k=24, seed=5, block_rows=128, buffer_rows=7)
    matrix = torch.cat([projector.block(j, torch.device("cpu")) for j in range(math.ceil(1000 / 128))])
    assert matrix.shape == (1000, 24)
    assert set(matrix.mul(math.sqrt(24)).unique().tolist()) == {-1.0, 1.0}
    rows = torch.randn(20, 1000)
    for start in range(0, 20, 3):
        projector.add(rows[start : start + 3], list(range(start, min(start + 3, 20))))
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
    rows = (centres[truth] + 0.1 * torch.randn(60, 30, generator=generator)) * torch.rand(
        60, 1, generator=generator
    ).mul(10).add(0.1)
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
    rows = (centres[truth] + 0.3 * torch.randn(6000, 16, generator=generator)) * torch.rand(
        6000, 1, generator=generator
    ).add(0.5)
    labels = spherical_kmeans(rows, 4, seed=0, n_init=3, minibatch_above=1000)
    assert label_metrics(labels, truth)["nmi"] > 0.95
    k, scores = choose_k(rows, 6, seed=0, n_init=3, minibatch_above=1000, silhouette_sample=500)
    assert k == 4
    unit = rows / rows.norm(dim=1, keepdim=True)
    exact = silhouette_score(
        unit.numpy(), spherical_kmeans(rows, 4, seed=0, n_init=3, minibatch_above=1000), metric="cosine"
    )
    assert abs(scores[4] - exact) < 0.05


def blobs(n_per: int, centres: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(centres, 30, generator=generator)
    return directions.repeat_interleave(n_per, 0) + 0.05 * torch.randn(centres * n_per, 30, generator=generator)


def test_k_auto_searches_up_to_n_minus_one_and_stops_at_an_empty_cluster():
    k, scores = choose_k(blobs(1, 5), k_max=8, seed=0)  # 5 rows, a k_max of 8 the user never set
    assert list(scores) == [2, 3, 4]
    rows = blobs(1, 3).repeat_interleave(6, 0)  # 18 rows, 3 distinct points
    k, scores = choose_k(rows, k_max=8, seed=0)
    assert k == 3 and list(scores) == [2, 3]  # K = 4 would leave a cluster empty: the search ends there


@pytest.mark.parametrize(
    "centres, k_max, says",
    [
        (6, 4, "the best K, 4, is the largest searched, the limit set by `cluster.k_max` = 4: raise it"),
        (3, 8, None),
        (2, 8, "the best K is 2, the smallest searched"),
    ],
)
def test_k_auto_says_its_choice_and_warns_at_an_edge_of_the_range(centres, k_max, says, capsys):
    from gradientspace.clustering.stages import say_chosen_k

    rows = blobs(8, centres)
    k, scores = choose_k(rows, k_max=k_max, seed=0)
    say_chosen_k(k, scores, k_max, len(rows))
    out, err = capsys.readouterr()
    assert out.startswith(
        f"k auto: K = {k}, the best cosine silhouette over K = 2..{max(scores)} (2 {scores[2]:.3f}, 3 "
    )
    assert (says in err and err.count("\n") == 1) if says else err == ""


def test_fewer_distinct_points_than_k_is_an_error_naming_the_cause():
    from gradientspace.clustering.stages import assign
    from gradientspace.config import ConfigError, load_config

    rows = (
        torch.ones(12, 16) + torch.arange(12).remainder(2)[:, None] * torch.eye(16)[0]
    )  # 12 samples, 2 distinct directions
    config = load_config(None, {"cluster.method": "gradientspace", "cluster.k": 3})
    with pytest.raises(
        ConfigError,
        match=r"config key `cluster.k`: k-means left 1 of 3 clusters empty \(sizes \[.*\]\): the 12 samples' "
        r"gradientspace features form fewer than 3 distinct points; lower K",
    ):
        assign(rows, 12, config, seed=0)
    labels, k, _ = assign(rows, 12, load_config(None, {"cluster.k": 2}), seed=0)
    assert k == 2 and sorted(np.bincount(labels)) == [6, 6]


def test_k_auto_on_five_records_runs(tmp_path, capsys):
    """Five records once failed on `cluster.k_max`, a key the user never set: the search is 2..N − 1 = 4."""
    import json

    from conftest import make_records

    from gradientspace.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": r.messages[0]["content"], "output": r.response}) + "\n" for r in make_records(5)
        )
    )
    assert (
        main(
            [
                "cluster",
                "--model",
                "tiny-random",
                "--data",
                str(data),
                "--k",
                "auto",
                "--out",
                str(tmp_path / "run"),
                "--max-length",
                "96",
                "--set",
                "model.lora_rank=2",
                "--set",
                "sketch.rank=4",
                "--set",
                "warmup.fraction=0.25",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "k auto: K = " in out and "over K = 2..4 (2 " in out
    silhouette = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["cluster"]["silhouette"]
    assert list(silhouette) == ["2", "3", "4"]


def test_cluster_terms_are_class_based_tfidf_against_a_naive_count():
    """Each cluster's distinctive words: pooled counts per cluster, tf · log(1 + A / f), checked word by word."""
    import math
    import re
    from collections import Counter

    from gradientspace.clustering.terms import cluster_terms, record_text
    from gradientspace.data.records import Record

    topics = [
        ("integral derivative equation equation solve", "math"),
        ("function return loop variable python", "code"),
        ("poem rhyme verse stanza poem", "poetry"),
    ]
    records, labels = [], []
    for i in range(12):
        words, _ = topics[i % 3]
        records.append(
            Record(
                f"r{i}",
                [{"role": "user", "content": f"Please answer this: {words}"}],
                f"the answer is {words.split()[i % 5]} 42",
            )
        )
        labels.append(i % 3)
    terms = cluster_terms(records, labels, 3, top=3)

    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    counts = [
        Counter(
            w
            for r, l in zip(records, labels)
            if l == g
            for w in re.findall(r"[a-z]{2,}", record_text(r).lower())
            if w not in ENGLISH_STOP_WORDS
        )
        for g in range(3)
    ]
    total = sum(counts, Counter())
    mean_words = sum(sum(c.values()) for c in counts) / 3
    for g in range(3):
        weight = {w: counts[g][w] / sum(counts[g].values()) * math.log(1 + mean_words / total[w]) for w in counts[g]}
        expected = sorted(weight, key=lambda w: (-weight[w], w))[:3]
        assert terms[str(g)] == expected
        assert set(terms[str(g)]) <= set(topics[g][0].split())  # the shared words (`answer`, `please`) name no cluster
