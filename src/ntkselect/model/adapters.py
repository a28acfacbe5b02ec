"""Which modules the LoRA adapter covers.

``--lora-target-modules all-linear`` means every linear (or GPT-2 ``Conv1D``) layer but the LM
head, as in peft. In a mixture-of-experts model two kinds of layer are left out, by design:

* **routers** (Mixtral's ``gate``, Qwen2-MoE's ``gate`` and ``shared_expert_gate``): adapting
  them changes which experts each token uses, and they are not what fine-tuning for a domain
  is about;
* **experts**: each expert sees only the tokens routed to it, so its gradient is not a sum over
  every token of the example and the per-token factors stage 2 relies on do not apply; in
  transformers 5 they are also stored as one 3-D parameter per block, which peft can only
  adapt "by parameter" (``target_parameters``).

What stays adapted is every other linear layer: attention, and the dense or shared-expert
MLPs (Qwen2-MoE's ``shared_expert``). peft's own ``all-linear`` would adapt the routers and,
through its transformers-5 conversion, the expert tensors; ntkselect resolves ``all-linear``
to explicit module names instead whenever the model has MoE blocks (for every other model it
passes ``all-linear`` to peft unchanged). Naming experts or routers explicitly in
``--lora-target-modules`` is refused by the preflight with a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

__all__ = ["is_moe", "default_target_modules", "ROUTER_NAMES", "save_adapter"]

#: child names of an MoE block that route tokens (never adapted by default)
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "switch_gate")


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def _moe_blocks(model: nn.Module) -> list[str]:
    """Names of the modules with an ``experts`` child (the MoE blocks)."""
    return [name for name, m in model.named_modules() if isinstance(getattr(m, "experts", None), nn.Module)]


def is_moe(model: nn.Module) -> bool:
    return bool(_moe_blocks(model))


def default_target_modules(model: nn.Module) -> list[str] | None:
    """``all-linear`` as explicit module names for an MoE model (routers and experts left out),
    or None for a dense model (peft's ``all-linear`` is used unchanged)."""
    blocks = _moe_blocks(model)
    if not blocks:
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    excluded: list[str] = []
    for b in blocks:
        prefix = f"{b}." if b else ""
        excluded.append(f"{prefix}experts")
        excluded += [f"{prefix}{r}" for r in ROUTER_NAMES]
    out = []
    for name, m in model.named_modules():
        if not _is_linear(m) or m is head:
            continue
        if any(name == e or name.startswith(e + ".") for e in excluded) or "router" in type(m).__name__.lower():
            continue
        out.append(name)
    return sorted(out)


def save_adapter(model, folder: str | Path) -> None:
    """``model.save_pretrained(folder)`` with the same bytes in every process.

    peft keeps ``target_modules`` as a set and writes it in the set's order, which follows the
    process's string-hash seed: two runs of the same selection wrote the same weights but
    ``adapter_config.json`` with the modules in a different order. The list is written sorted,
    in peft's own format (``json.dumps(indent=2, sort_keys=True)``); peft reads it back as a set."""
    model.save_pretrained(folder)
    for cfg_path in Path(folder).rglob("adapter_config.json"):
        cfg = json.loads(cfg_path.read_text())
        tm = cfg.get("target_modules")
        if isinstance(tm, list) and all(isinstance(x, str) for x in tm):
            cfg["target_modules"] = sorted(tm)
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
