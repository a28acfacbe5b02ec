"""The Rademacher projection's generator: one stream of signs on every device and for every
grouping of its blocks, made once per pass, balanced."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from ntkselect.grads import projection
from ntkselect.grads.projection import BLOCK_ROWS, RademacherProjector, _numpy_signs, _torch_bytes, _torch_signs, cache_bytes_per_block, philox4x64

CPU = torch.device("cpu")
SEEDS = [0, 7, 2**63 + 5, 2**64 - 1]  # the top bit of the key set and unset


def test_philox_matches_numpy_words():
    """The torch Philox4x64-10 gives numpy's words: counters 1.. under key (seed, block)."""
    for seed in SEEDS:
        for block in (0, 3, 2**40 + 1):
            rng = np.random.Generator(np.random.Philox(key=np.array([seed, block], dtype=np.uint64)))
            want = np.frombuffer(rng.bytes(32 * 50), dtype="<u8").reshape(50, 4)
            got = philox4x64(torch.arange(1, 51), seed, block).numpy().view(np.uint64)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_blocks_equal_numpy_blocks(dtype):
    """The device route (torch ops, several blocks per call) makes the CPU route's signs, bit for bit."""
    for seed in SEEDS:
        for p in (8, 40, 1000):
            a = _numpy_signs(seed, 2, 3, p, dtype, CPU)
            b = _torch_signs(seed, 2, 3, p, dtype, CPU)
            assert a.dtype == b.dtype == dtype
            assert torch.equal(a, b)
            assert set(a.float().unique().tolist()) == {-1.0, 1.0}


def test_blocks_do_not_depend_on_grouping_or_order(monkeypatch):
    """R is the same matrix whether its blocks come one at a time, in groups of any size, in any
    order, or from a projector of another size D; float32 and bfloat16 blocks hold the same signs."""
    D, p = 7 * BLOCK_ROWS + 300, 48
    P = RademacherProjector(D, p, seed=11)
    whole = torch.cat([P.block(i, torch.float32) for i in range(P.n_blocks)])  # (D, p)
    assert whole.shape == (D, p)
    for order in (range(P.n_blocks), reversed(range(P.n_blocks))):
        parts = {i: P.block(i, torch.float32) for i in order}
        assert torch.equal(torch.cat([parts[i] for i in range(P.n_blocks)]), whole)
    assert torch.equal(P.blocks(2, 4, torch.bfloat16).float(), whole[2 * BLOCK_ROWS : 6 * BLOCK_ROWS])
    assert torch.equal(RademacherProjector(3 * BLOCK_ROWS + 5, p, seed=11).blocks(0, 4, torch.float32), whole[: 3 * BLOCK_ROWS + 5])
    # the device route on this CPU, in groups of 3 blocks: the same matrix
    monkeypatch.setattr(projection, "_numpy_bytes", lambda seed, first, count, p: _torch_bytes(seed, first, count, p, torch.device("cpu")))
    monkeypatch.setattr(RademacherProjector, "group", lambda self, dtype=torch.bfloat16: 3)
    grouped = torch.cat([R for _, _, R in P._groups(torch.float32)])
    assert torch.equal(grouped, whole)


