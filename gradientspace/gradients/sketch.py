"""Online truncated SVD of the d×N matrix of per-sample gradients (Brand's incremental update).

The sketch holds A ≈ U diag(S) Vᵀ with U d×k, S k, V N×k, k ≤ r' (the internal rank). New
columns C arrive in blocks; with P = UᵀC, the residual C − UP = QR (thin QR) and the small core

        K = [[diag(S), P],
             [   0   , R]]           (k+m)×(k+m)

the SVD K = Ũ S̃ Ṽᵀ gives the update U ← [U Q]Ũ, S ← S̃, V ← blockdiag(V, I)Ṽ, each truncated
to r'. Because V is rotated with U at every update, every seen sample's coordinates stay
consistent with the final basis and no second gradient pass is needed. Memory is O((d + N)·r').

Truncating at exactly the reported rank r rotates the lower components away (measured: singular
values off by 8–13 %), so the sketch keeps r' = 4r by default and reports the top r.

At d ≈ 2·10⁷ the basis dominates memory, so it is float32 by default and updated in place, row
chunk by row chunk: peak memory is U (d×r') + the pending rows and one d×m block (its Q is
written over it) + V (N×r'), never a second copy of U. Each update multiplies U by a small rotation, and float32
rounding slowly erodes UᵀU = I; every `reorthonormalize_every` updates the basis is made
orthonormal again (Cholesky QR: UᵀU = LLᵀ, U ← U L⁻ᵀ) and the factor folded into S and V, so
the represented matrix U diag(S) Vᵀ is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from gradientspace.gradients.consumers import GradientConsumer


@dataclass
class SketchResult:
    basis: torch.Tensor  # U, d×r
    singular_values: torch.Tensor  # S, r
    coordinates: torch.Tensor  # N×r, row i = Uᵀ g of the i-th sample in `indices`
    indices: torch.Tensor  # N dataset indices, in arrival order
    captured_energy: float  # ΣS² / Σ‖g‖²


# Rows of U rotated per step of an in-place update: bounds the temporary to ROW_CHUNK×r'.
ROW_CHUNK = 1 << 16


def _rotate_rows_(
    U: torch.Tensor, rotation: torch.Tensor, Q: torch.Tensor | None = None, Q_rotation: torch.Tensor | None = None
) -> torch.Tensor:
    """U @ rotation (+ Q @ Q_rotation), written over U's own storage when the result is no wider."""
    width = rotation.shape[1]
    out = U if width <= U.shape[1] else torch.empty(U.shape[0], width, dtype=U.dtype, device=U.device)
    for start in range(0, U.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        chunk = U[rows] @ rotation
        if Q is not None:
            chunk.addmm_(Q[rows], Q_rotation)
        out[rows, :width] = chunk
    return out[:, :width]


def tall_skinny_qr(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Q R with Q d×m' orthonormal, m' ≤ m: CholeskyQR2, rank-revealing. Q is written over A.

    Householder QR of a d×m block is memory-bound and ran at < 1 GFLOPS here (40× slower than
    the Gram product); the Gram route is two matrix products. Each pass factors AᵀA = W Λ Wᵀ
    (float64) and sets Q = A W Λ^{-1/2}; the second pass removes what the first lost to rounding.
    Directions below √eps of the largest (new samples already inside span U, duplicates) are
    dropped, where a QR would have returned arbitrary columns for them.
    """
    R = torch.eye(A.shape[1], dtype=torch.float64, device=A.device)
    Q = A
    for _ in range(2):
        if not Q.shape[1]:  # nothing left: every column was inside span U (or zero)
            break
        values, vectors = torch.linalg.eigh(gram(Q))
        keep = values > values[-1].clamp(min=0) * torch.finfo(A.dtype).eps
        values, vectors = values[keep], vectors[:, keep]
        Q = _rotate_rows_(Q, (vectors / values.sqrt()).to(A.dtype))  # over A's storage: A is a scratch residual
        R = (vectors.T * values.sqrt()[:, None]) @ R
    return Q, R.to(A.dtype)


def gram(U: torch.Tensor) -> torch.Tensor:
    """UᵀU accumulated in float64 by row chunks (a float32 product over 10⁷ rows would hide 1e-6 errors)."""
    total = torch.zeros(U.shape[1], U.shape[1], dtype=torch.float64, device=U.device)
    for start in range(0, U.shape[0], ROW_CHUNK):
        chunk = U[start : start + ROW_CHUNK].double()
        total += chunk.T @ chunk
    return total


class OnlineSVD(GradientConsumer):
    def __init__(
        self,
        dim: int,
        rank: int,
        internal_rank: int | None = None,
        block_size: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        reorthonormalize_every: int = 32,
    ):
        self.dim, self.rank = dim, rank
        self.reorthonormalize_every = reorthonormalize_every
        self.updates = 0
        self.internal_rank = internal_rank or 4 * rank
        if self.internal_rank < rank:
            raise ValueError(f"internal rank {self.internal_rank} must be at least the reported rank {rank}")
        self.block_size, self.dtype, self.device = block_size, dtype, torch.device(device)
        self.U = torch.zeros(dim, 0, dtype=dtype, device=self.device)
        self.S = torch.zeros(0, dtype=dtype, device=self.device)
        self.V = torch.zeros(0, 0, dtype=dtype, device=self.device)
        self.indices = torch.zeros(0, dtype=torch.long)
        self.total_energy = 0.0
        self._pending: list[torch.Tensor] = []
        self._pending_indices: list[int] = []

    @property
    def seen(self) -> int:
        return len(self.indices) + len(self._pending_indices)

    def add(self, rows: torch.Tensor, indices: list[int]) -> None:
        """Add per-sample gradients given as rows (b×d) with their dataset indices."""
        if rows.shape[1] != self.dim:
            raise ValueError(f"gradient dimension {rows.shape[1]} does not match the sketch's {self.dim}")
        self._pending.append(rows.to(self.device, self.dtype))
        self._pending_indices.extend(indices)
        if sum(len(p) for p in self._pending) >= self.block_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        # d×m, row-major (rows of U and of this block are read together), a fresh copy the update overwrites
        columns = torch.empty(self.dim, sum(len(p) for p in self._pending), dtype=self.dtype, device=self.device)
        start = 0
        for block in self._pending:
            columns[:, start : start + len(block)] = block.T
            start += len(block)
        indices = torch.tensor(self._pending_indices, dtype=torch.long)
        self._pending, self._pending_indices = [], []
        self.total_energy += float(columns.square().sum())
        self._update(columns, torch.eye(columns.shape[1], dtype=self.dtype, device=self.device), indices)

    def _update(self, columns: torch.Tensor, new_rows: torch.Tensor, indices: torch.Tensor) -> None:
        """Append samples whose gradients are `columns @ new_rowsᵀ` (d×n_new)."""
        k, m = self.S.shape[0], columns.shape[1]
        projection = self.U.T @ columns
        residual = columns.addmm_(self.U, projection, alpha=-1)  # in place: `columns` is this sketch's own copy
        correction = self.U.T @ residual  # second Gram-Schmidt pass: keeps Q orthogonal to U in finite precision
        residual.addmm_(self.U, correction, alpha=-1)
        projection += correction
        Q, R = tall_skinny_qr(residual)
        del residual, columns
        core = torch.zeros(k + Q.shape[1], k + m, dtype=self.dtype, device=self.device)
        core[:k, :k] = torch.diag(self.S)
        core[:k, k:] = projection
        core[k:, k:] = R
        # The core is tiny: its SVD in float64 costs nothing and keeps the rotation orthogonal to 1e-16.
        core_u, core_s, core_vh = (t.to(self.dtype) for t in torch.linalg.svd(core.double(), full_matrices=False))
        # Directions negligible next to the largest singular value are rounding, not data: dropped.
        negligible = core_s[0] * torch.finfo(self.dtype).eps ** 0.5 if len(core_s) else 0.0
        keep = min(self.internal_rank, int((core_s > negligible).sum()))
        self.U = _rotate_rows_(self.U, core_u[:k, :keep], Q, core_u[k:, :keep])  # = [U Q] @ core_u[:, :keep]
        self.S = core_s[:keep]
        core_v = core_vh.T[:, :keep]
        self.V = torch.cat([self.V @ core_v[:k], new_rows @ core_v[k:]])
        self.indices = torch.cat([self.indices, indices])
        self.updates += 1
        if self.reorthonormalize_every and self.updates % self.reorthonormalize_every == 0:
            self.reorthonormalize()

    def reorthonormalize(self) -> None:
        """Restore UᵀU = I without changing U diag(S) Vᵀ (Cholesky QR, then an r'×r' SVD)."""
        if not self.S.shape[0]:
            return
        lower = torch.linalg.cholesky(gram(self.U))  # UᵀU = LLᵀ: near I, so Cholesky is well conditioned
        inverse = torch.linalg.solve_triangular(
            lower, torch.eye(len(lower), dtype=lower.dtype, device=lower.device), upper=False
        )
        # U = (U L⁻ᵀ) Lᵀ, and Lᵀ diag(S) = u s vhᵀ, so U diag(S) Vᵀ = (U L⁻ᵀ u) diag(s) (V vh)ᵀ.
        u, s, vh = torch.linalg.svd(lower.T * self.S.double())
        # u ≈ I (L is near I and S is sorted): keep it so, or every pass could flip a component's sign.
        signs = torch.where(torch.diagonal(u) < 0, -1.0, 1.0).to(u.dtype)
        u, vh = u * signs, vh * signs[:, None]
        self.U = _rotate_rows_(self.U, (inverse.T @ u).to(self.dtype))
        self.S = s.to(self.dtype)
        self.V = self.V @ vh.T.to(self.dtype)

    def orthogonality_error(self) -> float:
        """‖UᵀU − I‖₂: how far rounding has pulled the basis from orthonormal."""
        self.flush()
        return float(
            torch.linalg.matrix_norm(
                gram(self.U) - torch.eye(self.U.shape[1], dtype=torch.float64, device=self.U.device), ord=2
            )
        )

    def merge(self, other: OnlineSVD) -> OnlineSVD:
        """Fold the sketch of a disjoint shard into this one (multi-process runs)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge sketches of dimension {self.dim} and {other.dim}")
        self.flush()
        other.flush()
        self.total_energy += other.total_energy
        if not other.S.numel():  # a shard that saw no samples (more ranks than batches)
            return self
        other_u = other.U.to(self.device, self.dtype)
        self._update(other_u * other.S.to(self.device, self.dtype), other.V.to(self.device, self.dtype), other.indices)
        return self

    def result(self) -> SketchResult:
        """The top-r factors: views into the live sketch (a d×r copy at d ≈ 2·10⁷ would cost GiBs)."""
        self.flush()
        if self.reorthonormalize_every:
            self.reorthonormalize()  # the drift since the last periodic pass, removed once more
        r = min(self.rank, self.S.shape[0])
        energy = float(self.S[:r].square().sum()) / self.total_energy if self.total_energy > 0 else 0.0
        return SketchResult(self.U[:, :r], self.S[:r], self.V[:, :r] * self.S[:r], self.indices.clone(), energy)

    def energy_curve(self) -> list[float]:
        """Captured energy by the top 1..r' components: shows whether r is big enough."""
        self.flush()
        if self.total_energy <= 0:
            return []
        return (self.S.square().cumsum(0) / self.total_energy).tolist()

    # -- persistence: checkpoints of an interrupted pass, and the final sketch.safetensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        pending = torch.cat(self._pending) if self._pending else torch.zeros(0, self.dim, dtype=self.dtype)
        return {
            "U": self.U,
            "S": self.S,
            "V": self.V,
            "indices": self.indices,
            "pending": pending,
            "pending_indices": torch.tensor(self._pending_indices, dtype=torch.long),
            "total_energy": torch.tensor(self.total_energy, dtype=torch.float64),
        }

    def metadata(self) -> dict[str, str]:
        return {"rank": str(self.rank), "internal_rank": str(self.internal_rank), "block_size": str(self.block_size)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> OnlineSVD:
        self.U, self.S, self.V = (tensors[n].to(self.device, self.dtype) for n in ("U", "S", "V"))
        self.indices = tensors["indices"].cpu()
        self.total_energy = float(tensors["total_energy"])
        self._pending = [tensors["pending"].to(self.device, self.dtype)] if len(tensors["pending"]) else []
        self._pending_indices = tensors["pending_indices"].tolist()
        return self

    @classmethod
    def from_file(cls, path: str | Path, device: torch.device | str = "cpu") -> OnlineSVD:
        """A sketch rebuilt from `save`'s file alone (its settings are in the file's metadata)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        tensors = load_file(str(path))
        sketch = cls(
            tensors["U"].shape[0],
            int(meta["rank"]),
            int(meta["internal_rank"]),
            int(meta["block_size"]),
            dtype=tensors["U"].dtype,
            device=device,
        )
        sketch.load_state_dict(tensors)
        return sketch
