"""The online SVD against torch.linalg.svd of the stacked matrix.

The algebra is checked in float64 (exact up to 1e-6); the float32 default has its own tests.
"""

import torch

from gradientspace.gradients.sketch import OnlineSVD


def stream(sketch, rows, batch):
    for start in range(0, len(rows), batch):
        sketch.add(rows[start : start + batch], list(range(start, min(start + batch, len(rows)))))
    return sketch.result()


def reference(rows, r):
    u, s, vh = torch.linalg.svd(rows.T.double(), full_matrices=False)
    return u[:, :r], s[:r], (vh[:r].T * s[:r])


def align_signs(coords, ref):
    signs = torch.sign((coords * ref).sum(0))
    return coords * signs


def low_rank(n, d, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, rank, generator=g, dtype=torch.float64) * torch.linspace(10, 1, rank, dtype=torch.float64)
    ) @ torch.randn(rank, d, generator=g, dtype=torch.float64)


def test_exact_when_data_rank_fits():
    rows = low_rank(300, 500, 12, seed=0)
    result = stream(OnlineSVD(500, rank=12, internal_rank=16, block_size=32, dtype=torch.float64), rows, batch=7)
    _, s, coords = reference(rows, 12)
    assert torch.allclose(result.singular_values, s, rtol=1e-4)
    assert (align_signs(result.coordinates, coords) - coords).norm() / coords.norm() < 1e-4
    assert torch.equal(result.indices, torch.arange(300))
    assert abs(result.captured_energy - 1.0) < 1e-6


def test_basis_is_orthonormal_and_reconstructs():
    rows = low_rank(200, 400, 8, seed=1)
    result = stream(OnlineSVD(400, rank=8, block_size=16, dtype=torch.float64), rows, batch=5)
    eye = result.basis.T @ result.basis
    assert torch.allclose(eye, torch.eye(8, dtype=eye.dtype), atol=1e-8)
    assert torch.allclose(result.coordinates @ result.basis.T, rows, atol=1e-6 * rows.abs().max())


def test_low_rank_plus_noise_small_subspace_angle():
    clean = low_rank(400, 600, 16, seed=2)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows = clean / clean.norm(dim=1, keepdim=True) + 0.02 * noise / noise.norm(dim=1, keepdim=True)
    result = stream(OnlineSVD(600, rank=16, internal_rank=64, block_size=64), rows.float(), batch=8)
    u, s, _ = reference(rows, 16)
    cosines = torch.linalg.svdvals(result.basis.double().T @ u)
    largest_angle = torch.arccos(cosines.min().clamp(max=1.0))
    assert largest_angle < 0.05, largest_angle
    assert ((result.singular_values.double() - s).abs() / s).max() < 0.01


def test_internal_rank_beats_strict_truncation():
    """Why r' = 4r: truncating at r itself distorts the lower singular values on noisy data."""
    clean = low_rank(400, 300, 40, seed=4)
    rows = clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, s, _ = reference(rows, 16)
    strict = stream(OnlineSVD(300, rank=16, internal_rank=16, block_size=16, dtype=torch.float64), rows, batch=16)
    roomy = stream(OnlineSVD(300, rank=16, internal_rank=64, block_size=16, dtype=torch.float64), rows, batch=16)
    strict_error = ((strict.singular_values - s).abs() / s).max()
    roomy_error = ((roomy.singular_values - s).abs() / s).max()
    assert roomy_error < strict_error / 2


def test_merge_of_two_shards_matches_whole():
    rows = low_rank(240, 300, 10, seed=6)
    whole = stream(OnlineSVD(300, rank=10, internal_rank=20, block_size=16, dtype=torch.float64), rows, batch=6)
    first = OnlineSVD(300, rank=10, internal_rank=20, block_size=16, dtype=torch.float64)
    second = OnlineSVD(300, rank=10, internal_rank=20, block_size=16, dtype=torch.float64)
    first.add(rows[:130], list(range(130)))
    second.add(rows[130:], list(range(130, 240)))
    merged = first.merge(second).result()
    assert torch.equal(merged.indices, torch.arange(240))
    assert torch.allclose(merged.singular_values, whole.singular_values, rtol=1e-6)
    assert (
        align_signs(merged.coordinates, whole.coordinates) - whole.coordinates
    ).norm() / whole.coordinates.norm() < 1e-6
    assert abs(merged.captured_energy - whole.captured_energy) < 1e-9


def test_save_and_load_round_trip(tmp_path):
    rows = low_rank(50, 80, 4, seed=7)
    sketch = OnlineSVD(80, rank=4, block_size=16, dtype=torch.float64)
    sketch.add(rows[:40], list(range(40)))  # leaves 8 rows pending
    sketch.save(tmp_path / "s.safetensors")
    restored = OnlineSVD.from_file(tmp_path / "s.safetensors")
    restored.add(rows[40:], list(range(40, 50)))
    sketch.add(rows[40:], list(range(40, 50)))
    a, b = sketch.result(), restored.result()
    assert torch.equal(a.coordinates, b.coordinates) and torch.equal(a.indices, b.indices)


def subspace_angle(a, b):
    """Largest principal angle between the column spans of two orthonormal bases."""
    return torch.arccos(torch.linalg.svdvals(a.double().T @ b.double()).min().clamp(max=1.0)).item()


