"""Memory that can be predicted: measured per-token costs, and batches sized to a budget.

The memory of a backward pass grows with the tokens of its batch: every layer keeps its
activations (and the gradient hooks their inputs) until the backward pass reaches it. Rather
than a formula per architecture, :func:`measure_costs` *measures* it for the model at hand
(the preflight calls it): each kind of pass the run uses (warm-up step, stage-2 domain
gradients, candidate scores, a stage-1 forward pass; LESS and per-example gradients derive from
them) runs on tiny synthetic batches under a tracker of live tensor bytes (:class:`LiveBytes`),
and the peaks are fitted, per kind, to

    bytes(B, L, N) = k + B · (a·L + b·L² + e) + c·N

(B examples padded to L tokens, N trained tokens; ``b``: an attention that forms its L × L
matrix; ``c``: the vocabulary-sized logits of a loss; ``e``: a per-example gradient).

:func:`activation_budget` is what one batch's activations may take: on a CPU at most
``CPU_BUDGET`` (1 GiB) resident and at most half of the available memory; on a GPU half of the
free memory. :meth:`MemoryCosts.fits` caps every batch of stages 1 and 2, LESS and each warm-up
micro-batch to it, so the peak of a run no longer grows with ``--max-batch-tokens``, and the
dry run predicts it from the same numbers (times the allocator's share, ``ALLOCATOR_OVERHEAD``).
``NTKSELECT_MEMORY_BUDGET`` (e.g. ``4G``) sets the budget by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ntkselect.data.batching import collate
from ntkselect.data.records import TokenizedExample
from ntkselect.grads.fused import FusedLoraGradients, lora_parameters
from ntkselect.model.heads import Head
from ntkselect.model.lm import summed_head

__all__ = [
    "LiveBytes",
    "PassCost",
    "MemoryCosts",
    "measure_costs",
    "gradient_pass",
    "activation_budget",
    "overhead",
    "available_bytes",
    "rss_bytes",
    "peak_rss_bytes",
    "CPU_BUDGET",
    "ALLOCATOR_OVERHEAD",
    "KINDS",
]

#: resident bytes the activations of one batch may take on a CPU. Larger batches do not run faster there:
#: an 8-layer SmolLM2-width model scored 24 candidates (100-300 tokens) in 12.5-13 s with 512, 1,024 or
#: 2,048 padded tokens per batch (one thread, float32).
CPU_BUDGET = 1 << 30
GPU_FRACTION = 0.5  # of the free GPU memory after the model is loaded
AVAILABLE_FRACTION = 0.5  # of the available host memory after the model is loaded
#: resident memory per live tensor byte at the peak of a pass on a CPU: glibc's heap keeps freed
#: blocks that the next, differently sized ones cannot use. Measured: a fused stage-2 pass of an
#: 8-layer SmolLM2-width model, 8 x 256 tokens, float32, raised the peak resident memory by 1,070
#: MiB for 726 MiB of live tensors (1.47); with MALLOC_MMAP_THRESHOLD_=131072 by 740 MiB (1.02).
ALLOCATOR_OVERHEAD = 1.45


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the context and still alive (on every
    device), from every op the dispatcher sees (forward and backward passes, hooks). Storages
    that existed before (the weights) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, tuple] = {}

    def _track(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(st)
        if key in self._refs or st.nbytes() == 0 or st.device.type == "meta":
            return
        import weakref

        n = st.nbytes()

        def gone(_ref, key=key, n=n):
            self._refs.pop(key, None)
            self.live -= n

        self._refs[key] = (weakref.ref(st, gone), n)
        self.live += n
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in _tensors(out)]
        if outs:
            inputs = {_ptr(t) for t in _tensors(args)} | ({_ptr(t) for t in _tensors(tuple(kwargs.values()))} if kwargs else set())
            for t in outs:
                if _ptr(t) not in inputs:  # a view or in-place result is no new memory
                    self._track(t)
        return out


def _tensors(x):
    """The tensors in an op's arguments or result (flat, or in lists and tuples)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            if isinstance(y, torch.Tensor):
                yield y
            elif isinstance(y, (list, tuple)):
                yield from _tensors(y)


def _ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


@dataclass(frozen=True)
class PassCost:
    """bytes(B, L, N) = k + B · (a·L + b·L² + e) + c·N for one kind of pass: a batch of B
    examples padded to L tokens, N of them trained."""

    a: float  # bytes per (padded) token: the activations every layer keeps
    b: float = 0.0  # bytes per token per position (an attention that forms its L x L matrix)
    c: float = 0.0  # bytes per trained token (the vocabulary-sized logits of a loss)
    k: float = 0.0  # bytes per batch (e.g. a transient copy of the LM head's weight)
    e: float = 0.0  # bytes per example (its gradient, for the per-example passes)

    def bytes(self, B: int, L: int, N: int = 0) -> float:
        return self.k + B * (self.a * L + self.b * L * L + self.e) + self.c * N


