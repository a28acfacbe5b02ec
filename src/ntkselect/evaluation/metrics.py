"""Multiple-choice evaluation by option log-likelihood (no generation).

Each test item is a prompt and a list of option continuations (the letters "A".."D" for
MMLU-style questions, "yes"/"no"/"maybe" for PubMedQA-style ones). The prompt is rendered
exactly as training renders a prompt/response record (the chat template's user turn and
generation prompt, or ``prompt + "\\n"`` with the plain template), so the model is asked the
way it was taught. The score of option o is log p(o | prompt), summed over o's tokens; the
prediction is the best-scoring option (ties: the first). One code path serves every method.

When every option of an item is a single token (MMLU letters), one forward pass of the prompt
scores all options at once; otherwise each option is scored as its own continuation. Both give
the same numbers (tested).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ntkselect.data.batching import collate, make_batches
from ntkselect.data.records import Record, location, prompt_response, render_ids, resolve_template, token_ids
from ntkselect.errors import NtkSelectError
from ntkselect.model.lm import decoder_of, trained_logits
from ntkselect.model.runtime import Runtime, run_batches
from ntkselect.progress import Progress
from ntkselect.training.warmup import per_example_loss_and_logits

__all__ = [
    "MCItem",
    "MCResult",
    "mc_items",
    "is_mc_record",
    "option_loglikelihoods",
    "evaluate_mc",
    "LossResult",
    "heldout_loss",
    "loss_pass_probes",
    "mc_from_probes",
]

_LETTER_LINE = re.compile(r"^\s*([A-J])[.)]\s", re.MULTILINE)


@dataclass
class MCItem:
    id: str
    prompt: str
    options: list[str]  # the continuations scored, e.g. ["A", "B", "C", "D"]
    answer: int  # index into options
    group: str = ""  # subject, for per-group accuracy


@dataclass
class MCResult:
    ids: list[str]
    loglik: list[np.ndarray]  # per item, (n_options,) float64 log p(option | prompt)
    pred: np.ndarray  # (n,) int
    answer: np.ndarray  # (n,) int
    seconds: float
    tokens: int

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.answer

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.pred) else float("nan")


def _item(rec: Record) -> MCItem:
    raw, where = rec.raw, location(rec.path, rec.line)
    prompt = raw.get("prompt") or raw.get("question")
    if prompt is None and "instruction" in raw and "output" in raw:
        prompt = prompt_response(raw)[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise NtkSelectError(f"{where}: a test item needs a non-empty 'prompt' (or 'question'); it has fields {', '.join(sorted(raw))}")
    options = raw.get("options", raw.get("choices"))
    answer = raw.get("answer", raw.get("label"))
    if options is None:
        letters = _LETTER_LINE.findall(prompt)
        if isinstance(answer, str) and answer.strip().lower() in ("yes", "no", "maybe"):
            options = ["yes", "no", "maybe"]
        elif len(letters) >= 2 and letters == [chr(ord("A") + i) for i in range(len(letters))]:
            options = letters
        else:
            raise NtkSelectError(
                f"{where}: no 'options' list and none can be read from the prompt (lettered lines 'A. ...' or a yes/no/maybe answer); "
                'add an \'options\' field, e.g. ["A", "B", "C", "D"]'
            )
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise NtkSelectError(f"{where}: 'options' must be a list of at least two non-empty strings")
    if isinstance(answer, bool) or answer is None:
        raise NtkSelectError(f"{where}: a test item needs an 'answer': an option index, an option text or a letter")
    if isinstance(answer, int):
        idx = answer
    elif isinstance(answer, str) and answer.strip() in options:
        idx = options.index(answer.strip())
    elif isinstance(answer, str) and answer.strip().lower() in [o.lower() for o in options]:
        idx = [o.lower() for o in options].index(answer.strip().lower())
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper().isalpha():
        idx = ord(answer.strip().upper()) - ord("A")
    else:
        raise NtkSelectError(f"{where}: answer {answer!r} is not one of the options {options} nor a letter")
    if not 0 <= idx < len(options):
        raise NtkSelectError(f"{where}: answer {answer!r} points outside the {len(options)} options")
    return MCItem(id=rec.id, prompt=prompt, options=list(options), answer=int(idx), group=str(raw.get("subject", raw.get("source", ""))))


def is_mc_record(rec: Record) -> bool:
    """Whether a test record is scored for accuracy as well as loss: it names its ``options``
    (or ``choices``), or its prompt has lettered option lines and it has an ``answer``. A record
    that names options must parse (:func:`mc_items` then says what is wrong)."""
    raw = rec.raw
    if "options" in raw or "choices" in raw:
        return True
    try:
        _item(rec)
    except NtkSelectError:
        return False
    return True


def mc_items(records: Sequence[Record]) -> list[MCItem]:
    """Test records -> items. A record needs a prompt and an answer; options come from its
    ``options`` (or ``choices``) list, else from lettered lines in the prompt, else yes/no/maybe."""
    return [_item(r) for r in records]


def _context_ids(tokenizer, prompt: str, template: str) -> list[int]:
    # the same tokens tokenize_record puts before a response (data.py)
    if template == "chat":
        return render_ids(tokenizer, [{"role": "user", "content": prompt}], True, "test item")
    return token_ids(tokenizer, prompt + "\n", special=True)


def _forward_positions(model, seqs: list[list[int]], positions: list[list[int]], rt: Runtime, pad_id: int) -> list[torch.Tensor]:
    """Log-softmax rows (len(positions[b]), V) at the requested positions of each sequence.

    Right padding with explicit position ids; the LM head runs only at the requested
    positions, so no (B, L, V) tensor is formed."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        att[b, : len(s)] = 1
    pos_ids = (att.cumsum(1) - 1).clamp_min(0)
    ids, att, pos_ids = ids.to(rt.device), att.to(rt.device), pos_ids.to(rt.device)
    with rt.autocast():
        h = decoder_of(model)(input_ids=ids, attention_mask=att, position_ids=pos_ids, use_cache=False).last_hidden_state  # (B, L, d)
    rows = torch.tensor([b for b, p in enumerate(positions) for _ in p], device=h.device)
    cols = torch.tensor([t for p in positions for t in p], device=h.device)
    with rt.autocast():
        logits = trained_logits(model, h[rows, cols])  # (N, V) the model's own logits (soft-capping, scaling included)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return list(logp.split([len(p) for p in positions]))