def test_project_is_one_pass_per_chunk_and_chunking_invariant(monkeypatch):
    """project((B, D)) generates each block once, for the whole chunk, and gives each row what
    projecting it alone (or in another grouping of blocks) gives."""
    D, p = 5 * BLOCK_ROWS + 17, 64
    G = torch.randn(9, D, generator=torch.Generator().manual_seed(0))  # (B, D)
    P = RademacherProjector(D, p, seed=3)
    calls = []
    real = projection._numpy_bytes

    def counted(seed, first, count, *a):
        calls.extend(range(first, first + count))
        return real(seed, first, count, *a)

    monkeypatch.setattr(projection, "_numpy_bytes", counted)
    full = P.project(G)  # (B, p)
    assert sorted(calls) == list(range(P.n_blocks))  # each block once for all 9 rows
    calls.clear()
    P.gram(G[0])
    assert sorted(calls) == sorted(2 * list(range(P.n_blocks)))  # gram: two passes, no more
    rows = torch.cat([P.project(G[i : i + 1]) for i in range(len(G))])
    # one row against nine: BLAS picks other kernels (and, with 2 threads, another split), so float32
    # sums of ~5K terms of size ~1 differ by ~1e-5; this failed alone and passed after tests that set 1 thread
    torch.testing.assert_close(rows, full, rtol=1e-5, atol=1e-4)
    ref = G.double() @ torch.cat([P.block(i, torch.float32) for i in range(P.n_blocks)]).double() / p**0.5
    torch.testing.assert_close(full.double(), ref, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(projection, "_numpy_bytes", lambda seed, first, count, p: _torch_bytes(seed, first, count, p, torch.device("cpu")))
    monkeypatch.setattr(RademacherProjector, "group", lambda self, dtype=torch.bfloat16: 4)
    torch.testing.assert_close(P.project(G), full, rtol=1e-5, atol=1e-5)


def _digest(seed: int) -> str:
    P = RademacherProjector(3 * BLOCK_ROWS, 32, seed=seed)
    return hashlib.sha256(b"".join(P.block(i, torch.float32).numpy().tobytes() for i in range(3))).hexdigest()


def test_generation_is_deterministic_across_processes():
    code = "import sys; sys.path[:0] = sys.argv[1:2]; from test_projection import _digest; print(_digest(5))"
    out = subprocess.run([sys.executable, "-c", code, str(__import__("pathlib").Path(__file__).parent)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(5)
    assert _digest(5) != _digest(6)


def test_signs_are_balanced_and_uncorrelated():
    """Loose statistical checks on 2^21 signs: the mean, each bit position within a byte, and
    neighbouring columns and rows, all within 6 standard deviations of a fair coin's."""
    R = torch.cat([RademacherProjector(8 * BLOCK_ROWS, 256, seed=1).block(i, torch.float32) for i in range(8)]).double()  # (8192, 256)
    n = R.numel()
    assert abs(R.mean().item()) < 6 / n**0.5
    by_bit = R.reshape(-1, 8).mean(0)  # each of the 8 signs a byte makes
    assert by_bit.abs().max().item() < 6 / (n / 8) ** 0.5
    assert abs((R[:, 1:] * R[:, :-1]).mean().item()) < 6 / (R[:, 1:].numel()) ** 0.5
    assert abs((R[1:] * R[:-1]).mean().item()) < 6 / (R[1:].numel()) ** 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_blocks_equal_cpu_blocks(dtype):
    """On CUDA the blocks are generated there (several per call) and equal the CPU's bit for bit."""
    D, p = 9 * BLOCK_ROWS + 100, 512
    for seed in (0, 2**63 + 5):
        cpu = RademacherProjector(D, p, seed=seed)
        gpu = RademacherProjector(D, p, seed=seed, device="cuda")
        want = torch.cat([cpu.block(i, dtype) for i in range(cpu.n_blocks)])
        got = torch.cat([R for _, _, R in gpu._groups(dtype)]).cpu()
        assert got.dtype == want.dtype == dtype
        assert torch.equal(got, want)
        kept = RademacherProjector(D, p, seed=seed, device="cuda", cache_bytes=5 * cache_bytes_per_block(p))  # a prefix of the blocks
        for _ in range(2):  # filling the cache, then from it
            assert torch.equal(torch.cat([R for _, _, R in kept._groups(dtype)]).cpu(), want)
        G = torch.randn(4, D)
        torch.testing.assert_close(gpu.project(G.cuda()).cpu(), cpu.project(G), rtol=1e-4, atol=1e-3)


def test_the_plan_counts_what_a_projection_pass_holds_on_either_device(monkeypatch):
    # issue 21: on CUDA a pass gathers up to a quarter of the free memory of rows and makes up to 1 GiB of signs
    # at once, which the plan used to count as one block; pass_bytes is now what both sides size from
    from ntkselect.grads import projection as P

    D, p = 21_000_000, 8192
    R = P.RademacherProjector(D, p, seed=0)
    cpu = P.pass_bytes(D, p, "cpu", torch.float32, rows=1000, chunk_bytes=1 << 30)
    assert cpu == 4 * D * R.chunk_rows(1 << 30) + P.BLOCK_ROWS * p * 4 + P.BLOCK_ROWS * p // 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 << 30, 141 << 30))  # an H200 with 100 GiB free
    gpu = P.pass_bytes(D, p, "cuda", torch.float32, rows=1000, chunk_bytes=1 << 30)
    rows = R.chunk_rows(P.chunk_bytes_for("cuda", 1 << 30))
    assert rows == (25 << 30) // (4 * D) and rows > 4 * R.chunk_rows(1 << 30)
    g = P.group_blocks(R.n_blocks, p, torch.float32, "cuda")
    assert g * P.BLOCK_ROWS * p * 4 <= 1 << 30 < (g + 1) * P.BLOCK_ROWS * p * 4  # the group generation makes
    assert gpu == 4 * D * rows + int(g * P.BLOCK_ROWS * p * 4 * (1 + P.GENERATION_OVERHEAD))
    assert gpu > 20 * cpu  # what the plan missed on a GPU
    assert P.pass_bytes(D, 0, "cuda", torch.float32, rows=3, chunk_bytes=1 << 30) == 3 * 4 * D  # no projection: the rows only


@pytest.mark.parametrize("cached", [0, 2, 6, 99])  # none, a prefix, all blocks, more than there are
def test_a_cache_of_the_generators_bytes_gives_the_same_projection_and_generates_each_block_once(monkeypatch, cached):
    """With the first ``cached`` blocks' bytes kept, every pass gives bit-for-bit what an uncached
    projector gives, and a cached block is generated on the first pass only."""
    D, p = 6 * BLOCK_ROWS + 5, 64
    G = torch.randn(5, D, generator=torch.Generator().manual_seed(1))  # (B, D)
    plain = RademacherProjector(D, p, seed=7)
    kept = RademacherProjector(D, p, seed=7, cache_bytes=cached * cache_bytes_per_block(p))
    assert kept.cached_blocks == min(cached, plain.n_blocks) and kept.describe()["cached_blocks"] == kept.cached_blocks
    calls: list[int] = []
    real = projection._numpy_bytes

    def counted(seed, first, count, *a):
        calls.extend(range(first, first + count))
        return real(seed, first, count, *a)

    monkeypatch.setattr(projection, "_numpy_bytes", counted)
    want = plain.project(G)
    calls.clear()
    for _ in range(3):  # three passes: the first fills the cache
        assert torch.equal(kept.project(G), want)
    n, c = plain.n_blocks, kept.cached_blocks
    assert sorted(calls) == sorted(list(range(n)) + 2 * list(range(c, n)))
    assert torch.equal(kept.gram(G[0]), plain.gram(G[0]))
    # blocks asked for out of order (a skip ahead, then back) are still the same signs
    fresh = RademacherProjector(D, p, seed=7, cache_bytes=cached * cache_bytes_per_block(p))
    for first, count in ((3, 2), (0, 4), (4, 3), (1, 1)):
        assert torch.equal(fresh.blocks(first, count, torch.float32), plain.blocks(first, count, torch.float32))


def test_a_negative_cache_is_refused():
    with pytest.raises(ValueError, match="cache_bytes"):
        RademacherProjector(BLOCK_ROWS, 8, cache_bytes=-1)
