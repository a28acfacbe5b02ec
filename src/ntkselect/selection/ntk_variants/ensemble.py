"""Checkpoint ensemble: the kernel averaged over C warm-up checkpoints, as LESS does.

Θ_ens(x, x') = (1/C) Σ_c Θ_c(x, x'), Θ_c the variant's kernel at the adapter after step t_c of the
warm-up, t_c = round(S·c/C) for c = 1..C (S the warm-up's steps), so the last checkpoint is the
finished warm-up itself; the weights are equal (LESS weights its checkpoints by the mean
learning rate of the epoch before each, which under a linear decay mostly favours the early
ones: kept simple here, and said so in the manifest). Scores and the diagonal Θ(c, c) average
the same way, so ``--normalise`` divides by √Θ_ens(c, c).

The context's warm-up (:meth:`~ntkselect.selection.base.SelectionContext.model`, shared with
the other methods) keeps only the final adapter, so the earlier checkpoints come from a replay:
the same seeded warm-up on a fresh copy of the model, stopped after t_{C-1}, its adapter saved at
each t_c (:func:`warmup_checkpoints`; kept in the run's work folder with a completion marker).
That replay is this method's own cost, (C-1)/C of a warm-up at most.
"""

from __future__ import annotations

import contextlib
import json

import torch

from ntkselect.files import atomic_open, atomic_write_json
from ntkselect.model.loading import load_model
from ntkselect.runs.shards import digest
from ntkselect.training.warmup import add_lora, warmup, warmup_steps

__all__ = ["checkpoint_steps", "warmup_checkpoints", "swapped_adapter", "adapter_state"]


def checkpoint_steps(total: int, n: int) -> list[int]:
    """The distinct steps t_c = round(total·c/n), c = 1..n, ascending (the last is ``total``); [] without steps."""
    if total <= 0:
        return []
    return sorted({max(1, round(total * c / n)) for c in range(1, n + 1)})


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The LoRA adapter's parameters (peft's state dict), detached CPU copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


@contextlib.contextmanager
def swapped_adapter(model, state: dict[str, torch.Tensor] | None):
    """Inside: ``model``'s adapter holds ``state`` (None: unchanged); afterwards its own again.
    The parameters are copied into in place, so hooks holding them stay valid."""
    if state is None:
        yield model
        return
    from peft import set_peft_model_state_dict

    own = adapter_state(model)
    set_peft_model_state_dict(model, state)
    try:
        yield model
    finally:
        set_peft_model_state_dict(model, own)


class _Stop(Exception):
    pass


def warmup_checkpoints(ctx, n: int) -> tuple[list[dict[str, torch.Tensor] | None], list[int], int]:
    """(states, steps, replayed steps): the adapter after each checkpoint step, in order, with None
    for the last (the context's own warmed-up adapter); at most ``n`` checkpoints (fewer when the
    warm-up has fewer steps). The earlier ones replay the context's seeded warm-up on a fresh
    model, kept in ``ctx.store`` under the run's key."""
    ctx.model()  # the shared warm-up, done once
    opts = ctx.lora_options()
    total = warmup_steps(len(ctx.dom_ex), opts)
    steps = checkpoint_steps(total, n)
    earlier = [s for s in steps if s < total]
    if not earlier:
        return [None], steps or [0], 0
    wdir = ctx.store.root / "ensemble"
    key = digest(ctx.key, "checkpoints", earlier)
    marker = wdir / "checkpoints.done"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        saved = torch.load(wdir / "checkpoints.pt", map_location="cpu", weights_only=True)
        return [saved[str(s)] for s in earlier] + [None], steps, 0
    ctx.log(f"ntkselect: replaying the warm-up to step {earlier[-1]} of {total} for the checkpoints at steps {', '.join(map(str, earlier))}")
    replay = add_lora(load_model(ctx.setup.model_path, ctx.rt.model_dtype, ctx.rt.device), opts)
    states: dict[int, dict[str, torch.Tensor]] = {}

    def on_step(step: int, _total: int) -> None:
        if step in earlier:
            states[step] = adapter_state(replay)
        if step >= earlier[-1]:
            raise _Stop

    try:
        warmup(replay, ctx.dom_ex, opts, ctx.rt, desc="ensemble: warm-up replay", on_step=on_step)
    except _Stop:
        pass
    with atomic_open(wdir / "checkpoints.pt", "wb", encoding=None) as f:
        torch.save({str(s): states[s] for s in earlier}, f)
    atomic_write_json(marker, {"key": key, "steps": earlier})
    return [states[s] for s in earlier] + [None], steps, earlier[-1]