def test_float32_long_stream_stays_orthonormal_and_exact():
    """N = 20 000 float32 updates: re-orthonormalisation keeps UᵀU = I, and S matches the exact SVD."""
    n, d, true_rank = 20_000, 160, 48
    g = torch.Generator().manual_seed(11)
    spectrum = torch.logspace(0, -2, true_rank, dtype=torch.float64)
    rows = (torch.randn(n, true_rank, generator=g, dtype=torch.float64) * spectrum) @ torch.linalg.qr(
        torch.randn(d, true_rank, generator=g, dtype=torch.float64)
    )[0].T
    sketch = OnlineSVD(d, rank=16, internal_rank=64, block_size=64)
    assert sketch.dtype == torch.float32 and sketch.reorthonormalize_every > 0
    result = stream(sketch, rows.float(), batch=64)
    assert sketch.updates >= 300
    assert sketch.orthogonality_error() < 1e-5
    _, s, _ = reference(rows, 16)
    assert ((result.singular_values.double() - s).abs() / s).max() < 1e-3
    assert torch.equal(result.indices, torch.arange(n))


def test_reorthonormalisation_keeps_the_represented_matrix():
    rows = low_rank(120, 90, 30, seed=12)
    sketch = OnlineSVD(90, rank=8, internal_rank=32, block_size=16, dtype=torch.float64, reorthonormalize_every=0)
    stream(sketch, rows, batch=16)
    sketch.U = sketch.U + 1e-3 * torch.randn(
        sketch.U.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64
    )
    before = (sketch.U * sketch.S) @ sketch.V.T
    assert sketch.orthogonality_error() > 1e-3
    sketch.reorthonormalize()
    assert sketch.orthogonality_error() < 1e-12
    assert torch.allclose((sketch.U * sketch.S) @ sketch.V.T, before, atol=1e-10)


def shard_sketch(rows, start, stop, **kwargs):
    sketch = OnlineSVD(rows.shape[1], **kwargs)
    for b in range(start, stop, 16):
        sketch.add(rows[b : min(b + 16, stop)], list(range(b, min(b + 16, stop))))
    return sketch


def noisy_spectrum(n, d, seed):
    """Full-rank data: 8 strong directions over a decaying tail, so every shard's rank is far above r' and merges truncate."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    spectrum = torch.cat([torch.linspace(3, 1.5, 8), 0.3 * torch.logspace(0, -1, d - 8)])
    return (torch.randn(n, d, generator=g) * spectrum) @ basis.T


def test_merging_truncated_shards_matches_the_whole():
    rows = noisy_spectrum(900, 200, seed=14)
    kwargs = dict(rank=8, internal_rank=32, block_size=16)
    whole = shard_sketch(rows, 0, 900, **kwargs).result()
    shards = [shard_sketch(rows, a, b, **kwargs) for a, b in ((0, 300), (300, 600), (600, 900))]
    merged = shards[0].merge(shards[1]).merge(shards[2]).result()
    u, s, _ = reference(rows, 8)
    assert torch.equal(merged.indices, torch.arange(900))
    # The top components are nearly as well placed as the whole stream's, measured against the exact SVD.
    assert subspace_angle(merged.basis, whole.basis) < 0.01  # measured: 8e-4 rad
    assert subspace_angle(merged.basis, u) < 0.01
    exact_energy = float(s.square().sum() / rows.double().square().sum())
    assert abs(merged.captured_energy - whole.captured_energy) < 1e-4
    assert merged.captured_energy > 0.999 * exact_energy


def _tree_merge_worker(rank, size, port, path, rows, bounds, kwargs):
    import os

    from gradientspace import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    local = shard_sketch(rows, *bounds[rank], **kwargs)
    restore = lambda tensors: OnlineSVD(rows.shape[1], **kwargs).load_state_dict(tensors)
    merged = distributed.tree_merge(local, OnlineSVD.state_dict, restore)
    if rank == 0:
        merged.save(path)
    else:
        assert merged is None
    torch.distributed.destroy_process_group()


def test_tree_merge_across_three_gloo_ranks_equals_sequential_merge(tmp_path):
    import socket

    import torch.multiprocessing as mp

    rows = noisy_spectrum(300, 120, seed=15)
    bounds = [(0, 100), (100, 200), (200, 300)]
    kwargs = dict(rank=8, internal_rank=24, block_size=16)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_tree_merge_worker, args=(3, port, str(tmp_path / "tree.safetensors"), rows, bounds, kwargs), nprocs=3)
    tree = OnlineSVD.from_file(tmp_path / "tree.safetensors").result()
    shards = [shard_sketch(rows, a, b, **kwargs) for a, b in bounds]
    sequential = shards[0].merge(shards[1]).merge(shards[2]).result()  # the tree's order for three ranks: (0 ← 1) ← 2
    assert torch.equal(tree.indices, sequential.indices)
    assert torch.allclose(tree.singular_values, sequential.singular_values, rtol=1e-5)
    assert torch.allclose(tree.coordinates @ tree.basis.T, sequential.coordinates @ sequential.basis.T, atol=1e-4)


def test_zero_gradients_and_an_empty_shard():
    """Samples without loss tokens have zero gradients; a rank may get no batches at all."""
    rows = low_rank(12, 50, 3, seed=16)
    rows[:4] = 0
    rows[8:] = 0
    sketch = OnlineSVD(50, rank=3, internal_rank=8, block_size=4)
    result = stream(sketch, rows, batch=4)
    assert torch.equal(result.indices, torch.arange(12))
    assert result.coordinates[:4].abs().max() == 0 and result.coordinates[8:].abs().max() == 0
    assert torch.allclose(result.coordinates @ result.basis.T, rows.float(), atol=1e-5)
    merged = sketch.merge(OnlineSVD(50, rank=3, internal_rank=8, block_size=4)).result()
    assert torch.allclose(merged.coordinates, result.coordinates, atol=1e-5)
