"""Length-sorted batching and collation.

Batches are built from examples sorted by length so that padding is small, and capped both
in examples and in padded tokens, so that one long example cannot blow the memory budget.
Every batch carries the example indices, so results are put back in input order and never
depend on how examples were grouped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Batch", "make_batches", "collate", "iter_batches"]


@dataclass
class Batch:
    index: torch.Tensor  # (B,) positions of the examples in the caller's list
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens
    position_ids: torch.Tensor  # (B, L) 0.. on real tokens, so left padding does not shift positions
    target_mask: torch.Tensor  # (B, L) 1 at positions t whose logit predicts a trained token t+1
    labels: torch.Tensor  # (B, L) token id at trained tokens, -100 elsewhere (HF shift convention)
    n_tokens: int  # real tokens in the batch

    def to(self, device) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return Batch(
            self.index, move(self.input_ids), move(self.attention_mask), move(self.position_ids), move(self.target_mask), move(self.labels), self.n_tokens
        )


def make_batches(
    lengths: Sequence[int],
    batch_size: int,
    max_tokens: int | None = None,
    sort: bool = True,
    fits: Callable[[int, int, int], bool] | None = None,
    trained: Sequence[int] | None = None,
) -> list[list[int]]:
    """Group example indices into batches of at most ``batch_size`` examples and
    ``max_tokens`` padded tokens (B * longest). Sorted longest first, so a batch that does not
    fit in memory shows up at the start of a run rather than hours in; ties keep input order.

    ``fits(B, L, N)``, when given, must also hold for every batch of two or more examples
    (B examples, longest L, N trained tokens from ``trained``): the memory budget
    (:mod:`ntkselect.model.memory`)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if sort else list(range(len(lengths)))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = cur_trained = 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        new_trained = cur_trained + (trained[i] if trained is not None else 0)
        if cur and (
            len(cur) >= batch_size
            or (max_tokens is not None and new_max * (len(cur) + 1) > max_tokens)
            or (fits is not None and not fits(len(cur) + 1, new_max, new_trained))
        ):
            batches.append(cur)
            cur, new_max, new_trained = [], lengths[i], (trained[i] if trained is not None else 0)
        cur.append(i)
        cur_max, cur_trained = new_max, new_trained
    if cur:
        batches.append(cur)
    return batches


def collate(examples: Sequence, index: Sequence[int], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad ``examples`` (objects with ``input_ids`` and ``train_mask``) into one batch."""
    B = len(examples)
    L = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    target_mask = torch.zeros((B, L), dtype=torch.float32)
    labels = torch.full((B, L), -100, dtype=torch.long)
    n_tokens = 0
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        off = L - n if padding_side == "left" else 0
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        train = torch.tensor(e.train_mask, dtype=torch.bool)
        train[0] = False  # nothing predicts the first token
        input_ids[b, off : off + n] = ids
        attention_mask[b, off : off + n] = 1
        position_ids[b, off : off + n] = torch.arange(n)
        labels[b, off : off + n] = torch.where(train, ids, torch.full_like(ids, -100))
        # the logit at t predicts token t+1: shift the trained-token mask left by one
        target_mask[b, off : off + n - 1] = train[1:].float()
        n_tokens += n
    return Batch(torch.as_tensor(list(index), dtype=torch.long), input_ids, attention_mask, position_ids, target_mask, labels, n_tokens)


def iter_batches(examples: Sequence, batches: list[list[int]], pad_id: int, padding_side: str = "right") -> Iterator[Batch]:
    for idx in batches:
        yield collate([examples[i] for i in idx], idx, pad_id, padding_side)
