"""Warm-up: a short LoRA fine-tune on the domain set D.

The NTK is taken at the warmed-up adapter (the paper's Θ_0 is after a brief adaptation), and
the same adapter is what the user fine-tunes from. A plain, seeded training loop (AdamW,
linear warm-up and decay, token-mean cross-entropy on the trained tokens) keeps the run
deterministic and free of a Trainer dependency. :func:`warmup_or_resume` keeps the finished
warm-up on disk, so a rerun of the same run loads it bit for bit instead of training again.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ntkselect.data.batching import collate, make_batches
from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_open, atomic_write_json
from ntkselect.grads.fused import FusedLoraGradients, lora_parameters
from ntkselect.model.adapters import default_target_modules
from ntkselect.model.lm import final_hidden, trained_logits
from ntkselect.model.memory import gradient_pass
from ntkselect.model.runtime import Runtime, is_oom
from ntkselect.progress import Progress

__all__ = ["WarmupOptions", "add_lora", "warmup", "warmup_or_resume", "WarmupRun", "per_example_loss", "warmup_pass"]

logger = logging.getLogger(__name__)


@dataclass
class WarmupOptions:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0


def add_lora(model, opts: WarmupOptions):
    """Wrap ``model`` with a freshly initialised (seeded) LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(opts.seed)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft vs transformers 5
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*", category=UserWarning)  # GPT-2's Conv1D: peft sets it itself
    target = opts.target_modules
    if target == "all-linear":  # an MoE model: all linear layers but the routers and experts (ntkselect.model.adapters)
        target = default_target_modules(model) or target
    alpha: Any = opts.alpha  # peft annotates lora_alpha as int; any number works (it scales by alpha / r)
    cfg = LoraConfig(r=opts.r, lora_alpha=alpha, lora_dropout=opts.dropout, target_modules=target, task_type="CAUSAL_LM", bias="none")
    try:
        return get_peft_model(model, cfg)
    except ValueError as err:
        msg = str(err)
        m = re.match(r"Target module (\w+)\(", msg)
        if m:  # peft prints the whole module; name its class
            msg = f"peft cannot adapt {m.group(1)} modules (MoE experts?); adapt linear layers only"
        raise NtkSelectError(f"--lora-target-modules {opts.target_modules!r}: {msg.splitlines()[0]}") from None


def trained_token_loss(model, batch) -> torch.Tensor:
    """Token-mean cross-entropy over the trained tokens of the batch.

    The LM head runs only at the positions that predict a trained token (for a short answer
    after a long question, a few percent of the positions), instead of building the full
    (B, L, V) logits: the same loss as the model's own, several times cheaper on a CPU."""
    h = final_hidden(model, batch)  # (B, L, d)
    pos = batch.target_mask.bool()  # (B, L)
    targets = batch.input_ids[:, 1:][pos[:, :-1]]  # (N,) the tokens those positions predict
    logits = trained_logits(model, h[pos])  # (N, V) the model's own logits (soft-capping, scaling included)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def _token_mean_loss(model, batch, head=None) -> torch.Tensor:
    return trained_token_loss(model, batch).reshape(1)


def warmup_pass(model, batch, rt: Runtime, tracker) -> None:
    """A warm-up step's pass on one batch (forward + backward of the token-mean loss, gradients
    summed over the batch), ``tracker`` around it: the "warmup" kind of
    :func:`~ntkselect.model.memory.measure_costs`."""
    gradient_pass(model, batch, rt, tracker, _token_mean_loss, "sum")


def per_example_loss(model, batch, head=None) -> torch.Tensor:
    """(B,) each example's token-mean cross-entropy over its trained tokens: the objective whose
    per-example gradients LESS uses. ``head`` is ignored (the signature of a stage-2 objective)."""
    return per_example_loss_and_logits(model, batch)[0]


