"""The preflight: every code path a run will use, on one tiny batch, before the long work.

A selection spends hours in the warm-up, stage 1 and stage 2; a model the stages cannot handle
must fail before any of that, in seconds, with one line that names the fix. :func:`check_model`
takes the model with its adapter and two of the user's examples (cut to 8 and 5 tokens), and:

1. reads the LM head and its logit post-processing (:func:`ntkselect.model.heads.lm_head`), and
   checks that it reproduces the model's own logits on the batch;
2. builds the fused LoRA path (every adapted layer must be a plain LoRA linear or Conv1D
   layer) and checks, with temporarily random B matrices, that its per-example gradients of
   each objective the run uses equal autograd through peft's own layers;
3. runs each stage the run will use (warm-up step, stage-1 embedding, stage-2 domain vector
   and scores, LESS features, the evaluation's losses, the diagnostics' output gradients) in
   the run's precision, on the same batch.

Nothing is written, the model comes back exactly as it was (weights, gradients, training
flags, the global random state), and any failure is one :class:`NtkSelectError` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ntkselect.config import SelectConfig
from ntkselect.data.batching import collate
from ntkselect.data.records import TokenizedExample
from ntkselect.errors import NtkSelectError
from ntkselect.evaluation.metrics import heldout_loss
from ntkselect.grads.fused import FusedLoraGradients, flatten_grads, lora_parameters
from ntkselect.grads.projection import make_projector
from ntkselect.model.heads import Head, head_notice, lm_head
from ntkselect.model.lm import decoder_of, summed_head, summed_logits
from ntkselect.model.loading import load_model
from ntkselect.model.memory import MemoryCosts, activation_budget, measure_costs, rss_bytes
from ntkselect.model.runtime import Runtime
from ntkselect.runs.setup import RunSetup, make_runtime
from ntkselect.selection.ntk.outputs import output_gradients
from ntkselect.selection.ntk.stage1 import embed, forward_pass
from ntkselect.selection.ntk.stage2 import domain_vector, dot_pass, per_example_gradients, projected_features, score_against, sum_pass
from ntkselect.selection.registry import find_selector
from ntkselect.training.warmup import WarmupOptions, add_lora, loss_and_grads, per_example_loss, warmup_pass

__all__ = ["Preflight", "check_model", "preflight_select", "probe_examples", "tolerances", "weights_dtype", "MEASURED_PASSES"]

logger = logging.getLogger(__name__)

# Tolerances by the dtype of the frozen weights. A structural error (a layer the fused path
# misses, a head it misreads) is O(1); rounding is ~1e-6 in float32 and ~1e-2 in half precision
# (bfloat16 keeps 8 mantissa bits: a tiny bfloat16 model's fused gradients differ from autograd's
# by 8.4e-3, measured), so half-precision weights get ten times float32's bound and more.
_GRAD_TOL = {torch.float32: 5e-3, torch.float64: 5e-3}  # relative, per example, on a tiny batch
_LOGIT_TOL = {torch.float32: 1e-3, torch.float64: 1e-3}  # relative to the largest logit
_HALF_GRAD_TOL, _HALF_LOGIT_TOL = 5e-2, 2e-2


def weights_dtype(model) -> torch.dtype:
    """The dtype of the frozen weights (the LoRA adapter may be float32 over half weights)."""
    frozen = [p.dtype for p in model.parameters() if not p.requires_grad]
    return frozen[0] if frozen else torch.float32


def tolerances(model) -> tuple[float, float]:
    """(gradient, logit) relative tolerances of the preflight's exactness checks for this model."""
    d = weights_dtype(model)
    return _GRAD_TOL.get(d, _HALF_GRAD_TOL), _LOGIT_TOL.get(d, _HALF_LOGIT_TOL)


@dataclass
class Preflight:
    head: Head
    notice: str | None
    seconds: float
    paths: tuple[str, ...]
    memory: MemoryCosts | None = None  # measured per-pass costs and the batch budget (ntkselect.model.memory)
    rss: int = 0  # this process's resident memory after the checks, the model loaded (what a run holds before its stages)
    model: object = None  # the checked model, when the caller keeps it


#: the measured kinds of pass (ntkselect.model.memory.KINDS) each path uses
_PATH_KINDS = {"warmup": ("warmup",), "embed": ("forward",), "ntk": ("sum", "dot"), "less": ("less",), "diagnose": ("per_example",)}
#: the pass that measures each kind (ntkselect.model.memory.measure_costs), each beside the stage it measures
MEASURED_PASSES = {"warmup": warmup_pass, "sum": sum_pass, "dot": dot_pass, "forward": forward_pass}


