"""The online SVD against torch.linalg.svd of the stacked matrix."""

import torch

from gradientspace.sketch import OnlineSVD


def stream(sketch, rows, batch):
    for start in range(0, len(rows), batch):
        sketch.add(rows[start:start + batch], list(range(start, min(start + batch, len(rows)))))
    return sketch.result()


def reference(rows, r):
    u, s, vh = torch.linalg.svd(rows.T.double(), full_matrices=False)
    return u[:, :r], s[:r], (vh[:r].T * s[:r])


def align_signs(coords, ref):
    signs = torch.sign((coords * ref).sum(0))
    return coords * signs


def low_rank(n, d, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, rank, generator=g, dtype=torch.float64) * torch.linspace(10, 1, rank, dtype=torch.float64)) @ torch.randn(rank, d, generator=g, dtype=torch.float64)


def test_exact_when_data_rank_fits():
    rows = low_rank(300, 500, 12, seed=0)
    result = stream(OnlineSVD(500, rank=12, internal_rank=16, block_size=32), rows, batch=7)
    _, s, coords = reference(rows, 12)
    assert torch.allclose(result.singular_values, s, rtol=1e-4)
    assert (align_signs(result.coordinates, coords) - coords).norm() / coords.norm() < 1e-4
    assert torch.equal(result.indices, torch.arange(300))
    assert abs(result.captured_energy - 1.0) < 1e-6


def test_basis_is_orthonormal_and_reconstructs():
    rows = low_rank(200, 400, 8, seed=1)
    result = stream(OnlineSVD(400, rank=8, block_size=16), rows, batch=5)
    eye = result.basis.T @ result.basis
    assert torch.allclose(eye, torch.eye(8, dtype=eye.dtype), atol=1e-8)
    assert torch.allclose(result.coordinates @ result.basis.T, rows, atol=1e-6 * rows.abs().max())


def test_low_rank_plus_noise_small_subspace_angle():
    clean = low_rank(400, 600, 16, seed=2)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows = clean / clean.norm(dim=1, keepdim=True) + 0.02 * noise / noise.norm(dim=1, keepdim=True)
    result = stream(OnlineSVD(600, rank=16, internal_rank=64, block_size=64), rows.float(), batch=8)
    u, s, _ = reference(rows, 16)
    cosines = torch.linalg.svdvals(result.basis.T @ u)
    largest_angle = torch.arccos(cosines.min().clamp(max=1.0))
    assert largest_angle < 0.05, largest_angle
    assert ((result.singular_values - s).abs() / s).max() < 0.01


def test_internal_rank_beats_strict_truncation():
    """Why r' = 4r: truncating at r itself distorts the lower singular values on noisy data."""
    clean = low_rank(400, 300, 40, seed=4)
    rows = clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, s, _ = reference(rows, 16)
    strict = stream(OnlineSVD(300, rank=16, internal_rank=16, block_size=16), rows, batch=16)
    roomy = stream(OnlineSVD(300, rank=16, internal_rank=64, block_size=16), rows, batch=16)
    strict_error = ((strict.singular_values - s).abs() / s).max()
    roomy_error = ((roomy.singular_values - s).abs() / s).max()
    assert roomy_error < strict_error / 2


def test_merge_of_two_shards_matches_whole():
    rows = low_rank(240, 300, 10, seed=6)
    whole = stream(OnlineSVD(300, rank=10, internal_rank=20, block_size=16), rows, batch=6)
    first = OnlineSVD(300, rank=10, internal_rank=20, block_size=16)
    second = OnlineSVD(300, rank=10, internal_rank=20, block_size=16)
    first.add(rows[:130], list(range(130)))
    second.add(rows[130:], list(range(130, 240)))
    merged = first.merge(second).result()
    assert torch.equal(merged.indices, torch.arange(240))
    assert torch.allclose(merged.singular_values, whole.singular_values, rtol=1e-6)
    assert (align_signs(merged.coordinates, whole.coordinates) - whole.coordinates).norm() / whole.coordinates.norm() < 1e-6
    assert abs(merged.captured_energy - whole.captured_energy) < 1e-9


def test_save_and_load_round_trip(tmp_path):
    rows = low_rank(50, 80, 4, seed=7)
    sketch = OnlineSVD(80, rank=4, block_size=16)
    sketch.add(rows[:40], list(range(40)))  # leaves 8 rows pending
    sketch.save(tmp_path / "s.safetensors")
    restored = OnlineSVD.load(tmp_path / "s.safetensors")
    restored.add(rows[40:], list(range(40, 50)))
    sketch.add(rows[40:], list(range(40, 50)))
    a, b = sketch.result(), restored.result()
    assert torch.equal(a.coordinates, b.coordinates) and torch.equal(a.indices, b.indices)
