"""Diagnostics: does the NTK-like assumption hold for this model and domain?

NTK-Selector rests on two empirical claims (Wang et al., Fig. 2): during LoRA fine-tuning the
kernel barely turns, and the Jacobian-free kernel Θ̃ is a good stand-in for the multi-output NTK
because gradients of different outputs are nearly orthogonal. :func:`diagnose` measures both on a
probe set, and how well kernel regression with the empirical NTK does next to fine-tuning:

* **kernel stability**: LoRA is fine-tuned on D's training part for a few epochs; at every
  checkpoint (the first is the fresh adapter, before any step) the probe kernel K_t = Φ_t Φ_tᵀ,
  Φ_t = φ(g_t(x)) on a sample of D and of C, is compared with K_0 by cos_F(K_t, K_0) =
  ⟨K_t, K_0⟩_F / (‖K_t‖_F ‖K_0‖_F), and the candidates' mean-kernel scores s_j = mean_i K_t[i, j]
  by Spearman's rank correlation (the statistic the selection depends on).
* **the Jacobian-free approximation**: with F_k(x) = (1/T) Σ_t logit[t, k] the exact kernel is
  the V×V matrix Θ(x, x') = J(x) J(x')ᵀ, J(x) = [∇F_k(x)]_k. Its trace Σ_k ⟨∇F_k(x), ∇F_k(x')⟩
  is set against Θ̃(x, x') = ⟨Σ_k ∇F_k(x), Σ_k ∇F_k(x')⟩ = trace + Σ_{k≠k'} ⟨∇F_k(x), ∇F_k'(x')⟩,
  and the signed cosines cos(∇F_k(x), ∇F_k'(x)), k ≠ k', are summarised next to d^{-1/2}.
  Because logit[t, k] = h_t · w_k + b_k, ∇F_k(x) = H(x)ᵀ w_k with H(x) = ∇ (1/T) Σ_t h_t the
  (d, P) Jacobian of the mean hidden state. The *exact* route computes H(x) with d backward
  passes and gets the trace over all V outputs as ⟨WᵀW, H(x) H(x')ᵀ⟩; the *sampled* route
  computes ∇F_k for S outputs drawn uniformly without replacement and scales the sums to V
  (unbiased), which is what a 576-wide model on a CPU affords.
* **kernel regression** (the paper's Table 3): on labelled multiple-choice domain records
  (an ``answer`` letter A-D, as in the demo data) kernel ridge regression with the Jacobian-free
  eNTK of the question (f = Σ_k logit at the position that predicts the answer letter) and
  one-vs-rest ±1 targets, against the fine-tuned model's own accuracy (the letter with the
  highest logit after the prompt), at every checkpoint.

Everything goes to ``--out``: ``diagnostics.json`` (every number), ``kernels.npz`` (the probe
kernels), PNG plots and the LoRA checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ntkselect.config import check_limits, check_types
from ntkselect.data.batching import collate, make_batches
from ntkselect.data.records import Record, TokenizedExample, load_records, prompt_response, record_text, tokenize_record, tokenize_records
from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_replace_dir, atomic_write_json
from ntkselect.grads.fused import lora_parameters
from ntkselect.grads.projection import make_projector
from ntkselect.model.adapters import save_adapter
from ntkselect.model.heads import lm_head
from ntkselect.model.lm import causal_lm, final_hidden
from ntkselect.model.loading import MODEL_DTYPES, check_model_options, load_model, load_tokenizer, meta_model, resolve_model_dtype
from ntkselect.model.runtime import Runtime, resolve_device, resolve_precision
from ntkselect.progress import Progress
from ntkselect.report.html import new_figure, require_matplotlib, write_png
from ntkselect.runs.folder import DIAGNOSE, Run, check_paths, open_run
from ntkselect.runs.manifest import input_changed, read_manifest
from ntkselect.runs.preflight import check_model
from ntkselect.selection.ntk.outputs import output_gradients
from ntkselect.selection.ntk.stage2 import per_example_gradients, projected_features
from ntkselect.training.warmup import WarmupOptions, add_lora, warmup

__all__ = [
    "DiagnoseOptions",
    "diagnose",
    "cos_f",
    "spearman",
    "kernel_ridge",
    "kernel_ridge_loo",
    "output_gradients",
    "output_kernel_check",
    "multiple_choice_examples",
    "letter_accuracy",
]

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")


def _opt(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DiagnoseOptions:
    out: str = _opt("", "folder for diagnostics.json, kernels.npz, the PNG plots and checkpoints/", required=True)
    domain: str = _opt("", "domain examples D; labelled multiple-choice records (an 'answer' letter A-D, as in the demo data) also give the kernel regression")
    pool: str = _opt("", "candidate pool C")
    run: str = _opt(
        "", "a selection run folder: take --domain, --pool, --model, --max-length, --template and the LoRA settings from its manifest.json (explicit flags win)"
    )
    model: str = _opt("default", "Hugging Face causal-LM folder or cached name; 'default' = embedded SmolLM2-135M-Instruct")
    template: str = _opt("auto", "how prompt/response records are rendered", choices=("auto", "chat", "plain"))
    max_length: int = _opt(512, "maximum tokens per example")
    seed: int = _opt(0, "seed for the samples, the LoRA initialisation, the training order, the projection and the sampled outputs")
    overwrite: bool = _opt(False, "replace the diagnostics of an earlier run in --out")
    # -- probe set and fine-tuning ------------------------------------------------------
    n_domain: int = _opt(32, "domain examples in the probe set (sampled from D's training part)")
    n_candidates: int = _opt(64, "pool examples in the probe set (sampled uniformly from C)")
    epochs: float = _opt(3.0, "LoRA fine-tuning epochs on D's training part")
    checkpoints_per_epoch: int = _opt(1, "checkpoints per epoch (one more is taken before the first step)")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA alpha")
    lora_target_modules: str = _opt("all-linear", "comma-separated module names to adapt, or all-linear")
    lr: float = _opt(2e-4, "fine-tuning learning rate (AdamW, linear decay)")
    train_batch_size: int = _opt(8, "fine-tuning batch size")
    proj_dim: int = _opt(8192, "Rademacher projection of the probe and regression kernels (the paper's 8192); 0 = the exact kernel")
    # -- Jacobian-free approximation ----------------------------------------------------
    jf_examples: int = _opt(6, "examples for the exact-kernel check (half from the domain probe, half from the candidates)")
    jf_outputs: int = _opt(32, "vocabulary outputs sampled per example (sampled route), or whose pairwise cosines are read off (exact route: at least 256)")
    jf_method: str = _opt(
        "auto",
        "exact: all V outputs via the d x P hidden-state Jacobian (d backward passes per example); "
        "sampled: --jf-outputs outputs drawn uniformly, sums scaled to V (unbiased); auto: exact when d <= --jf-outputs",
        choices=("auto", "exact", "sampled"),
    )
    # -- kernel regression --------------------------------------------------------------
    n_test: int = _opt(32, "labelled domain questions held out of the fine-tuning for the kernel regression and the model's accuracy (0 = skip)")
    krr_train: int = _opt(64, "labelled training questions for the kernel regression (from D's training part)")
    ridges: str = _opt(
        "1e-4,1e-3,1e-2,1e-1,1", "ridge values relative to the mean kernel diagonal; the one with the best leave-one-out training accuracy is used"
    )
    # -- execution ----------------------------------------------------------------------
    batch_size: int = _opt(16, "examples per batch for gradients and evaluation")
    max_batch_tokens: int = _opt(8192, "padded tokens per batch")
    precision: str = _opt("auto", "matmul precision: auto, float32 or bfloat16; reductions stay float32", choices=("auto", "float32", "bfloat16"))
    model_dtype: str = _opt(
        "auto", "dtype of the model's weights: auto (the checkpoint's own on CUDA, float32 on a CPU), bfloat16, float16 or float32", choices=MODEL_DTYPES
    )
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    threads: int = _opt(0, "CPU threads for torch (0 = torch's default)")

    def validate(self) -> DiagnoseOptions:
        def bad(name: str, why: str) -> NtkSelectError:
            return NtkSelectError(f"--{name.replace('_', '-')}: {why} (got {getattr(self, name)!r})")

        check_types(self)
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise bad(f.name, f"must be one of {', '.join(choices)}")
        if not self.out:
            raise NtkSelectError("--out is required")
        if not (self.domain and self.pool):
            raise NtkSelectError("--domain and --pool are required (or --run with a selection run folder)")
        for name in (
            "n_domain",
            "n_candidates",
            "checkpoints_per_epoch",
            "lora_r",
            "train_batch_size",
            "jf_examples",
            "jf_outputs",
            "krr_train",
            "batch_size",
            "max_batch_tokens",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        if self.jf_examples < 2:
            raise bad("jf_examples", "must be at least 2 (one domain example and one candidate)")
        if self.jf_outputs < 2:
            raise bad("jf_outputs", "must be at least 2 (cosines need pairs of outputs)")
        if self.jf_outputs > 4096:
            raise bad("jf_outputs", "must be at most 4096 (the cosines of S outputs take S x S numbers per example)")
        if self.n_test < 0:
            raise bad("n_test", "must be >= 0")
        if self.max_length < 2:
            raise bad("max_length", "must be at least 2 tokens")
        if self.max_batch_tokens < self.max_length:
            raise bad("max_batch_tokens", f"must be at least --max-length ({self.max_length})")
        if not self.epochs > 0:
            raise bad("epochs", "must be positive: the kernel is followed during fine-tuning")
        if self.lr <= 0 or self.lora_alpha <= 0:
            raise bad("lr" if self.lr <= 0 else "lora_alpha", "must be positive")
        if self.proj_dim < 0 or self.proj_dim % 8:
            raise bad("proj_dim", "must be 0 (exact) or a positive multiple of 8")
        if self.seed < 0 or self.threads < 0:
            raise bad("seed" if self.seed < 0 else "threads", "must be >= 0")
        if not self.lora_target_modules.strip() or not self.target_modules():
            raise bad("lora_target_modules", "must name modules or be all-linear")
        self.ridge_values()
        check_limits(self)
        return self

    def ridge_values(self) -> list[float]:
        try:
            vals = [float(v) for v in self.ridges.split(",") if v.strip()]
        except ValueError:
            vals = []
        if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
            raise NtkSelectError(f"--ridges: expected comma-separated positive numbers (got {self.ridges!r})")
        return vals

    def target_modules(self) -> str | list[str]:
        t = self.lora_target_modules.strip()
        return t if t == "all-linear" else [m.strip() for m in t.split(",") if m.strip()]

    @classmethod
    def from_run(cls, run_dir: str, **given) -> DiagnoseOptions:
        """Options for the data and model of a selection run; ``given`` (non-default) values win."""
        manifest = read_manifest(run_dir, flag="--run")  # a damaged run is refused in one line
        cfg = manifest["config"]
        mapping = {
            "domain": "domain",
            "pool": "pool",
            "model": "model",
            "max_length": "max_length",
            "template": "template",
            "lora_r": "lora_r",
            "lora_alpha": "lora_alpha",
            "lora_target_modules": "lora_target_modules",
        }
        defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        kw = {mine: cfg[theirs] for mine, theirs in mapping.items() if cfg.get(theirs) not in (None, "")}
        kw.update({k: v for k, v in given.items() if v is not None and (k not in kw or v != defaults.get(k))})
        for name in ("domain", "pool"):  # the run's inputs, unless given: they must be the files the run read
            if kw.get(name) != cfg.get(name):
                continue
            where = (manifest["inputs"].get(name) or {}).get("path")
            if where and not os.path.exists(kw[name]) and os.path.exists(where):  # a relative path, from another folder
                kw[name] = where
            if (why := input_changed(manifest, name, kw[name])) is not None:
                raise NtkSelectError(f"--run {run_dir}: the --{name} of the run, {why}; restore it, or pass --{name} to diagnose another file")
        return cls(**{**kw, "run": str(run_dir)})


# -- small numerical pieces ---------------------------------------------------------------


def cos_f(a: np.ndarray, b: np.ndarray) -> float:
    """⟨A, B⟩_F / (‖A‖_F ‖B‖_F); nan when either matrix is zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"kernels of different shapes {a.shape} and {b.shape}")
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the tie-averaged ranks); nan when a
    side is constant."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("spearman needs two 1-D arrays of the same length")
    ra, rb = _ranks(x) - (len(x) + 1) / 2, _ranks(y) - (len(y) + 1) / 2
    den = math.sqrt((ra @ ra) * (rb @ rb))
    return float(ra @ rb / den) if den > 0 else float("nan")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64) - np.mean(a), np.asarray(b, np.float64) - np.mean(b)
    den = math.sqrt((a @ a) * (b @ b))
    return float(a @ b / den) if den > 0 else float("nan")