def probe_examples(examples: Sequence, lengths: tuple[int, ...] = (8, 5)) -> list:
    """Two of the user's examples cut to a few tokens, every token after the first trained, so
    the batch has padding and trained positions whatever the data."""
    if not examples:
        raise NtkSelectError("preflight: no examples to check the model with")
    out = []
    for i, n in enumerate(lengths):
        ids = list(examples[i % len(examples)].input_ids[:n])
        while len(ids) < 2:
            ids = ids + ids[:1]
        out.append(TokenizedExample(input_ids=ids, train_mask=[False] + [True] * (len(ids) - 1), truncated=False))
    return out


def _model_name(model) -> str:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(lm).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:300]


@contextlib.contextmanager
def _untouched(model):
    """Give the model back exactly as it came: LoRA weights, gradients, training flags, the
    global random state (a later dropout mask must not depend on the preflight)."""
    params = lora_parameters(model)
    saved = {n: p.detach().clone() for n, p in params}
    flags = [(m, m.training) for m in model.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params:
                    p.copy_(saved[n])
                    p.grad = None
            for m, t in flags:
                m.training = t


def _check_logits(model, batch, head: Head, name: str) -> None:
    with torch.no_grad():
        try:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False)
        except TypeError:  # a model without position_ids
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        h = decoder_of(model)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
        ).last_hidden_state
        m = batch.attention_mask.bool()
        ref = out.logits[m].float()  # (N, V)
        got = head.logits(h[m]).float()
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    if not err <= tolerances(model)[1]:
        raise NtkSelectError(
            f"{name}: its logits are not the LM head of its final hidden states with the post-processing ntkselect knows "
            f"(soft-capping, logit_scale, logits_scaling; relative difference {err:.1e} on a tiny batch), so its losses and "
            "scores would be wrong; this model family is not supported"
        )


def _check_gradients(model, batch, objective, head, name: str, what: str) -> None:
    """Per-example gradients of ``objective`` from the fused hooks against autograd through
    peft's layers, with random B matrices (a fresh adapter's B = 0 would hide dA)."""
    params = lora_parameters(model)
    names = [n for n, _ in params]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in params:
            if ".lora_B." in n:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p.device, p.dtype))
    with FusedLoraGradients(model) as hooks:
        hooks.set_mask(batch.attention_mask)
        objective(model, batch, head).sum().backward()
        got = flatten_grads(hooks.per_example(), names).cpu()  # (B, D)
    for _, p in params:
        p.grad = None
    f = objective(model, batch, head)  # through peft's own LoRA layers
    for b in range(f.shape[0]):
        ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(f[b], [p for _, p in params], retain_graph=b + 1 < f.shape[0])]).cpu()
        err = float((got[b] - ref).norm() / ref.norm().clamp_min(1e-30))
        if not err <= tolerances(model)[0]:
            raise NtkSelectError(
                f"{name}: the per-example LoRA gradients of the {what} from ntkselect's fused path differ from autograd "
                f"(relative error {err:.1e} on a tiny batch); this architecture is not supported"
            )


def check_model(
    model,
    rt: Runtime,
    examples: Sequence,
    paths: Sequence[str],
    proj_dim: int = 0,
    seed: int = 0,
    fused_warmup: bool = True,
    jf_method: str | None = None,
    log: Callable[[str], None] | None = None,
    measure: bool = True,
) -> Preflight:
    """Run ``paths`` (a subset of "warmup", "embed", "ntk", "less", "loss", "diagnose") on a tiny
    batch of ``examples``; raise a one-line :class:`NtkSelectError` on anything unsupported.
    With ``measure``, also measure the memory cost of each kind of pass the paths use and the
    budget batches must keep to (``.memory``; give it to the run's :class:`Runtime`)."""
    t = time.perf_counter()
    name = _model_name(model)
    paths = tuple(dict.fromkeys(paths))
    head = lm_head(model).frozen()  # a linear, frozen head
    if not lora_parameters(model):
        raise NtkSelectError("the model has no trainable (LoRA) parameters: --lora-target-modules matched nothing that can be adapted")
    FusedLoraGradients(model)  # every adapted layer is plain LoRA on a linear or Conv1D layer
    if "diagnose" in paths and jf_method == "exact" and not head.linear:
        raise NtkSelectError(f"--jf-method exact needs a linear LM head, but {name} soft-caps its logits; use --jf-method sampled (or auto)")
    probe = probe_examples(examples)
    q = dataclasses.replace(rt, progress=False, batch_size=len(probe))
    batch = collate(probe, range(len(probe)), rt.pad_id, rt.padding_side).to(rt.device)
    step = "the forward pass"
    try:
        with _untouched(model):
            model.eval()
            _check_logits(model, batch, head, name)
            if {"ntk", "diagnose"} & set(paths):
                step = "the stage-2 gradient check"
                _check_gradients(model, batch, summed_logits, summed_head(model), name, "summed logits")
            if {"less", "warmup"} & set(paths):
                step = "the loss gradient check"
                _check_gradients(model, batch, per_example_loss, None, name, "loss")
            _run_paths(model, q, probe, batch, paths, proj_dim, seed, fused_warmup, head)
            memory = None
            if measure:
                step = "the memory measurement"
                kinds = tuple(k for p in paths for k in _PATH_KINDS.get(p, ()))
                memory = MemoryCosts(
                    measure_costs(
                        model, q, tuple(dict.fromkeys(kinds)), vocab=head.module.weight.shape[0], lengths=_probe_lengths(model), passes=MEASURED_PASSES
                    ),
                    activation_budget(rt.device),
                )
            step = "the checks"
    except NtkSelectError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the model on the tiny batch: one line, no traceback
        raise NtkSelectError(
            f"preflight: {step} fails on a tiny batch of {name} ({type(err).__name__}: {_first_line(err)}); this model is not supported by ntkselect"
        ) from None
    notice = head_notice(head) if {"ntk", "diagnose"} & set(paths) else None
    if notice:
        (log or logger.info)(notice)
    return Preflight(head=head, notice=notice, seconds=time.perf_counter() - t, paths=paths, memory=memory, rss=rss_bytes())