def per_example_loss_and_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_example_loss` (B,) and the logits it came from, (N, V), one row per trained
    position in row-major order of ``batch.target_mask`` (so that other scores at those
    positions need no second forward pass)."""
    h = final_hidden(model, batch)  # (B, L, d)
    pos = batch.target_mask.bool()  # (B, L)
    targets = batch.input_ids[:, 1:][pos[:, :-1]]  # (N,)
    rows = pos.nonzero()[:, 0]  # (N,) the example each trained token belongs to
    logits = trained_logits(model, h[pos])  # (N, V) the model's own logits (soft-capping, scaling included)
    tok = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    total = torch.zeros(pos.shape[0], device=tok.device).index_add(0, rows, tok)  # (B,)
    return total / pos.sum(1).clamp_min(1), logits


def loss_and_grads(model, batch, rt: Runtime, fused: bool, weight: float = 1.0, accumulate: bool = False) -> torch.Tensor:
    """The loss of one batch, with the LoRA parameters' ``.grad`` set.

    ``fused`` (used when there is no dropout) runs every LoRA layer as one matmul with W + sBA
    and takes the parameter gradients from the per-token factors that stage 2 uses
    (:class:`~ntkselect.grads.fused.FusedLoraGradients`): the same gradient as autograd through peft's
    layers, at about half the cost on a CPU. ``weight`` scales the loss and its gradient, and
    ``accumulate`` adds to ``.grad`` instead of setting it (one micro-batch of a larger batch)."""
    if not fused:
        with rt.autocast():
            loss = trained_token_loss(model, batch)
        (loss if weight == 1.0 else loss * weight).backward()  # autograd adds to any .grad already there
        return loss.detach() * weight if weight != 1.0 else loss.detach()
    with FusedLoraGradients(model) as hooks:
        hooks.set_mask(batch.attention_mask)
        hooks.stream("sum")
        with rt.autocast():
            loss = trained_token_loss(model, batch)
        loss.backward()
        grads = hooks.batch_sum()
    for name, p in lora_parameters(model):
        g = grads[name].to(p.dtype) if weight == 1.0 else (grads[name] * weight).to(p.dtype)
        p.grad = g if not accumulate or p.grad is None else p.grad + g
    return loss.detach() * weight if weight != 1.0 else loss.detach()


def micro_batches(examples, idx: list[int], rt: Runtime) -> list[list[int]]:
    """``idx`` split into micro-batches that each fit the memory budget (:mod:`ntkselect.model.memory`);
    ``[idx]`` when the whole batch fits or no budget is set."""
    fits = rt.fits("warmup")
    lengths = [len(examples[i].input_ids) for i in idx]
    trained = [sum(examples[i].train_mask[1:]) for i in idx]
    if fits is None or len(idx) < 2 or fits(len(idx), max(lengths), sum(trained)):
        return [list(idx)]
    return [[idx[j] for j in part] for part in make_batches(lengths, len(idx), None, fits=fits, trained=trained)]


def batch_loss_and_grads(
    model, examples, idx: list[int], rt: Runtime, fused: bool, cap: list[int] | None = None, desc: str = "warm-up"
) -> tuple[torch.Tensor, int]:
    """(loss, real tokens) of the batch ``idx``, with ``.grad`` set: in one pass when it fits the
    memory budget, else accumulated over micro-batches, each weighted by its share of the
    batch's trained tokens (the same token-mean loss and gradient, up to float rounding).

    Out of device memory, the step is redone from scratch with micro-batches of half the size (the
    same weighted accumulation, so the same gradient up to float rounding), down to one example,
    where the error is one line. ``cap`` ([largest micro-batch]) carries the size that fitted to
    the next steps, so a step that ran out of memory once is not retried at full size every time."""
    cap = cap if cap is not None else [len(idx)]
    while True:
        try:
            return _loss_and_grads_in_parts(model, examples, idx, rt, fused, cap[0])
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            for p in model.parameters():
                p.grad = None  # the failed step's partial sums
            if rt.device.type == "cuda":
                torch.cuda.empty_cache()
            largest = min(cap[0], len(idx))
            if largest <= 1:
                longest = max(len(examples[i].input_ids) for i in idx)
                raise NtkSelectError(f"{desc}: out of memory on a single training example ({longest} tokens); lower --max-length") from None
            cap[0] = max(1, largest // 2)
            logger.warning(f"{desc}: out of memory with {largest} examples per pass; accumulating over passes of {cap[0]}")


def _loss_and_grads_in_parts(model, examples, idx: list[int], rt: Runtime, fused: bool, cap: int) -> tuple[torch.Tensor, int]:
    parts = [q[j : j + cap] for q in micro_batches(examples, idx, rt) for j in range(0, len(q), cap)]
    if len(parts) == 1:
        batch = collate([examples[i] for i in idx], idx, rt.pad_id, rt.padding_side).to(rt.device)
        return loss_and_grads(model, batch, rt, fused), batch.n_tokens
    total = sum(sum(examples[i].train_mask[1:]) for i in idx)
    loss, n_tokens = None, 0
    for part in parts:
        batch = collate([examples[i] for i in part], part, rt.pad_id, rt.padding_side).to(rt.device)
        w = float(batch.target_mask.sum()) / max(1, total)
        part_loss = loss_and_grads(model, batch, rt, fused, weight=w, accumulate=True)
        loss = part_loss if loss is None else loss + part_loss
        n_tokens += batch.n_tokens
    assert loss is not None  # two or more parts
    return loss, n_tokens


def warmup_steps(n: int, opts: WarmupOptions) -> int:
    return int(round(opts.epochs * math.ceil(n / opts.batch_size)))


def warmup_batches(n: int, opts: WarmupOptions):
    """The example indices of each warm-up step, in order: seeded permutations of the n examples,
    one after another, cut into batches (what :func:`warmup` trains on; the dry run reads them too)."""
    gen = torch.Generator().manual_seed(opts.seed)
    order: list[int] = []
    for _ in range(warmup_steps(n, opts)):
        if len(order) < opts.batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[: opts.batch_size], order[opts.batch_size :]
        yield idx


def warmup(model, examples, opts: WarmupOptions, rt: Runtime, adam_state: dict | None = None, desc: str = "warm-up", on_step=None) -> dict:
    """Train the LoRA parameters on ``examples`` in place; returns a summary (losses, time).

    ``adam_state``, when given, is filled with the optimizer's final moments per LoRA parameter
    name, ``{name: (exp_avg, exp_avg_sq)}``, plus ``"_betas"`` and ``"_eps"`` (LESS needs them).
    ``on_step(step, total)``, when given, is called after every optimizer step (step = 1..total),
    e.g. to save checkpoints; the model is back in training mode after the call."""
    n = len(examples)
    total = warmup_steps(n, opts)
    summary = {"steps": total, "epochs": opts.epochs, "examples": n, "loss_first": None, "loss_last": None, "seconds": 0.0}
    if total == 0:
        return summary
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    warm = max(1, int(0.03 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    model.train()
    prog = Progress(desc, total * opts.batch_size if total else 0, enabled=rt.progress)
    losses = []
    cap = [opts.batch_size]  # the largest pass that fits; halved on out-of-memory (batch_loss_and_grads)
    for step, idx in enumerate(warmup_batches(n, opts)):
        loss, n_tokens = batch_loss_and_grads(model, examples, idx, rt, fused=opts.dropout == 0, cap=cap, desc=desc)
        if not torch.isfinite(loss):
            raise NtkSelectError(f"warm-up: the loss became non-finite at step {step + 1}; lower --warmup-lr or use --precision float32")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        prog.update(len(idx), n_tokens)
        if on_step is not None:
            on_step(step + 1, total)
            model.train()
    prog.close()
    model.eval()
    if adam_state is not None:
        by_param = {id(p): n for n, p in lora_parameters(model)}
        for p in params:
            st = optim.state.get(p, {})
            if id(p) in by_param and "exp_avg" in st:
                adam_state[by_param[id(p)]] = (st["exp_avg"].detach().clone(), st["exp_avg_sq"].detach().clone())
        adam_state["_betas"] = optim.defaults["betas"]
        adam_state["_eps"] = optim.defaults["eps"]
    k = max(1, min(10, total // 5))
    summary.update(loss_first=sum(losses[:k]) / k, loss_last=sum(losses[-k:]) / k, seconds=time.perf_counter() - t0)
    return summary


@dataclass
class WarmupRun:
    """A warm-up done (or read back): its summary, the optimizer's final moments, and whether
    it was resumed from disk."""

    summary: dict
    adam: dict = field(default_factory=dict)
    resumed: bool = False


def warmup_or_resume(
    model, examples, opts: WarmupOptions, rt: Runtime, wdir: str | Path, key: str, log: Callable[[str], None] | None = None, on_done=None
) -> WarmupRun:
    """:func:`warmup` ``model`` in place, keeping the adapter and the Adam moments in ``wdir``
    with a completion marker naming ``key``; if a marker with this key is there, load them
    instead (bit for bit the finished warm-up). ``on_done(summary)`` is called after a warm-up
    that ran (not after a resume). The resume message goes to ``log`` (default: this module's
    logger, at INFO)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    wdir = Path(wdir)
    marker = wdir / "warmup.done"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        state = torch.load(wdir / "state.pt", map_location="cpu", weights_only=True)
        set_peft_model_state_dict(model, state["adapter"])
        adam: dict = {k: tuple(v) for k, v in state["adam"].items()}
        adam.update(state["adam_meta"])
        summary = json.loads(marker.read_text())["summary"]
        model.eval()
        (log or logger.info)("ntkselect: warm-up already done, loaded its adapter")
        return WarmupRun(summary, adam, resumed=True)
    adam = {}
    summary = warmup(model, examples, opts, rt, adam_state=adam)
    moments = {k: list(v) for k, v in adam.items() if not k.startswith("_")}
    meta = {k: v for k, v in adam.items() if k.startswith("_")}
    with atomic_open(wdir / "state.pt", "wb", encoding=None) as f:
        torch.save({"adapter": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}, "adam": moments, "adam_meta": meta}, f)
    atomic_write_json(marker, {"key": key, "summary": summary})
    if on_done is not None:
        on_done(summary)
    return WarmupRun(summary, adam)
