"""Gradient projections φ: one base class, the seeded Rademacher projection and the identity.

:class:`AbstractProjector` is what stage 2, LESS and the diagnostics need from a projection
(after TRAK's ``AbstractProjector``); :func:`make_projector` is the one place that chooses
one: ``proj_dim = 0`` gives :class:`NoOpProjector` (φ = identity, the exact kernel), ``p > 0`` a
:class:`RademacherProjector` to p dimensions.

The Rademacher projection is φ(g) = Rᵀ g / √p with R ∈ {±1}^{D×p}. R is never held whole (for a
2.4M-parameter LoRA and p = 8192 it would be 20 G entries): it is cut into blocks of
``BLOCK_ROWS`` rows, and block i is the byte stream of the counter-based generator
Philox4x64-10 keyed by (seed, i) (counters 1, 2, ...: numpy's ``Philox(key=[seed, i]).bytes``),
one sign per bit, most significant bit first. So R depends only on the seed and p — not on the
device, the batch size, the number of workers, the order in which blocks are visited or how
many are generated together — and the first D rows are the same matrix for every gradient size D.

Blocks are generated where they are used. On the CPU numpy's C Philox makes the bytes; on
any other device :func:`philox4x64` computes the same stream with torch int64 tensor ops
(64-bit products from 32-bit halves; int64 multiplication and addition wrap modulo 2^64 on
the CPU and on CUDA, which the tests check against numpy and, with ``-m gpu``, CUDA against
the CPU), a group of blocks per call so that each pass costs a few hundred kernel launches per
``_DEVICE_GROUP_BYTES`` of signs, not per block. Bytes become signs through a 256-entry table of
bit patterns (one byte -> eight ±1 values), ~7x faster on a CPU than unpacking bits.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

from ntkselect.grads.fused import flatten_grads, unflatten_grads

__all__ = [
    "AbstractProjector",
    "RademacherProjector",
    "NoOpProjector",
    "make_projector",
    "philox4x64",
    "chunk_bytes_for",
    "pass_bytes",
    "cache_bytes_per_block",
    "BLOCK_ROWS",
    "PAPER_PROJ_DIM",
]

BLOCK_ROWS = 1024
PAPER_PROJ_DIM = 8192  # the paper's p
#: on a device other than the CPU, how many bytes of signs one generation call makes at most
#: (whole blocks, at least one): enough to amortise the generator's ~500 small kernels
_DEVICE_GROUP_BYTES = 1 << 30

# Philox4x64-10 (Salmon et al. 2011, Random123; numpy.random.Philox): multipliers, key bumps
_PHILOX_M = (0xD2E7470EE14C6C93, 0xCA5A826395121157)
_PHILOX_W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)
_PHILOX_ROUNDS = 10
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1

# byte -> its 8 bits as ±1 (bit set = -1), most significant bit first, in bfloat16 and in
# float32, viewed as uint64 rows so that numpy's take copies whole rows per random byte.
_BITS = [[-1.0 if (v >> (7 - k)) & 1 else 1.0 for k in range(8)] for v in range(256)]
_SIGNS = {
    torch.bfloat16: torch.tensor(_BITS, dtype=torch.bfloat16).view(torch.int16).numpy().view(np.uint64),
    torch.float32: np.array(_BITS, dtype=np.float32).view(np.uint64),
}


def _i64(x: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 64-bit halves of the 128-bit product a·b; ``a`` a constant, ``b`` int64 holding
    unsigned 64-bit values. The four 32x32-bit partial products wrap modulo 2^64 in int64, which
    keeps their exact bits; only masked halves are added, so the carries are exact."""
    a_lo, a_hi = a & _M32, a >> 32
    b_lo, b_hi = b & _M32, (b >> 32) & _M32
    ll, lh, hl, hh = b_lo * a_lo, b_hi * a_lo, b_lo * _i64(a_hi), b_hi * _i64(a_hi)
    mid = ((ll >> 32) & _M32) + (lh & _M32) + (hl & _M32)  # < 3·2^32: no wrap
    hi = hh + ((lh >> 32) & _M32) + ((hl >> 32) & _M32) + (mid >> 32)
    return hi, b * _i64(a)