def kernel_ridge(k_train: np.ndarray, y: np.ndarray, k_test: np.ndarray, ridge: float) -> np.ndarray:
    """Kernel ridge regression: α = (K + λI)⁻¹ Y, predictions K_test α.

    k_train (n, n), y (n, c), k_test (m, n) -> (m, c)."""
    k_train = np.asarray(k_train, np.float64)
    alpha = np.linalg.solve(k_train + ridge * np.eye(len(k_train)), np.asarray(y, np.float64))  # (n, c)
    return np.asarray(k_test, np.float64) @ alpha


def kernel_ridge_loo(k_train: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """(n, c) leave-one-out predictions of kernel ridge regression, in closed form:
    ŷ_{-i} = y_i - α_i / [(K + λI)⁻¹]_ii."""
    k_train = np.asarray(k_train, np.float64)
    inv = np.linalg.inv(k_train + ridge * np.eye(len(k_train)))  # (n, n)
    y = np.asarray(y, np.float64)
    return y - (inv @ y) / np.diag(inv)[:, None]


def _one_vs_rest(labels: np.ndarray, c: int) -> np.ndarray:
    y = -np.ones((len(labels), c))
    y[np.arange(len(labels)), labels] = 1.0
    return y


# -- multiple-choice questions -------------------------------------------------------------


@dataclass
class MultipleChoice:
    examples: list[TokenizedExample]  # prompt + letter "A"; only the letter is a trained token, so f is read at the position before it
    letter_ids: list[int]  # (4,) token ids of " A".." D" as they follow the prompt under the template
    labels: np.ndarray  # (n,) int 0..3


def _label(raw: dict) -> int | None:
    ans = raw.get("answer")
    if isinstance(ans, str) and ans.strip().upper() in LETTERS and len(ans.strip()) == 1:
        try:
            prompt_response(raw)
        except Exception:
            return None
        return LETTERS.index(ans.strip().upper())
    return None


def multiple_choice_examples(records: Sequence[Record], tokenizer, max_length: int, template: str) -> MultipleChoice:
    """Each labelled record as its prompt followed by the answer letter, rendered with the
    selection's template; the letter is the only trained token, so the summed logit (and its
    gradient) is read at the last prompt position, which never sees the answer."""
    examples, labels, letter_ids = [], [], None
    for rec in records:
        prompt, _ = prompt_response(rec.raw)
        variants = [tokenize_record(Record(rec.id, {"prompt": prompt, "response": L}, rec.path, rec.line), tokenizer, max_length, template) for L in LETTERS]
        firsts = [v.train_mask.index(True) for v in variants]
        prefix = variants[0].input_ids[: firsts[0]]
        if any(f != firsts[0] or v.input_ids[:f] != prefix for v, f in zip(variants, firsts)):
            raise NtkSelectError(f"{rec.path}:{rec.line}: the answer letters change the tokens of the prompt under this template; use --template plain")
        ids = [v.input_ids[f] for v, f in zip(variants, firsts)]
        if len(set(ids)) != len(LETTERS):
            raise NtkSelectError(f"{rec.path}:{rec.line}: the answer letters A-D do not start with distinct tokens under this tokenizer")
        if letter_ids is None:
            letter_ids = ids
        elif ids != letter_ids:
            raise NtkSelectError(f"{rec.path}:{rec.line}: the answer letters tokenise differently from the first question's")
        examples.append(TokenizedExample(input_ids=prefix + [ids[0]], train_mask=[False] * len(prefix) + [True], truncated=variants[0].truncated))
        labels.append(_label(rec.raw))
    return MultipleChoice(examples, letter_ids or [], np.asarray(labels, dtype=np.int64))


@torch.no_grad()
def letter_accuracy(model, mc: MultipleChoice, rt: Runtime) -> tuple[float, np.ndarray]:
    """The model's accuracy (and its (n,) predictions): the letter whose logit is highest at the
    position after the prompt."""
    model.eval()
    spec = lm_head(model)
    head = spec.module
    w = head.weight.detach()[mc.letter_ids].float()  # (4, d)
    b = head.bias.detach()[mc.letter_ids].float() if head.bias is not None else torch.zeros(len(mc.letter_ids))
    pred = np.zeros(len(mc.examples), dtype=np.int64)
    for idx in make_batches([len(e.input_ids) for e in mc.examples], rt.batch_size, rt.max_batch_tokens):
        batch = collate([mc.examples[i] for i in idx], idx, rt.pad_id, rt.padding_side).to(rt.device)
        with rt.autocast():
            h = final_hidden(model, batch)  # (B, L, d)
        pos = batch.target_mask.bool()  # (B, L): one position per example
        logits = spec.post(h[pos].float() @ w.to(h.device).T + b.to(h.device))  # (B, 4) the model's own logits
        pred[batch.index.numpy()] = logits.argmax(-1).cpu().numpy()
    return float((pred == mc.labels).mean()) if len(pred) else float("nan"), pred


# -- gradients of individual outputs --------------------------------------------------------


def _head_matrix(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (V, d) float32 with any logit scale applied, w̄ = Σ_k w_k (d,)); for a soft-capped head
    the raw rows (the scale is part of its post-processing)."""
    head = lm_head(model).frozen()  # the same checks as stage 2 (linear, frozen)
    W = head.module.weight.detach().float().cpu()
    if head.linear:
        W = W * head.factor()
    return W, W.sum(0)


def _cosine_stats(c: np.ndarray, d: int, p: int, bins: int = 40) -> dict:
    c = np.asarray(c, np.float64)
    hist, edges = np.histogram(c, bins=bins, range=(-1.0, 1.0))
    return {
        "pairs": int(c.size),
        "mean": float(c.mean()),
        "std": float(c.std()),
        "mean_abs": float(np.abs(c).mean()),
        "quantiles": {str(q): float(np.quantile(c, q)) for q in (0.01, 0.1, 0.5, 0.9, 0.99)},
        "d": d,
        "d_inv_sqrt": 1 / math.sqrt(d),
        "P": p,
        "P_inv_sqrt": 1 / math.sqrt(p),
        "histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
    }


def output_kernel_check(
    model,
    examples: Sequence[TokenizedExample],
    rt: Runtime,
    method: str = "auto",
    outputs: int = 32,
    seed: int = 0,
    names: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Trace of the exact multi-output kernel against Θ̃ for every pair of ``examples``, and the
    cross-output gradient cosines within each example (see the module docstring)."""
    W, wbar = _head_matrix(model)  # (V, d), (d,)
    V, d = W.shape
    head = lm_head(model)
    method = ("exact" if d <= outputs and head.linear else "sampled") if method == "auto" else method
    if method == "exact" and not head.linear:  # the exact route needs logit_k = h·w_k (the preflight says so first)
        raise NtkSelectError(f"--jf-method exact needs a linear LM head, but {head.model_name} soft-caps its logits; use --jf-method sampled (or auto)")
    capped = None if head.linear else head
    bias = head.module.bias.detach().float().cpu() if capped is not None and head.module.bias is not None else None
    n = len(examples)
    g = per_example_gradients(model, examples, rt).double()  # (n, P) Jacobian-free gradients
    P = g.shape[1]
    theta = (g @ g.T).numpy()  # (n, n) Θ̃, exact
    rng = np.random.default_rng(seed)
    prog = Progress("diagnose: output gradients", n, enabled=progress)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"method": method, "V": V, "d": d, "P": P, "examples": n}
    if method == "exact":
        # H(x): (d, P) for every example; the trace over all V outputs is ⟨WᵀW, H(x) H(x')ᵀ⟩
        H = []
        for ex in examples:
            H.append(output_gradients(model, ex, torch.eye(d), rt).double())
            prog.update(1, len(ex.input_ids) * d)
        WtW = W.double().T @ W.double()  # (d, d)
        M = [[H[i] @ H[j].T for j in range(n)] for i in range(n)]  # (d, d) blocks
        trace = np.array([[float((WtW * M[i][j]).sum()) for j in range(n)] for i in range(n)])
        theta_via_h = np.array([[float(wbar.double() @ M[i][j] @ wbar.double()) for j in range(n)] for i in range(n)])
        s_cos = max(outputs, 256)
        ks = np.sort(rng.choice(V, size=min(s_cos, V), replace=False))
        Wk = W.double()[torch.from_numpy(ks)]  # (S, d)
        cos = []
        for i in range(n):
            gram = (Wk @ M[i][i] @ Wk.T).numpy()  # (S, S) ⟨∇F_k(x), ∇F_k'(x)⟩
            nrm = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
            c = gram / nrm[:, None] / nrm[None, :]
            cos.append(c[np.triu_indices(len(ks), 1)])
        info.update(
            outputs_sampled_for_cosines=len(ks),
            trace_estimator="exact over all V outputs: <W^T W, H(x) H(x')^T>",
            theta_tilde_via_jacobian_rel_err=float(np.abs(theta_via_h - theta).max() / max(np.abs(theta).max(), 1e-300)),
        )
        trace_se = np.zeros_like(trace)
    else:
        S = min(outputs, V)
        ks = np.sort(rng.choice(V, size=S, replace=False))
        Wk = W[torch.from_numpy(ks)]  # (S, d)
        bk = bias[torch.from_numpy(ks)] if bias is not None else None
        R = []
        for ex in examples:
            R.append(output_gradients(model, ex, Wk, rt, head=capped, bias=bk).double())  # (S, P)
            prog.update(1, len(ex.input_ids) * S)
        trace = np.zeros((n, n))
        trace_se = np.zeros((n, n))
        cos = []
        for i in range(n):
            for j in range(i, n):
                G = (R[i] @ R[j].T).numpy()  # (S, S) ⟨∇F_k(x_i), ∇F_k'(x_j)⟩
                terms = np.diag(G)
                fpc = 1 - S / V  # finite-population correction: sampling without replacement
                trace[i, j] = trace[j, i] = V * terms.mean()
                trace_se[i, j] = trace_se[j, i] = V * math.sqrt(fpc * terms.var(ddof=1) / S) if S > 1 else float("nan")
                if i == j:
                    nrm = np.sqrt(np.clip(terms, 1e-300, None))
                    cos.append((G / nrm[:, None] / nrm[None, :])[np.triu_indices(S, 1)])
        info.update(
            outputs_sampled=S,
            trace_estimator=f"unbiased: V/S x sum over S = {S} outputs drawn uniformly without replacement (seed {seed}); "
            "trace_se is its standard error (finite-population corrected); offdiag = theta_tilde - trace",
            outputs=ks.tolist(),
        )
    prog.close()
    info["seconds"] = time.perf_counter() - t0

    iu = np.triu_indices(n)  # pairs i <= j, the diagonal included
    off = np.triu_indices(n, 1)
    rel = (theta - trace) / np.abs(trace)
    dn_t, dn_k = np.sqrt(np.abs(np.diag(theta))), np.sqrt(np.abs(np.diag(trace)))
    norm_theta, norm_trace = theta / np.outer(dn_t, dn_t), trace / np.outer(dn_k, dn_k)
    pairs = []
    for i, j in zip(iu[0].tolist(), iu[1].tolist()):
        row: dict[str, Any] = {
            "i": int(i),
            "j": int(j),
            "theta_tilde": float(theta[i, j]),
            "trace": float(trace[i, j]),
            "offdiag": float(theta[i, j] - trace[i, j]),
            "relative_difference": float(rel[i, j]),
            "theta_over_trace": float(theta[i, j] / trace[i, j]),
        }
        if names is not None:
            row["names"] = [names[i], names[j]]
        if method == "sampled":
            row["trace_se"] = float(trace_se[i, j])
        pairs.append(row)
    cos_all = np.concatenate(cos)
    info.update(
        {
            "pairs": pairs,
            "relative_difference": {
                "median_abs": float(np.median(np.abs(rel[iu]))),
                "diagonal_median": float(np.median(rel[np.diag_indices(n)])),
                "off_diagonal_median": float(np.median(rel[off])) if n > 1 else None,
                "theta_over_trace_median": float(np.median((theta / trace)[iu])),
            },
            "normalised": {
                "what": "K(x,x') / sqrt(K(x,x) K(x',x')) for both kernels, over the off-diagonal pairs",
                "pearson": _pearson(norm_theta[off], norm_trace[off]) if n > 2 else None,
                "spearman": spearman(norm_theta[off], norm_trace[off]) if n > 2 else None,
                "max_abs_difference": float(np.abs(norm_theta[off] - norm_trace[off]).max()) if n > 1 else None,
            },
            "cross_output_cosine": _cosine_stats(cos_all, d, P),
            "cross_output_cosine_per_example": [{"mean": float(c.mean()), "std": float(c.std()), "mean_abs": float(np.abs(c).mean())} for c in cos],
        }
    )
    return info