def _probe_lengths(model) -> tuple[int, int, int]:
    """Shorter memory probes for larger models, so the measurement stays a few seconds on a CPU."""
    n = sum(p.numel() for p in model.parameters())
    top = 64 if n < 3e8 else 32 if n < 3e9 else 16
    return top // 4, top // 2, top


def _run_paths(model, q: Runtime, probe, batch, paths, proj_dim: int, seed: int, fused_warmup: bool, head: Head) -> None:
    if "warmup" in paths:
        model.train()
        loss = loss_and_grads(model, batch, q, fused=fused_warmup)
        if not torch.isfinite(loss):
            raise NtkSelectError(f"preflight: the warm-up loss of {_model_name(model)} is not finite on a tiny batch; use --precision float32")
        for _, p in lora_parameters(model):
            p.grad = None
        model.eval()
    if "embed" in paths:
        embed(model, probe, q, desc="preflight: embeddings")
    if "ntk" in paths:
        vec, _ = domain_vector(model, probe, q, proj_dim=min(proj_dim, 8), seed=seed)
        score_against(model, probe, vec, q, desc="preflight: scores")
    if "less" in paths:
        dim = sum(p.numel() for _, p in lora_parameters(model))
        projected_features(model, probe, make_projector(dim, 8, seed, device=q.device), q, objective=per_example_loss, desc="preflight: LESS features")
    if "loss" in paths:
        heldout_loss(model, probe, q, desc="preflight: held-out loss")
    if "diagnose" in paths:
        per_example_gradients(model, probe, q)
        W = head.module.weight.detach()[:2].float()
        output_gradients(
            model, probe[0], W, q, head=None if head.linear else head, bias=head.module.bias.detach()[:2].float() if head.module.bias is not None else None
        )


def preflight_select(
    cfg: SelectConfig,
    examples: Sequence,
    pad_id: int,
    methods: Sequence[str] | None = None,
    finetune: bool = False,
    keep: bool = False,
    log: Callable[[str], None] | None = None,
    setup: RunSetup | None = None,
) -> Preflight | None:
    """The preflight of a selection (``select``, ``--dry-run``) or an evaluation with ``cfg``
    (a :class:`~ntkselect.config.SelectConfig`): load the model, add the run's adapter, check
    every path ``methods`` (default: ``cfg.method``) and, with ``finetune``, the fine-tune and
    the test losses use. With ``keep`` the checked model is returned (``.model``) for the run to
    use, exactly as a freshly loaded one; otherwise it is freed. None when nothing uses a model.
    ``setup``: the run's resolved model folder, device and precision (default: resolved from ``cfg``)."""
    methods = list(methods or [cfg.method])
    used = [s for s in map(find_selector, methods) if s is not None and s.uses_model]  # evaluate's baseline and oracle are not selectors
    if not used and not finetune:
        return None
    paths: list[str] = []
    if used and cfg.warmup_epochs > 0 or finetune:
        paths.append("warmup")
    if any(s.uses_embeddings for s in used):
        paths.append("embed")
    wanted = {p for s in used for p in s.paths}  # the methods' own paths (ntkselect.selection.registry.PREFLIGHT_PATHS)
    paths += [p for p in _PATH_KINDS if p in wanted and p not in paths]
    if finetune:
        paths.append("loss")

    class _Tok:  # make_runtime reads only the pad id
        pad_token_id = pad_id

    setup = setup or RunSetup.of(cfg)
    rt = make_runtime(cfg, _Tok(), setup)
    opts = WarmupOptions(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.target_modules(), seed=cfg.seed)
    model = add_lora(load_model(setup.model_path, rt.model_dtype, rt.device), opts)
    res = check_model(model, rt, examples, paths, proj_dim=cfg.proj_dim, seed=cfg.seed, fused_warmup=cfg.lora_dropout == 0, log=log)
    if keep:
        res.model = model
    return res
