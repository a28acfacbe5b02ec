"""Execution settings shared by every stage: device, precision, batching, progress."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ntkselect.errors import NtkSelectError

if TYPE_CHECKING:
    from ntkselect.model.memory import MemoryCosts

__all__ = ["Runtime", "check_device", "resolve_device", "resolve_precision", "cpu_has_bf16", "is_oom", "run_batches"]

logger = logging.getLogger(__name__)


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error of any device (CUDA's OutOfMemoryError, or a RuntimeError saying so)."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_batches(
    batches: Sequence[Sequence[int]],
    run: Callable[[list[int]], None],
    device: torch.device,
    desc: str,
    label: Callable[[int], str] = lambda i: f"example #{i}",
    hint: str = "lower --max-length",
) -> int:
    """``run(idx)`` for each batch of example indices, in order; on out-of-memory, the batch is split
    in halves and retried (and every later batch is capped at that size), down to one example, where
    the error is one line naming the example and ``hint``. ``run`` must write its results only after
    its computation succeeded (an out-of-memory error then leaves nothing half-written), and compute
    each example's result on its own (a forward pass: a smaller batch changes nothing but float
    rounding in batched matmuls). Returns the batch cap in the end (the largest batch if none fell).

    Stage 2's backward loop (selection/ntk/stage2.py) has the same policy with its own hooks."""
    pending = [list(b) for b in batches]
    cap = max((len(b) for b in pending), default=1)
    while pending:
        idx = pending.pop(0)
        if len(idx) > cap:
            pending[:0] = [idx[i : i + cap] for i in range(0, len(idx), cap)]
            continue
        try:
            run(idx)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if len(idx) == 1:
                raise NtkSelectError(f"{desc}: out of memory on a single example ({label(idx[0])}); {hint}") from None
            cap = max(1, len(idx) // 2)
            logger.warning(f"{desc}: out of memory with {len(idx)} examples per batch; retrying with {cap}")
            pending.insert(0, idx)
    return cap


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bfloat16 natively (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def check_device(name: str, flag: str = "--device") -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for a device this machine has; one line otherwise."""
    if name in ("auto", "cpu"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", str(name))
    if not m:
        raise NtkSelectError(f"{flag} {name!r}: not a device ntkselect runs on; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise NtkSelectError(f"{flag} {name}: no CUDA device is available here; use --device cpu")
    count = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= count:
        raise NtkSelectError(f"{flag} {name}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1}); choose one of them")


def resolve_device(name: str) -> torch.device:
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device, model_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The matmul (autocast) precision. ``auto`` follows half-precision weights (their matmuls
    run in their own dtype anyway), else bfloat16 where the hardware has it."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if model_dtype in (torch.bfloat16, torch.float16):
        return model_dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


@dataclass
class Runtime:
    """How to run: the same object is handed to every stage."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # autocast dtype for matmuls; float32 = no autocast
    model_dtype: torch.dtype = torch.float32  # the dtype the frozen weights are held in (--model-dtype)
    batch_size: int = 16
    max_batch_tokens: int = 8192
    padding_side: str = "right"
    pad_id: int = 0
    progress: bool = True
    last_batch_cap: int | None = None  # examples per batch after any out-of-memory halving
    memory: MemoryCosts | None = None  # measured per-pass costs and the budget batches keep to (None: no cap)

    def fits(self, kind: str):
        """fits(B, L, N) for batches of this kind of pass, or None (no memory cap)."""
        return self.memory.fits(kind) if self.memory is not None else None

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> dict:
        out = {
            "device": str(self.device),
            "precision": str(self.dtype).replace("torch.", ""),
            "model_dtype": str(self.model_dtype).replace("torch.", ""),
            "batch_size": self.batch_size,
            "max_batch_tokens": self.max_batch_tokens,
            "padding_side": self.padding_side,
        }
        if self.memory is not None:
            out["memory_budget_bytes"] = int(self.memory.budget) if self.memory.budget != float("inf") else None
        return out