# -- the run ------------------------------------------------------------------------------------


def _diagnose_inputs(opts: DiagnoseOptions) -> dict:
    model = opts.model if opts.model not in ("", "default") and Path(opts.model).is_dir() else None
    return {"--domain": opts.domain, "--pool": opts.pool, "--model": model}


def _check_memory(opts: DiagnoseOptions, n_lora: int, tokenizer) -> None:
    """Refuse, before any work, a Jacobian-free check whose gradients cannot fit in memory: the
    exact route keeps a d x P Jacobian per example, the sampled route S x P gradients."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    d = int(getattr(meta_model(opts.model).config, "hidden_size", 0) or 0)
    n = min(opts.jf_examples, opts.n_domain + opts.n_candidates)
    method = ("exact" if d <= opts.jf_outputs else "sampled") if opts.jf_method == "auto" else opts.jf_method
    rows = d if method == "exact" else min(opts.jf_outputs, len(tokenizer))
    need = 8 * n * rows * n_lora  # float64
    if need > 0.8 * total:
        raise NtkSelectError(
            f"--jf-examples {opts.jf_examples} / --jf-outputs {opts.jf_outputs}: the {method} Jacobian-free check would keep "
            f"{n} x {rows} x {n_lora} gradients ({need / 2**30:.0f} GiB, more than this machine's {total / 2**30:.0f} GiB); "
            "lower --jf-examples or --jf-outputs, use --jf-method sampled, or a smaller --lora-r"
        )


def _lock_out(opts: DiagnoseOptions, stack: contextlib.ExitStack, log: Callable[[str], None]) -> Run:
    """Lock --out, the first thing that touches it (runfolder.py); finished diagnostics are
    refused without --overwrite."""
    run = stack.enter_context(open_run(opts.out, DIAGNOSE, _diagnose_inputs(opts), log=log))
    if run.state == "finished" and not opts.overwrite:
        raise NtkSelectError(f"{run.out} already holds diagnostics (diagnostics.json); pass --overwrite to replace them or choose another --out")
    return run


def _prepare_out(run: Run, before_write=None) -> Run:
    """Decide where the diagnostics go in the locked --out: with --overwrite the new ones are
    written aside and swapped in once they are complete; the leftovers of an unfinished run
    (ntkselect's own) are cleared."""
    if before_write is not None:
        before_write()  # the preflight: after every refusal of --out, before anything is written to it
    if run.state == "finished":
        run.stage()
    else:
        run.in_place(clear=True)
    return run


def _features(model, examples, rt: Runtime, proj_dim: int, seed: int) -> np.ndarray:
    """(n, p) φ(g(x)), or (n, P) g(x) itself when proj_dim = 0 (the identity projection)."""
    dim = sum(p.numel() for _, p in lora_parameters(model))
    projector = make_projector(dim, proj_dim, seed, device=rt.device)
    chunk = min(max(1 << 30, 4 * dim * len(examples)), 4 << 30)  # one pass over the blocks when it fits in 4 GiB
    return np.asarray(projected_features(model, examples, projector, rt, chunk_bytes=chunk))


def _clean(obj):
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def diagnose(opts: DiagnoseOptions, log: Callable[[str], None] | None = None) -> dict:
    """Run every diagnostic; write ``diagnostics.json``, ``kernels.npz``, PNG plots and
    ``checkpoints/`` to ``opts.out``; return the diagnostics dict. Progress messages go to ``log``
    (default: this module's logger, at INFO)."""
    with contextlib.ExitStack() as stack:  # holds the lock on --out to the end (runfolder.py)
        return _diagnose(opts, log or logger.info, stack)


def _diagnose(opts: DiagnoseOptions, log, stack: contextlib.ExitStack) -> dict:
    opts.validate()
    require_matplotlib()
    check_paths(opts.out, DIAGNOSE, _diagnose_inputs(opts))
    run = _lock_out(opts, stack, log)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if opts.threads:
        torch.set_num_threads(opts.threads)
    rng = np.random.default_rng(opts.seed)

    # -- data ------------------------------------------------------------------------------
    t = time.perf_counter()
    domain, pool_all = load_records(opts.domain), load_records(opts.pool)
    seen = {record_text(r.raw) for r in domain}  # copies of domain records, and repeats of an earlier pool record, are left out (as in select)
    pool = []
    for r in pool_all:
        text = record_text(r.raw)
        if text not in seen:
            seen.add(text)
            pool.append(r)
    labelled = [r for r in domain if _label(r.raw) is not None]
    krr_note = None
    if opts.n_test == 0:
        krr_note = "--n-test 0"
    elif len(labelled) < opts.n_test + 8:
        krr_note = (
            f"{len(labelled)} of {len(domain)} domain records are labelled multiple-choice questions (an 'answer' letter A-D with a prompt); "
            f"need at least --n-test + 8 = {opts.n_test + 8}"
        )
    test_idx: list[int] = []
    if krr_note is None:
        lab_pos = [i for i, r in enumerate(domain) if _label(r.raw) is not None]
        test_idx = sorted(rng.choice(lab_pos, size=opts.n_test, replace=False).tolist())
    test_set = set(test_idx)
    train = [r for i, r in enumerate(domain) if i not in test_set]
    test = [domain[i] for i in test_idx]
    if len(train) < 2:
        raise NtkSelectError(
            f"--domain {opts.domain}: {len(train)} records left to fine-tune on after holding out --n-test {opts.n_test}; lower --n-test or add records"
        )
    if len(pool) < 2:
        raise NtkSelectError(f"--pool {opts.pool}: fewer than 2 usable records")
    dom_probe_idx = sorted(rng.choice(len(train), size=min(opts.n_domain, len(train)), replace=False).tolist())
    cand_idx = sorted(rng.choice(len(pool), size=min(opts.n_candidates, len(pool)), replace=False).tolist())
    tokenizer = load_tokenizer(opts.model)
    train_ex, train_stats = tokenize_records(train, tokenizer, opts.max_length, opts.template)
    cand_ex, _ = tokenize_records([pool[i] for i in cand_idx], tokenizer, opts.max_length, opts.template)
    dom_ex = [train_ex[i] for i in dom_probe_idx]
    probe = dom_ex + cand_ex
    n_d, n_c = len(dom_ex), len(cand_ex)
    mc_train = mc_test = None
    if krr_note is None:
        train_lab = [r for r in train if _label(r.raw) is not None]
        pick = sorted(rng.choice(len(train_lab), size=min(opts.krr_train, len(train_lab)), replace=False).tolist())
        mc_train = multiple_choice_examples([train_lab[i] for i in pick], tokenizer, opts.max_length, train_stats.template)
        mc_test = multiple_choice_examples(test, tokenizer, opts.max_length, train_stats.template)
        if mc_train.letter_ids != mc_test.letter_ids:
            raise NtkSelectError("the answer letters tokenise differently in the training and test questions")
    timings["load"] = time.perf_counter() - t
    n_lora = check_model_options(opts.model, opts.target_modules(), opts.lora_r, tokenizer=tokenizer)
    _check_memory(opts, n_lora, tokenizer)

    device = resolve_device(opts.device)
    model_dtype = resolve_model_dtype(opts.model_dtype, device, opts.model)
    rt = Runtime(
        device=device,
        dtype=resolve_precision(opts.precision, device, model_dtype),
        model_dtype=model_dtype,
        batch_size=opts.batch_size,
        max_batch_tokens=opts.max_batch_tokens,
        pad_id=tokenizer.pad_token_id,
    )
    wopts = WarmupOptions(
        r=opts.lora_r,
        alpha=opts.lora_alpha,
        dropout=0.0,
        target_modules=opts.target_modules(),
        epochs=opts.epochs,
        lr=opts.lr,
        batch_size=opts.train_batch_size,
        seed=opts.seed,
    )
    loaded = []

    def load_and_check() -> None:
        model = add_lora(load_model(opts.model, model_dtype, device), wopts)
        # every path below, on a tiny batch, before the fine-tuning: an unsupported model fails now, in one line
        rt.memory = check_model(
            model, rt, train_ex, ("warmup", "diagnose"), proj_dim=opts.proj_dim, seed=opts.seed, jf_method=opts.jf_method, log=log
        ).memory  # and its batches are sized to the memory budget
        loaded.append(model)

    _prepare_out(run, before_write=load_and_check)  # inputs, options, --out and the model are checked: only now is --out written
    model, out = loaded[0], run.dir
    assert out is not None  # _prepare_out chose the folder
    params = lora_parameters(model)
    lm: Any = causal_lm(model)  # a transformers PreTrainedModel
    d = int(lm.config.hidden_size)

    # -- fine-tuning with checkpoints --------------------------------------------------------
    t = time.perf_counter()
    spe = math.ceil(len(train_ex) / opts.train_batch_size)
    total = int(round(opts.epochs * spe))
    marks = sorted(
        {min(total, max(1, round(i * spe / opts.checkpoints_per_epoch))) for i in range(1, math.ceil(opts.epochs * opts.checkpoints_per_epoch) + 1)} | {total}
    )
    snaps: list[tuple[int, dict]] = [(0, {n: p.detach().clone() for n, p in params})]

    def save(step: int) -> None:
        (out / "checkpoints").mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=out))
        save_adapter(model, tmp)
        atomic_replace_dir(tmp, out / "checkpoints" / f"step-{step:05d}")

    save(0)

    def on_step(step: int, _total: int) -> None:
        if step in marks:
            snaps.append((step, {n: p.detach().clone() for n, p in params}))
            save(step)

    log(f"diagnose: fine-tuning LoRA on {len(train_ex)} domain examples for {opts.epochs:g} epochs ({total} steps), checkpoints at steps {[0, *marks]}")
    train_summary = warmup(model, train_ex, wopts, rt, on_step=on_step)
    timings["fine_tune"] = time.perf_counter() - t

    # -- kernels and accuracies at every checkpoint --------------------------------------------
    t = time.perf_counter()
    extra = (mc_train.examples + mc_test.examples) if mc_train is not None and mc_test is not None else []
    ridges = opts.ridge_values()
    kernels, scores, ckpts = [], [], []
    for step, snap in snaps:
        with torch.no_grad():
            for name, p in params:
                p.copy_(snap[name])
        epoch = step / spe
        log(f"diagnose: checkpoint at step {step} (epoch {epoch:.2f}): features of {len(probe) + len(extra)} examples")
        phi = _features(model, probe + extra, rt, opts.proj_dim, opts.seed).astype(np.float64)  # (n, p)
        K = phi[: len(probe)] @ phi[: len(probe)].T  # (n_d + n_c, n_d + n_c)
        s = K[:n_d, n_d:].mean(0)  # (n_c,) mean kernel over the domain probe
        kernels.append(K)
        scores.append(s)
        row: dict[str, Any] = {"step": step, "epoch": epoch}
        if mc_train is not None and mc_test is not None:
            f_tr = phi[len(probe) : len(probe) + len(mc_train.examples)]
            f_te = phi[len(probe) + len(mc_train.examples) :]
            k_tr, k_te = f_tr @ f_tr.T, f_te @ f_tr.T
            y = _one_vs_rest(mc_train.labels, len(LETTERS))
            scale = float(np.mean(np.diag(k_tr)))
            loo = {r: float((kernel_ridge_loo(k_tr, y, r * scale).argmax(1) == mc_train.labels).mean()) for r in ridges}
            best = max(ridges, key=lambda r: (loo[r], -abs(math.log10(r) + 2)))  # ties: the ridge closest to 1e-2
            pred = kernel_ridge(k_tr, y, k_te, best * scale).argmax(1)
            acc_model, _ = letter_accuracy(model, mc_test, rt)
            acc_model_train, _ = letter_accuracy(model, mc_train, rt)
            row.update(
                krr_accuracy=float((pred == mc_test.labels).mean()),
                krr_ridge=best,
                krr_loo_accuracy=loo,
                model_accuracy=acc_model,
                model_train_accuracy=acc_model_train,
            )
        ckpts.append(row)
    for row, K, s in zip(ckpts, kernels, scores):
        q = max(1, n_c // 4)
        top0, top = set(np.argsort(-scores[0])[:q].tolist()), set(np.argsort(-s)[:q].tolist())
        row.update(
            cos_f=cos_f(K, kernels[0]),
            rank_spearman=spearman(s, scores[0]),
            top_quarter_overlap=len(top & top0) / q,
            cos_f_domain_block=cos_f(K[:n_d, :n_d], kernels[0][:n_d, :n_d]),
            cos_f_cross_block=cos_f(K[:n_d, n_d:], kernels[0][:n_d, n_d:]),
        )
    timings["kernels"] = time.perf_counter() - t

    # -- the Jacobian-free approximation ---------------------------------------------------------
    t = time.perf_counter()
    jf_step, jf_snap = next(((st, sn) for st, sn in snaps if st / spe >= 1.0 - 1e-9), snaps[-1])
    with torch.no_grad():
        for name, p in params:
            p.copy_(jf_snap[name])
    n_jd = min(n_d, max(1, opts.jf_examples // 2))
    n_jc = min(n_c, opts.jf_examples - n_jd)
    jf_examples = dom_ex[:n_jd] + cand_ex[:n_jc]
    jf_names = [f"domain:{train[dom_probe_idx[i]].id}" for i in range(n_jd)] + [f"pool:{pool[cand_idx[i]].id}" for i in range(n_jc)]
    log(f"diagnose: exact multi-output kernel on {len(jf_examples)} examples at step {jf_step}")
    jf = output_kernel_check(model, jf_examples, rt, opts.jf_method, opts.jf_outputs, opts.seed, names=jf_names, progress=rt.progress)
    jf.update(step=jf_step, epoch=jf_step / spe)
    timings["jacobian_free"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    # -- outputs ---------------------------------------------------------------------------------
    kr: dict[str, Any]
    if mc_train is None or mc_test is None:
        kr = {"skipped": krr_note}
    else:
        last = ckpts[-1]
        kr = {
            "n_train": len(mc_train.examples),
            "n_test": len(mc_test.examples),
            "chance": 1 / len(LETTERS),
            "majority_test": float(np.bincount(mc_test.labels, minlength=4).max() / len(mc_test.labels)),
            "targets": "one-vs-rest, +1 for the answer letter, -1 for the others",
            "kernel": "Jacobian-free eNTK of f = sum_k logit at the position predicting the answer letter"
            + (f", projected to p = {opts.proj_dim}" if opts.proj_dim else " (exact)"),
            "ridge": "relative to the mean training-kernel diagonal, chosen per checkpoint by leave-one-out training accuracy",
            "model": "argmax over the logits of the four letters at the same position",
            "krr_accuracy_initial_kernel": ckpts[0]["krr_accuracy"],
            "model_accuracy_initial": ckpts[0]["model_accuracy"],
            "model_accuracy_fine_tuned": last["model_accuracy"],
            "krr_accuracy_final_kernel": last["krr_accuracy"],
            "per_checkpoint": [
                {k: r[k] for k in ("step", "epoch", "krr_accuracy", "krr_ridge", "krr_loo_accuracy", "model_accuracy", "model_train_accuracy")} for r in ckpts
            ],
        }
    stab = {
        "reference": "the first checkpoint (step 0: the fresh adapter, before any update)",
        "probe": {"domain": n_d, "candidates": n_c},
        "kernel": "K = Phi Phi^T on the probe, Phi = "
        + (f"Rademacher projection (p = {opts.proj_dim}, seed {opts.seed})" if opts.proj_dim else "exact gradients")
        + " of the Jacobian-free gradient",
        "scores": "s_j = mean over the domain probe of K[i, j], for every candidate j",
        "checkpoints": [
            {k: r[k] for k in ("step", "epoch", "cos_f", "rank_spearman", "top_quarter_overlap", "cos_f_domain_block", "cos_f_cross_block")} for r in ckpts
        ],
        "cos_f_matrix": [[cos_f(a, b) for b in kernels] for a in kernels],
        "rank_spearman_matrix": [[spearman(a, b) for b in scores] for a in scores],
        "candidate_scores": [s.tolist() for s in scores],
        "candidate_ids": [pool[i].id for i in cand_idx],
        "domain_ids": [train[i].id for i in dom_probe_idx],
    }
    result = _clean(
        {
            "tool": "ntkselect diagnose",
            "options": asdict(opts),
            "model": {"hidden_size": d, "vocab_size": int(_head_matrix(model)[0].shape[0]), "lora_parameters": int(sum(p.numel() for _, p in params))},
            "runtime": rt.describe(),
            "data": {
                "domain_records": len(domain),
                "domain_train": len(train),
                "domain_test": len(test),
                "pool_records": len(pool_all),
                "pool_usable": len(pool),
            },
            "fine_tune": {**train_summary, "steps_per_epoch": spe, "checkpoint_steps": [0, *marks]},
            "kernel_stability": stab,
            "jacobian_free": jf,
            "kernel_regression": kr,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
    )
    np.savez_compressed(out / "kernels.npz", steps=np.array([s for s, _ in snaps]), kernels=np.stack(kernels), scores=np.stack(scores))
    result["plots"] = _plots(result, out)
    atomic_write_json(out / "diagnostics.json", result)
    run.commit()  # with --overwrite: the new diagnostics replace the earlier ones only now
    return result


def summarise(diag: dict) -> str:
    """A few lines for a person."""
    lines = [f"ntkselect diagnose: wrote {diag['options']['out']}/diagnostics.json"]
    for r in diag["kernel_stability"]["checkpoints"]:
        lines.append(
            f"  epoch {r['epoch']:.2f}: cos_F vs first {r['cos_f']:.4f}, rank Spearman {r['rank_spearman']:.4f}, "
            f"top-quarter overlap {r['top_quarter_overlap']:.2f}"
        )
    c = diag["jacobian_free"]["cross_output_cosine"]
    lines.append(
        f"  cross-output gradient cosines ({c['pairs']} pairs): mean {c['mean']:+.4f}, std {c['std']:.4f}, mean |cos| {c['mean_abs']:.4f}; "
        f"d^-1/2 = {c['d_inv_sqrt']:.4f}"
    )
    rd = diag["jacobian_free"]["relative_difference"]
    lines.append(
        f"  Theta~ vs trace of the exact kernel ({diag['jacobian_free']['method']}): median |rel. diff| {rd['median_abs']:.3g}, "
        f"median Theta~/trace {rd['theta_over_trace_median']:.3g}"
    )
    kr = diag["kernel_regression"]
    if "skipped" in kr:
        lines.append(f"  kernel regression skipped: {kr['skipped']}")
    else:
        lines.append(
            f"  kernel regression accuracy {kr['krr_accuracy_initial_kernel']:.3f} (initial kernel), {kr['krr_accuracy_final_kernel']:.3f} (final); "
            f"model {kr['model_accuracy_initial']:.3f} before, {kr['model_accuracy_fine_tuned']:.3f} after fine-tuning (n_test {kr['n_test']}, chance 0.25)"
        )
    return "\n".join(lines)


def _plots(diag: dict, out: Path) -> list[str]:
    written = []
    nan = lambda v: float("nan") if v is None else v  # noqa: E731 (JSON null back to nan)
    ck = [{k: nan(v) for k, v in r.items()} for r in diag["kernel_stability"]["checkpoints"]]
    ep = [r["epoch"] for r in ck]
    fig, ax = new_figure(6, 3.6)
    ax.plot(ep, [r["cos_f"] for r in ck], "o-", label=r"$\cos_F(\Theta_t, \Theta_0)$")
    ax.plot(ep, [r["rank_spearman"] for r in ck], "s-", label="Spearman of mean-kernel scores")
    ax.plot(ep, [r["top_quarter_overlap"] for r in ck], "^--", label="top-quarter overlap")
    ax.axhline(0.99, color="grey", lw=0.8, ls=":", label="0.99 (paper, Fig. 2a)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("against the first checkpoint")
    ax.set_title("kernel stability during LoRA fine-tuning")
    ax.legend(fontsize=8)
    write_png(fig, out / "kernel_stability.png")
    written.append("kernel_stability.png")

    jf = diag["jacobian_free"]
    c = jf["cross_output_cosine"]
    fig, (a1, a2) = new_figure(10, 3.6, ncols=2)
    edges, counts = np.asarray(c["histogram"]["edges"]), np.asarray(c["histogram"]["counts"])
    a1.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0")
    for sgn in (-1, 1):
        a1.axvline(sgn * c["d_inv_sqrt"], color="#c44e52", ls="--", lw=1, label=r"$\pm d^{-1/2}$" if sgn > 0 else None)
    a1.axvline(c["mean"], color="black", lw=1, label=f"mean {c['mean']:+.3f}")
    a1.set_xlabel(r"$\cos(\nabla F_k(x), \nabla F_{k'}(x)),\ k \neq k'$")
    a1.set_ylabel("pairs")
    a1.set_title(f"cross-output gradient cosines (d = {c['d']})")
    a1.legend(fontsize=8)
    tr = np.array([nan(p["trace"]) for p in jf["pairs"]], dtype=float)
    th = np.array([nan(p["theta_tilde"]) for p in jf["pairs"]], dtype=float)
    diag_pair = np.array([p["i"] == p["j"] for p in jf["pairs"]])
    a2.scatter(tr[~diag_pair], th[~diag_pair], label="x ≠ x'", s=18)
    a2.scatter(tr[diag_pair], th[diag_pair], label="x = x'", s=18, marker="s")
    if len(tr) and np.all(tr > 0) and np.all(th > 0):
        lo, hi = float(min(tr.min(), th.min())), float(max(tr.max(), th.max()))
        a2.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls=":", label=r"$\tilde\Theta$ = trace (no off-diagonal sum)")
        if hi / lo > 100:
            a2.set_xscale("log")
            a2.set_yscale("log")
    a2.set_xlabel(r"trace of the exact kernel $\Theta(x, x')$")
    a2.set_ylabel(r"Jacobian-free $\tilde\Theta(x, x')$")
    a2.set_title(r"$\tilde\Theta$" + f" against the trace ({jf['method']})")
    a2.legend(fontsize=8)
    write_png(fig, out / "jacobian_free.png")
    written.append("jacobian_free.png")

    kr = diag["kernel_regression"]
    if "per_checkpoint" in kr:
        rows = [{k: nan(v) for k, v in r.items()} for r in kr["per_checkpoint"]]
        fig, ax = new_figure(6, 3.6)
        ax.plot([r["epoch"] for r in rows], [r["krr_accuracy"] for r in rows], "o-", label="kernel regression (eNTK at the checkpoint)")
        ax.plot([r["epoch"] for r in rows], [r["model_accuracy"] for r in rows], "s-", label="the fine-tuned model")
        ax.axhline(kr["chance"], color="grey", ls=":", lw=0.8, label="chance")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"test accuracy (n = {kr['n_test']})")
        ax.set_ylim(0, 1)
        ax.set_title("kernel regression against fine-tuning")
        ax.legend(fontsize=8)
        write_png(fig, out / "kernel_regression.png")
        written.append("kernel_regression.png")
    return written