#: the kinds of pass, and what they are
KINDS = {
    "warmup": "warm-up step: forward + backward of the token-mean loss, gradients summed over the batch",
    "sum": "stage 2 domain gradients: summed logits, gradients summed over the batch",
    "dot": "stage 2 candidates: summed logits, per-example dot products with the domain vector",
    "per_example": "per-example gradients of the summed logits (projected features, diagnostics)",
    "less": "LESS: per-example gradients of each example's loss",
    "forward": "stage 1: a forward pass without a graph",
}


@dataclass
class MemoryCosts:
    """Measured per-pass costs of one model, adapter and precision, and the budget batches keep to."""

    passes: dict[str, PassCost] = field(default_factory=dict)
    budget: float = float("inf")  # bytes of activations a batch may use

    def fits(self, kind: str) -> Callable[[int, int, int], bool] | None:
        """fits(B, L, N): whether a batch of this kind stays within the budget (None: no cap)."""
        cost = self.passes.get(kind)
        if cost is None or self.budget == float("inf"):
            return None
        budget = self.budget

        def fits(B: int, L: int, N: int = 0) -> bool:
            return cost.bytes(B, L, N) <= budget

        return fits

    def to_dict(self) -> dict:
        return {"budget": self.budget, "passes": {k: dataclasses.asdict(v) for k, v in self.passes.items()}}


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where unavailable)."""
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM)."""
    return _status("VmHWM")


def _status(field_name: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_bytes() -> int:
    """Host memory available to this process (MemAvailable, or psutil, or a large number)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return 1 << 50


def overhead(device: torch.device) -> float:
    """Resident bytes per live tensor byte (the allocator's share) on ``device``."""
    return ALLOCATOR_OVERHEAD if device.type == "cpu" else 1.0


def activation_budget(device: torch.device, override: float | None = None) -> float:
    """Live tensor bytes the activations of one batch may use (the measured costs are live
    bytes): ``NTKSELECT_MEMORY_BUDGET`` (resident bytes, or with a K/M/G suffix) when set, else on
    a CPU min(CPU_BUDGET, half the available memory), on a GPU half of the free memory; divided
    by the allocator's overhead."""
    env = override if override is not None else _parse_bytes(os.environ.get("NTKSELECT_MEMORY_BUDGET", ""))
    if env:
        resident = float(env)
    elif device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        resident = GPU_FRACTION * free
    else:
        resident = float(min(CPU_BUDGET, AVAILABLE_FRACTION * available_bytes()))
    return resident / overhead(device)


def with_second_model(memory: MemoryCosts, device: torch.device, weight_bytes: float) -> MemoryCosts:
    """The costs with the budget of a process that holds a second model of ``weight_bytes``
    (``evaluate``: the selection's warmed-up model and the fine-tune's fresh one at once).

    On a GPU the budget is half of the free memory the preflight saw with one model loaded, so the
    second one takes half its bytes off the budget (never below zero). On a CPU the budget is a
    fixed cap (``CPU_BUDGET``) well below the host memory and stays; so does a budget set by
    ``NTKSELECT_MEMORY_BUDGET``, which is the user's."""
    if device.type != "cuda" or os.environ.get("NTKSELECT_MEMORY_BUDGET") or memory.budget == float("inf"):
        return memory
    return MemoryCosts(memory.passes, max(0.0, memory.budget - GPU_FRACTION * weight_bytes / overhead(device)))


def _parse_bytes(text: str) -> float | None:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return None
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1], 1)
    try:
        return float(text.rstrip("KMGT")) * mult
    except ValueError:
        return None


def _fit(lengths, peaks) -> tuple[float, float, float]:
    """(k, a, b) >= 0 with peak = k + a·L + b·L², least squares over the probes (each subset of
    the three terms is tried; the best one with no negative coefficient wins)."""
    import itertools

    import numpy as np

    L = np.asarray(lengths, dtype=np.float64)
    y = np.asarray(peaks, dtype=np.float64)
    X = np.stack([np.ones_like(L), L, L * L], 1)
    best, best_res = (0.0, float(y.max() / L.min()), 0.0), float("inf")
    for r in (3, 2, 1):
        for cols in itertools.combinations(range(3), r):
            coef, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
            if (coef < 0).any():
                continue
            res = float(((X[:, cols] @ coef - y) ** 2).sum())
            if res < best_res * (1 - 1e-9):
                full = [0.0, 0.0, 0.0]
                for c, v in zip(cols, coef):
                    full[c] = float(v)
                best, best_res = (full[0], full[1], full[2]), res
    return best


