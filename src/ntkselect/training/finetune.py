"""Fine-tuning on D ∪ S: one LoRA recipe for every method.

The comparison in ``ntkselect evaluate`` is only fair if every method's data is trained the
same way, so the recipe is a dataclass recorded in the output: a fresh, seeded LoRA adapter
on the base model (not the warm-up adapter), AdamW with linear warm-up and decay, the
token-mean loss on the trained tokens, in bfloat16 autocast where the hardware has it. It
reuses the warm-up's training loop (:func:`ntkselect.training.warmup.warmup`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ntkselect.errors import NtkSelectError
from ntkselect.model.loading import load_model
from ntkselect.model.runtime import Runtime
from ntkselect.training.warmup import WarmupOptions, add_lora, warmup

__all__ = ["FinetuneRecipe", "finetune", "finetune_options"]


@dataclass
class FinetuneRecipe:
    epochs: float = 2.0
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 512
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_target_modules: str = "all-linear"

    def validate(self) -> FinetuneRecipe:
        if self.epochs <= 0:
            raise NtkSelectError(f"--ft-epochs must be positive (got {self.epochs})")
        if self.lr <= 0:
            raise NtkSelectError(f"--ft-lr must be positive (got {self.lr})")
        for name in ("batch_size", "max_length", "lora_r"):
            if getattr(self, name) <= 0:
                flag = "--lora-r" if name == "lora_r" else f"--ft-{name.replace('_', '-')}"
                raise NtkSelectError(f"{flag} must be a positive integer (got {getattr(self, name)})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def finetune_options(recipe: FinetuneRecipe, seed: int) -> WarmupOptions:
    """The training loop's options for ``recipe``: the fine-tune is the warm-up's loop on D ∪ S."""
    t_mod = recipe.lora_target_modules.strip()
    return WarmupOptions(
        r=recipe.lora_r,
        alpha=recipe.lora_alpha,
        dropout=0.0,
        target_modules=t_mod if t_mod == "all-linear" else [m.strip() for m in t_mod.split(",") if m.strip()],
        epochs=recipe.epochs,
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        seed=seed,
    )


def finetune(model_name: str, examples: Sequence, recipe: FinetuneRecipe, rt: Runtime, seed: int, desc: str = "fine-tune"):
    """Train a fresh LoRA adapter on ``examples`` (tokenized D ∪ S); returns (model, summary)."""
    recipe.validate()
    t = time.perf_counter()
    model = load_model(model_name, rt.model_dtype, rt.device)
    opts = finetune_options(recipe, seed)
    model = add_lora(model, opts)
    summary = warmup(model, examples, opts, rt, desc=desc)
    summary["tokens"] = int(round(sum(len(e.input_ids) for e in examples) * recipe.epochs))
    summary["seconds_total"] = time.perf_counter() - t
    return model, summary