def philox4x64(counter: torch.Tensor, key0: int, key1: torch.Tensor | int) -> torch.Tensor:
    """Philox4x64-10 of the counters (counter, 0, 0, 0) under the key (key0, key1): (..., 4)
    int64 words holding the unsigned outputs, the same bits on every device. ``counter`` int64,
    ``key1`` an int or an int64 tensor broadcastable with it."""
    c0 = counter.to(torch.int64)
    z = torch.zeros_like(c0)
    c1, c2, c3 = z, z, z
    k0 = key0 & _M64
    k1 = key1 if isinstance(key1, torch.Tensor) else torch.tensor(_i64(key1), device=c0.device)
    for r in range(_PHILOX_ROUNDS):
        if r:  # the key bump between rounds
            k0 = (k0 + _PHILOX_W[0]) & _M64
            k1 = k1 + _i64(_PHILOX_W[1])
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ _i64(k0), lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), -1)


def _numpy_bytes(seed: int, first: int, count: int, proj_dim: int) -> torch.Tensor:
    """The generator's bytes of blocks first .. first + count - 1, (count, BLOCK_ROWS · p / 8) uint8
    on the CPU: numpy's C Philox."""
    n_bytes = BLOCK_ROWS * proj_dim // 8  # per block; BLOCK_ROWS is a multiple of 8
    raw = np.empty((count, n_bytes), dtype=np.uint8)
    for k, i in enumerate(range(first, first + count)):
        rng = np.random.Generator(np.random.Philox(key=np.array([seed, i], dtype=np.uint64)))
        raw[k] = np.frombuffer(rng.bytes(n_bytes), dtype=np.uint8)
    return torch.from_numpy(raw)


