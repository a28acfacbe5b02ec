"""Gradient projections φ: one base class, the seeded Rademacher projection and the identity.

:class:`AbstractProjector` is what stage 2, LESS and the diagnostics need from a projection
(after TRAK's ``AbstractProjector``); :func:`make_projector` is the one place that chooses
one: ``proj_dim = 0`` gives :class:`NoOpProjector` (φ = identity, the exact kernel), ``p > 0`` a
:class:`RademacherProjector` to p dimensions.

The Rademacher projection is φ(g) = Rᵀ g / √p with R ∈ {±1}^{D×p}. R is never held whole (for a
2.4M-parameter LoRA and p = 8192 it would be 20 G entries): it is cut into blocks of
``BLOCK_ROWS`` rows, and block i is generated on the CPU from a Philox counter-based
generator keyed by (seed, i). So R depends only on the seed and p — not on the device, the
batch size, the number of workers or the order in which blocks are visited — and the first
D rows are the same matrix for every gradient size D.

Signs are made from random bytes through a 256-entry table of bfloat16 bit patterns
(one byte -> eight ±1 values), which is ~7x faster here than converting unpacked bits.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

from ntkselect.grads.fused import flatten_grads, unflatten_grads

__all__ = ["AbstractProjector", "RademacherProjector", "NoOpProjector", "make_projector", "BLOCK_ROWS", "PAPER_PROJ_DIM"]

BLOCK_ROWS = 1024
PAPER_PROJ_DIM = 8192  # the paper's p

# byte -> its 8 bits as ±1 (bit set = -1), most significant bit first, in bfloat16 and in
# float32, viewed as uint64 rows so that numpy's take copies whole rows per random byte.
_BITS = [[-1.0 if (v >> (7 - k)) & 1 else 1.0 for k in range(8)] for v in range(256)]
_SIGNS = {
    torch.bfloat16: torch.tensor(_BITS, dtype=torch.bfloat16).view(torch.int16).numpy().view(np.uint64),
    torch.float32: np.array(_BITS, dtype=np.float32).view(np.uint64),
}


class AbstractProjector(ABC):
    """φ: R^D -> R^p, linear. ``dim`` is D, ``proj_dim`` is p; ``n_blocks`` is how many pieces
    one pass over φ visits (what :meth:`gram`'s ``tick`` counts; 0 when nothing is generated)."""

    dim: int
    proj_dim: int
    n_blocks: int = 0

    @abstractmethod
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, p) float32: φ of each row."""

    @abstractmethod
    def project_back(self, u: torch.Tensor, tick=None) -> torch.Tensor:
        """(p,) -> (D,) float32: φ*(u), the adjoint of :meth:`project`."""

    @abstractmethod
    def gram(self, vec: torch.Tensor, tick=None) -> torch.Tensor:
        """(D,) -> (D,): φ*(φ(vec)), so that ⟨gram(a), b⟩ = ⟨φ(a), φ(b)⟩ for every b."""

    @abstractmethod
    def describe(self) -> dict | None:
        """What the manifest records about φ (None: nothing is projected)."""

    def gram_params(self, vec: dict[str, torch.Tensor], tick=None) -> dict[str, torch.Tensor]:
        """:meth:`gram` of a vector given per parameter ({name: tensor}, in the dict's order)."""
        shapes = [(n, v.shape) for n, v in vec.items()]
        flat = flatten_grads({n: v.unsqueeze(0) for n, v in vec.items()}, [n for n, _ in shapes])[0]
        return unflatten_grads(self.gram(flat, tick), shapes)

    def chunk_rows(self, chunk_bytes: int) -> int:
        """How many (D,) float32 rows to gather before one :meth:`project` call (each call is
        one pass over the blocks, so a chunk shares it)."""
        return chunk_bytes // (4 * self.dim)


class NoOpProjector(AbstractProjector):
    """φ = identity (``proj_dim = 0`` on the command line: the exact, unprojected kernel).

    Every method returns its input itself, not a copy or a conversion, so the exact path
    computes exactly what it would without a projector."""

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        if dim <= 0:
            raise ValueError(f"dim must be positive (got {dim})")
        self.dim = self.proj_dim = int(dim)
        self.device = torch.device(device)
        self.n_blocks = 0

    def describe(self) -> None:
        return None  # the manifest's "projector" stays null for the exact kernel

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of size {self.dim}, got {grads.shape[-1]}")
        return grads

    def project_back(self, u: torch.Tensor, tick=None) -> torch.Tensor:
        return u

    def gram(self, vec: torch.Tensor, tick=None) -> torch.Tensor:
        return vec

    def gram_params(self, vec: dict[str, torch.Tensor], tick=None) -> dict[str, torch.Tensor]:
        return vec  # the same tensors: nothing is flattened, copied or converted

    def chunk_rows(self, chunk_bytes: int) -> int:
        return 1  # nothing to share between rows: no gathering buffer


def make_projector(dim: int, proj_dim: int = 0, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> AbstractProjector:
    """The projection to ``proj_dim`` dimensions: the identity for 0, else the seeded Rademacher one."""
    if proj_dim == 0:
        return NoOpProjector(dim, device)
    return RademacherProjector(dim, proj_dim, seed, device=device, dtype=dtype)


class RademacherProjector(AbstractProjector):
    """φ(g) = Rᵀ g / √p with a seed-only Rademacher R, generated block by block.

    ``dtype`` is the matmul precision for :meth:`project` (±1 is exact in bfloat16, so
    bfloat16 only rounds the gradients); accumulation over blocks is always float32.
    """

    def __init__(self, dim: int, proj_dim: int = PAPER_PROJ_DIM, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if dim <= 0 or proj_dim <= 0:
            raise ValueError(f"dim and proj_dim must be positive (got {dim}, {proj_dim})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative (got {seed})")
        self.dim, self.proj_dim, self.seed = int(dim), int(proj_dim), int(seed)
        self.device, self.dtype = torch.device(device), dtype
        self.n_blocks = math.ceil(self.dim / BLOCK_ROWS)

    def describe(self) -> dict:
        return {
            "kind": "rademacher",
            "dim": self.dim,
            "proj_dim": self.proj_dim,
            "seed": self.seed,
            "block_rows": BLOCK_ROWS,
            "generator": "numpy Philox key=(seed, block)",
            "scale": "1/sqrt(proj_dim)",
        }

    def block(self, i: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Rows [i·BLOCK_ROWS, (i+1)·BLOCK_ROWS) ∩ [0, D) of R as ±1 (bfloat16 or float32, the
        same signs either way), on the device."""
        rng = np.random.Generator(np.random.Philox(key=np.array([self.seed, i], dtype=np.uint64)))
        n_bytes = (BLOCK_ROWS * self.proj_dim + 7) // 8
        raw = np.frombuffer(rng.bytes(n_bytes), dtype=np.uint8)
        signs = np.take(_SIGNS[dtype], raw, axis=0)  # (n_bytes, k) uint64 rows = 8 values each
        rows = min(BLOCK_ROWS, self.dim - i * BLOCK_ROWS)
        R = torch.from_numpy(signs).view(dtype).reshape(-1)[: BLOCK_ROWS * self.proj_dim]
        return R.reshape(BLOCK_ROWS, self.proj_dim)[:rows].to(self.device)

    def _rows(self, i: int) -> slice:
        return slice(i * BLOCK_ROWS, min((i + 1) * BLOCK_ROWS, self.dim))

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, p) float32."""
        if grads.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of size {self.dim}, got {grads.shape[-1]}")
        G = grads.to(self.device)
        out = torch.zeros(G.shape[0], self.proj_dim, dtype=torch.float32, device=self.device)
        for i in range(self.n_blocks):
            R = self.block(i, torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32)
            out += (G[:, self._rows(i)].to(self.dtype) @ R).float()
        return out / math.sqrt(self.proj_dim)

    def project_back(self, u: torch.Tensor, tick=None) -> torch.Tensor:
        """(p,) -> (D,) float32: R u / √p, the adjoint of :meth:`project`."""
        u = u.to(self.device, torch.float32)
        out = torch.empty(self.dim, dtype=torch.float32, device=self.device)
        for i in range(self.n_blocks):
            out[self._rows(i)] = self.block(i, torch.float32) @ u
            if tick:
                tick()
        return out / math.sqrt(self.proj_dim)

    def gram(self, vec: torch.Tensor, tick=None) -> torch.Tensor:
        """(D,) -> (D,): φ*(φ(vec)) = R Rᵀ vec / p, so that ⟨gram(a), b⟩ = ⟨φ(a), φ(b)⟩ exactly
        (up to float rounding) for every b. Two passes over R, computed in float32;
        ``tick`` is called once per block visited (2 × n_blocks in all)."""
        vec = vec.to(self.device, torch.float32)
        u = torch.zeros(self.proj_dim, dtype=torch.float32, device=self.device)
        for i in range(self.n_blocks):
            u += vec[self._rows(i)] @ self.block(i, torch.float32)
            if tick:
                tick()
        return self.project_back(u / math.sqrt(self.proj_dim), tick)