_LOSS_KINDS = ("warmup", "less")
#: the kinds measured by a pass of their own; "less" and "per_example" derive from "warmup" and "sum"
MEASURED = ("warmup", "sum", "dot", "forward")


def gradient_pass(model, batch, rt, tracker, objective, mode: str, attention=None) -> None:
    """One backward pass of ``objective(model, batch, head)`` the way the stages take gradients
    (the fused LoRA hooks; gradients summed over the batch, ``mode`` "sum", or dotted per
    example with a vector, "dot"), with ``tracker`` (a :class:`LiveBytes`) entered around it and
    the context manager ``attention`` (if any) outside it. The stages' own passes for
    :func:`measure_costs` are made of it (``ntkselect.selection.ntk.stage2.sum_pass``, ...)."""
    params = lora_parameters(model)
    vec = {n: torch.zeros_like(p) for n, p in params} if mode == "dot" else None
    head = summed_head(model)
    with attention if attention is not None else contextlib.nullcontext(), FusedLoraGradients(model) as hooks, tracker:
        hooks.set_mask(batch.attention_mask)
        hooks.stream(mode, vec)
        with rt.autocast():
            f = objective(model, batch, head)
        f.sum().backward()
        out = hooks.batch_sum() if vec is None else hooks.dot(vec)  # vec: mode "dot"
        del f, out
        hooks.clear()
    for _, p in params:
        p.grad = None


def measure_costs(
    model, rt, kinds=tuple(KINDS), vocab: int = 0, lengths: tuple[int, ...] = (16, 32, 64), *, passes: Mapping[str, Callable[..., None]]
) -> dict[str, PassCost]:
    """Peak live bytes of each kind of pass the run uses, on batches of random tokens: two
    examples of L and 3L/4 tokens (so padding masks are formed, as in a real batch) for three
    L, one trained position each, fitted to k + 2(a·L + b·L²); then the longest batch with
    every position trained gives c, the bytes per trained token (the vocabulary-sized logits
    of a loss). The per-example gradient (e, for the per-example passes) is the LoRA dimension
    in float32.

    ``passes`` maps each kind of :data:`MEASURED` the run uses to the function that runs one
    such pass, ``pass_(model, batch, rt, tracker)`` with ``tracker`` entered around what it
    measures; each lives beside the stage it measures (the preflight,
    :mod:`ntkselect.runs.preflight`, hands them in: ``MEASURED_PASSES``)."""
    g = torch.Generator().manual_seed(0)
    params = lora_parameters(model)
    dim = sum(p.numel() for _, p in params)
    head = summed_head(model)

    def probe(L: int, all_trained: bool):
        exs = []
        for n in (L, max(2, 3 * L // 4)):
            ids = torch.randint(3, max(4, vocab or 4), (n,), generator=g).tolist()
            exs.append(TokenizedExample(ids, [False] + [True] * (n - 1) if all_trained else [False] * (n - 1) + [True], False))
        batch = collate(exs, [0, 1], rt.pad_id, rt.padding_side).to(rt.device)
        return L, int(batch.target_mask.sum()), batch

    single = [probe(L, False) for L in lengths]
    full = probe(lengths[-1], True)

    def peak(kind: str, batch) -> float:
        tracker = LiveBytes()
        passes[kind](model, batch, rt, tracker)
        return float(tracker.peak)

    out: dict[str, PassCost] = {}
    model.eval()
    # LESS keeps what a warm-up step keeps, per-example gradients what the domain pass keeps, plus each example's gradient
    derived = {"less": "warmup", "per_example": "sum"}
    for kind in dict.fromkeys(derived.get(k, k) for k in kinds):
        peaks = [peak(kind, b) for _, _, b in single]
        L, n, _ = single[-1]
        c = 0.0
        if kind in _LOSS_KINDS or (kind != "forward" and isinstance(head, Head)):  # logits of a loss, or a soft-capped head's chunks
            c = max(0.0, (peak(kind, full[2]) - peaks[-1]) / max(1, full[1] - n))
        k, a2, b2 = _fit([L for L, _, _ in single], [m - c * n for (_, n, _), m in zip(single, peaks)])
        out[kind] = PassCost(a=a2 / 2, b=b2 / 2, c=c, k=max(0.0, k))  # the probes hold two examples
    for kind, base in derived.items():
        if kind in kinds:
            out[kind] = dataclasses.replace(out[base], e=4.0 * dim)  # + the example's gradient, float32
    return {k: out[k] for k in kinds}