@torch.no_grad()
def option_loglikelihoods(
    model,
    tokenizer,
    items: Sequence[MCItem],
    rt: Runtime,
    template: str = "auto",
    max_length: int = 2048,
    single_token_fast_path: bool = True,
    desc: str = "evaluate",
) -> tuple[list[np.ndarray], int]:
    """Per item (n_options,) float64 log p(option | prompt); also the number of tokens run."""
    template = resolve_template(tokenizer, template)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    jobs = []  # (item index, option indices, token sequence, positions, target ids per position)
    for i, it in enumerate(items):
        ctx = _context_ids(tokenizer, it.prompt, template)
        opts = [token_ids(tokenizer, o, special=False) for o in it.options]
        if any(not o for o in opts):
            raise NtkSelectError(f"test item {it.id!r}: an option tokenizes to nothing")
        if single_token_fast_path and all(len(o) == 1 for o in opts):
            ctx = ctx[-max_length:]
            jobs.append((i, list(range(len(opts))), ctx, [len(ctx) - 1], [[o[0] for o in opts]]))
        else:
            for k, o in enumerate(opts):
                c = ctx[-max(1, max_length - len(o)) :]  # keep the end of a long prompt
                seq = c + o
                jobs.append((i, [k], seq, list(range(len(c) - 1, len(seq) - 1)), [[t] for t in o]))
    out = [np.zeros(len(it.options)) for it in items]
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][2]))  # length-sorted batches
    prog = Progress(desc, len(jobs), enabled=rt.progress)
    tokens = 0
    s = 0
    while s < len(order):
        # token budget per batch: (longest sequence) x (batch) <= max_batch_tokens
        longest = len(jobs[order[s]][2])
        bsz = max(1, min(rt.batch_size, rt.max_batch_tokens // max(1, longest)))
        chunk = [jobs[j] for j in order[s : s + bsz]]
        s += len(chunk)
        rows = _forward_positions(model, [c[2] for c in chunk], [c[3] for c in chunk], rt, pad)
        for (i, ks, seq, _, targets), lp in zip(chunk, rows):  # lp: (n_positions, V)
            tokens += len(seq)
            if len(ks) > 1:  # fast path: one position, every option's single token
                out[i][ks] = lp[0, targets[0]].double().cpu().numpy()  # targets[0]: every option's token
            else:
                out[i][ks[0]] = float(sum(lp[p, t[0]].item() for p, t in enumerate(targets)))
        prog.update(len(chunk), sum(len(c[2]) for c in chunk))
    prog.close()
    return out, tokens


def evaluate_mc(model, tokenizer, items: Sequence[MCItem], rt: Runtime, template: str = "auto", max_length: int = 2048, desc: str = "evaluate") -> MCResult:
    t = time.perf_counter()
    ll, tokens = option_loglikelihoods(model, tokenizer, items, rt, template, max_length, desc=desc)
    pred = np.array([int(np.argmax(x)) for x in ll], dtype=np.int64)  # argmax: the first of equal scores
    return MCResult(
        ids=[it.id for it in items],
        loglik=ll,
        pred=pred,
        answer=np.array([it.answer for it in items], dtype=np.int64),
        seconds=time.perf_counter() - t,
        tokens=tokens,
    )


@dataclass
class LossResult:
    ids: list[str]
    loss: np.ndarray  # (n,) float64 mean NLL per trained token of each test record
    tokens: np.ndarray  # (n,) int64 trained tokens per record (the terms of its mean)
    seconds: float
    probes: dict[int, np.ndarray] = field(default_factory=dict)  # example index -> (k,) float64 log p of the probed tokens

    @property
    def mean(self) -> float:
        """The mean over records of each record's per-token NLL (every record weighs the same)."""
        return float(self.loss.mean()) if len(self.loss) else float("nan")


@torch.no_grad()
def heldout_loss(
    model,
    examples: Sequence,
    rt: Runtime,
    ids: Sequence[str] | None = None,
    desc: str = "held-out loss",
    probes: dict[int, tuple[int, list[int]]] | None = None,
) -> LossResult:
    """Each example's mean negative log-likelihood per trained token, over exactly the tokens
    the training convention trains on (``TokenizedExample.train_mask``: the response of a
    prompt/response or chat record, every token of a text record), with the model's full
    log-softmax at those positions. Batches are length-sorted and capped by ``rt``; results are
    put back in input order, so they do not depend on batching or padding (tested).

    ``probes`` {example index: (position t, token ids)}: also log p(token | the example's first
    t + 1 tokens) for each token, from the same pass (t must predict a trained token; see
    :func:`loss_pass_probes`)."""
    t0 = time.perf_counter()
    model.eval()
    probes = probes or {}
    out = np.zeros(len(examples), dtype=np.float64)
    ntok = np.array([sum(e.train_mask[1:]) for e in examples], dtype=np.int64)
    got: dict[int, np.ndarray] = {}
    batches = make_batches([len(e.input_ids) for e in examples], rt.batch_size, rt.max_batch_tokens)
    prog = Progress(desc, len(examples), enabled=rt.progress)

    def one(idx: list[int]) -> None:  # one batch; an out-of-memory error splits it (run_batches)
        batch = collate([examples[i] for i in idx], idx, rt.pad_id, rt.padding_side).to(rt.device)
        with rt.autocast():
            loss, logits = per_example_loss_and_logits(model, batch)  # (B,) token-mean NLL of each example; (N, V)
        mine: dict[int, np.ndarray] = {}
        if any(i in probes for i in idx):
            first = np.concatenate([[0], np.cumsum(ntok[idx])[:-1]])  # each example's first row of logits
            for b, i in enumerate(idx):
                if i in probes:
                    t, toks = probes[i]
                    row = int(first[b]) + int(sum(examples[i].train_mask[1 : t + 1]))  # trained positions before t
                    mine[i] = torch.log_softmax(logits[row].float(), dim=-1)[toks].double().cpu().numpy()
        out[np.asarray(idx)] = loss.double().cpu().numpy()  # written only once the batch has succeeded
        got.update(mine)
        prog.update(len(batch.index), batch.n_tokens)

    run_batches(batches, one, rt.device, desc, lambda i: f"test record {ids[i]!r}" if ids is not None else f"test record #{i}")
    prog.close()
    ids = list(ids) if ids is not None else [str(i) for i in range(len(examples))]
    return LossResult(ids=ids, loss=out, tokens=ntok, seconds=time.perf_counter() - t0, probes=got)


def loss_pass_probes(tokenizer, items: Sequence[MCItem], examples: Sequence, template: str, max_length: int) -> dict[int, tuple[int, list[int]]]:
    """{item index: (position, option token ids)} for the items whose option log-likelihoods the
    held-out loss pass of ``examples`` (aligned with ``items``) already computes: every option is
    one token, and the example starts with exactly the context :func:`option_loglikelihoods`
    scores the options after, followed by a trained token (an MMLU record whose response is
    "B. ..."). Their log p(option | prompt) is then the same number from the same prefix."""
    template = resolve_template(tokenizer, template)
    out = {}
    for i, (it, ex) in enumerate(zip(items, examples)):
        ctx = _context_ids(tokenizer, it.prompt, template)
        opts = [token_ids(tokenizer, o, special=False) for o in it.options]
        ids = list(ex.input_ids)
        n = len(ctx)
        if n <= max_length and all(len(o) == 1 for o in opts) and len(ids) > n and ids[:n] == ctx and ex.train_mask[n]:
            out[i] = (n - 1, [o[0] for o in opts])
    return out


def mc_from_probes(items: Sequence[MCItem], loglik: Sequence[np.ndarray], seconds: float = 0.0, tokens: int = 0) -> MCResult:
    """The :class:`MCResult` of option log-likelihoods (argmax: the first of equal scores)."""
    pred = np.array([int(np.argmax(x)) for x in loglik], dtype=np.int64)
    return MCResult(
        ids=[it.id for it in items],
        loglik=list(loglik),
        pred=pred,
        answer=np.array([it.answer for it in items], dtype=np.int64),
        seconds=seconds,
        tokens=tokens,
    )