def _torch_bytes(seed: int, first: int, count: int, proj_dim: int, device: torch.device) -> torch.Tensor:
    """The same bytes as :func:`_numpy_bytes`, computed on ``device`` with torch ops (:func:`philox4x64`)."""
    n_bytes = BLOCK_ROWS * proj_dim // 8
    counter = torch.arange(1, n_bytes // 32 + 1, dtype=torch.int64, device=device)  # (n_calls,): 32 bytes per counter
    key1 = torch.arange(first, first + count, dtype=torch.int64, device=device).unsqueeze(1)  # (count, 1)
    words = philox4x64(counter, seed, key1)  # (count, n_calls, 4) int64; little-endian bytes = numpy's byte stream
    return words.view(torch.uint8).reshape(count, n_bytes)


def _signs(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(count, n_bytes) uint8 -> (count · n_bytes · 8,) ±1 of ``dtype`` on raw's device: one sign per bit."""
    if raw.device.type == "cpu":
        return torch.from_numpy(np.take(_SIGNS[dtype], raw.numpy().reshape(-1), axis=0)).view(dtype).reshape(-1)  # uint64 rows = 8 values each
    table = torch.from_numpy(_SIGNS[dtype].view(np.int64)).to(raw.device)  # (256, k) int64 rows = 8 values each
    return table[raw.reshape(-1).int()].view(dtype).reshape(-1)


def _numpy_signs(seed: int, first: int, count: int, proj_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Blocks first .. first + count - 1 as (count · BLOCK_ROWS · p,) ±1 on the CPU: numpy's C Philox."""
    return _signs(_numpy_bytes(seed, first, count, proj_dim), dtype).to(device)


def _torch_signs(seed: int, first: int, count: int, proj_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The same as :func:`_numpy_signs`, computed on ``device`` with torch ops (:func:`philox4x64`)."""
    return _signs(_torch_bytes(seed, first, count, proj_dim, device), dtype)


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


def chunk_bytes_for(device: str | torch.device, default: int) -> int:
    """Bytes of per-example gradients to gather before one pass over R on ``device``: ``default``
    on the CPU; on CUDA at least a quarter of the memory free now, so that a pass (whose cost
    does not depend on the number of rows) serves hundreds of rows of an 8B model's LoRA
    gradients, not the ~25 that ``default`` holds at D ≈ 21M."""
    device = torch.device(device)
    if device.type != "cuda":
        return default
    free, _ = torch.cuda.mem_get_info(device)
    return max(default, free // 4)


#: device bytes that generating a group of signs holds per byte of signs, beyond the signs themselves:
#: the int32 byte indices (a quarter of bfloat16 signs) and the Philox words with their rounds'
#: int64 temporaries (about 6 words per 16 bytes of bfloat16 signs); estimated from _torch_signs' tensors
GENERATION_OVERHEAD = 0.625


def cache_bytes_per_block(proj_dim: int) -> int:
    """Bytes a projector's cache keeps per block: the generator's bytes, one bit per sign."""
    return BLOCK_ROWS * proj_dim // 8


def group_blocks(n_blocks: int, proj_dim: int, dtype: torch.dtype, device: str | torch.device) -> int:
    """How many blocks one generation makes at a time: one on the CPU (numpy makes them one by one),
    on CUDA as many as fit in ``_DEVICE_GROUP_BYTES`` of signs."""
    if torch.device(device).type == "cpu":
        return 1
    per_block = BLOCK_ROWS * proj_dim * torch.finfo(dtype).bits // 8
    return max(1, min(n_blocks, _DEVICE_GROUP_BYTES // per_block))


def pass_bytes(dim: int, proj_dim: int, device: str | torch.device, dtype: torch.dtype, rows: int, chunk_bytes: int) -> int:
    """Bytes one pass over R holds at most on ``device``, besides the model: the per-example gradients
    gathered for it (``rows`` of them, at most :func:`chunk_bytes_for` ``(device, chunk_bytes)``, float32)
    and the signs being made (:func:`group_blocks` blocks, with their generation's temporaries on CUDA;
    one block and its bytes on the CPU). The dry run's plan counts projections with this, from the
    same sizes the passes use, so the two cannot drift apart."""
    per_row = 4 * dim
    gather = per_row * max(1, min(rows, chunk_bytes_for(device, chunk_bytes) // per_row))
    if not proj_dim:
        return gather
    itemsize = torch.finfo(dtype).bits // 8
    per_block = BLOCK_ROWS * proj_dim * itemsize
    if torch.device(device).type == "cpu":
        return gather + per_block + BLOCK_ROWS * proj_dim // 8  # the block and numpy's bytes of it
    g = group_blocks(math.ceil(dim / BLOCK_ROWS), proj_dim, dtype, device)
    return gather + int(g * per_block * (1 + GENERATION_OVERHEAD))


def make_projector(
    dim: int, proj_dim: int = 0, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, cache_bytes: int = 0
) -> AbstractProjector:
    """The projection to ``proj_dim`` dimensions: the identity for 0, else the seeded Rademacher one
    (keeping up to ``cache_bytes`` of its generator's bytes for later passes)."""
    if proj_dim == 0:
        return NoOpProjector(dim, device)
    return RademacherProjector(dim, proj_dim, seed, device=device, dtype=dtype, cache_bytes=cache_bytes)


class RademacherProjector(AbstractProjector):
    """φ(g) = Rᵀ g / √p with a seed-only Rademacher R, generated block by block.

    ``dtype`` is the matmul precision for :meth:`project` (±1 is exact in bfloat16, so
    bfloat16 only rounds the gradients); accumulation over blocks is always float32.
    """

    def __init__(
        self,
        dim: int,
        proj_dim: int = PAPER_PROJ_DIM,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_bytes: int = 0,
    ):
        if dim <= 0 or proj_dim <= 0:
            raise ValueError(f"dim and proj_dim must be positive (got {dim}, {proj_dim})")
        if not 0 <= seed <= _M64:
            raise ValueError(f"seed must be in [0, 2^64) (got {seed})")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0 (got {cache_bytes})")
        self.dim, self.proj_dim, self.seed = int(dim), int(proj_dim), int(seed)
        self.device, self.dtype = torch.device(device), dtype
        self.n_blocks = math.ceil(self.dim / BLOCK_ROWS)
        # the generator's bytes of the first blocks, kept after their first pass (one bit per sign:
        # 1/16 of the bfloat16 signs), so that later passes only expand them. On a GPU, Philox in
        # eager torch is what a pass costs (RESULTS.md, issue 21); expanding is a gather.
        self.cached_blocks = min(self.n_blocks, int(cache_bytes) // cache_bytes_per_block(self.proj_dim))
        self._cache: torch.Tensor | None = None  # (cached_blocks, BLOCK_ROWS · p / 8) uint8, made at first use
        self._have = 0  # blocks 0 .. _have - 1 of the cache are filled (a pass visits them in order)

    def describe(self) -> dict:
        return {
            "kind": "rademacher",
            "dim": self.dim,
            "proj_dim": self.proj_dim,
            "seed": self.seed,
            "block_rows": BLOCK_ROWS,
            "generator": "Philox4x64-10 key=(seed, block), counters from 1 (numpy Philox bytes), one sign per bit, MSB first; same on every device",
            "scale": "1/sqrt(proj_dim)",
            "cached_blocks": self.cached_blocks,
        }

    def block(self, i: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Rows [i·BLOCK_ROWS, (i+1)·BLOCK_ROWS) ∩ [0, D) of R as ±1 (bfloat16 or float32, the
        same signs either way), on the device."""
        return self.blocks(i, 1, dtype)

    def group(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """How many blocks one :meth:`blocks` call makes at a time on this projector's device
        (one on the CPU, where numpy makes them one by one anyway)."""
        return group_blocks(self.n_blocks, self.proj_dim, dtype, self.device)

    def blocks(self, first: int, count: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Rows of blocks first .. first + count - 1 of R, ∩ [0, D), as one (rows, p) ±1 tensor
        on the device: exactly the blocks of :meth:`block`, stacked."""
        if dtype not in _SIGNS:
            raise ValueError(f"projection blocks are bfloat16 or float32 (got {dtype})")
        rows = min(count * BLOCK_ROWS, self.dim - first * BLOCK_ROWS)
        return _signs(self._bytes(first, count), dtype).to(self.device).reshape(count * BLOCK_ROWS, self.proj_dim)[:rows]

    def _generate(self, first: int, count: int) -> torch.Tensor:
        if self.device.type == "cpu":
            return _numpy_bytes(self.seed, first, count, self.proj_dim)
        return _torch_bytes(self.seed, first, count, self.proj_dim, self.device)

    def _bytes(self, first: int, count: int) -> torch.Tensor:
        """(count, BLOCK_ROWS · p / 8) uint8: the generator's bytes of the blocks, from the cache
        where it has them (filling it on the way), generated otherwise."""
        end, nc = first + count, self.cached_blocks
        if first >= nc:
            return self._generate(first, count)
        if self._cache is None:
            self._cache = torch.empty(nc, cache_bytes_per_block(self.proj_dim), dtype=torch.uint8, device=self.device)
        top = min(end, nc)
        if self._have < top:  # fill from where it stops up to here (a gap too, so the cache stays a prefix)
            self._cache[self._have : top] = self._generate(self._have, top - self._have)
            self._have = top
        head = self._cache[first:top]
        if top == end:
            return head
        return torch.cat([head, self._generate(top, end - top)])

    def _groups(self, dtype: torch.dtype):
        """(rows slice, blocks) for one pass over R, :meth:`group` blocks at a time."""
        g = self.group(dtype)
        for first in range(0, self.n_blocks, g):
            count = min(g, self.n_blocks - first)
            yield slice(first * BLOCK_ROWS, min((first + count) * BLOCK_ROWS, self.dim)), count, self.blocks(first, count, dtype)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, p) float32: one pass over R for the whole (B, D) chunk, each block
        generated once."""
        if grads.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of size {self.dim}, got {grads.shape[-1]}")
        G = grads.to(self.device)
        out = torch.zeros(G.shape[0], self.proj_dim, dtype=torch.float32, device=self.device)
        for rows, _, R in self._groups(torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32):
            out += (G[:, rows].to(self.dtype) @ R).float()  # (B, rows) @ (rows, p)
        return out / math.sqrt(self.proj_dim)

    def project_back(self, u: torch.Tensor, tick=None) -> torch.Tensor:
        """(p,) -> (D,) float32: R u / √p, the adjoint of :meth:`project`."""
        u = u.to(self.device, torch.float32)
        out = torch.empty(self.dim, dtype=torch.float32, device=self.device)
        for rows, count, R in self._groups(torch.float32):
            out[rows] = R @ u
            for _ in range(count if tick else 0):
                tick()
        return out / math.sqrt(self.proj_dim)

    def gram(self, vec: torch.Tensor, tick=None) -> torch.Tensor:
        """(D,) -> (D,): φ*(φ(vec)) = R Rᵀ vec / p, so that ⟨gram(a), b⟩ = ⟨φ(a), φ(b)⟩ exactly
        (up to float rounding) for every b. Two passes over R, computed in float32;
        ``tick`` is called once per block visited (2 × n_blocks in all)."""
        vec = vec.to(self.device, torch.float32)
        u = torch.zeros(self.proj_dim, dtype=torch.float32, device=self.device)
        for rows, count, R in self._groups(torch.float32):
            u += vec[rows] @ R
            for _ in range(count if tick else 0):
                tick()
        return self.project_back(u / math.sqrt(self.proj_dim), tick)
