"""Every GPU check of ntkselect in one call: exactness, speed and memory at real model shapes.

A GPU is lent for minutes at a time and reaches no network, so this script needs nothing but
the project's tree, torch, transformers and peft: the models are ``random:<config>`` (seeded
random weights from the configs shipped in ``ntkselect/model/configs``) and the examples are
random token ids, all of one length. For each shape (default: SmolLM2-135M and Llama-3-8B),
LoRA r = 8 on every linear layer, it measures

1. **exactness** of stage-2 scores s_j = ⟨ḡ_D, g(c_j)⟩ against a plain per-example autograd
   reference on the full logits (one example at a time through peft's own layers, Σ_k logit
   over the vocabulary in float32): ntkselect in float32 and in bfloat16 weights, each against
   the float32 reference (relative error ‖s − s_ref‖ / ‖s_ref‖, Spearman rank correlation,
   top-quarter overlap);
2. **speed** in the run's precision (bfloat16 weights on CUDA): a plain forward pass of the frozen
   model, stage 1 (embeddings through the merged LoRA layers), exact stage 2 (the domain vector,
   then the candidates' scores, timed apart) and projected stage 2 (p = 8192), each after a
   one-batch warm-up and with CUDA synchronisation, as tokens/s and as ratios of time per token
   to the plain forward pass (``--profile``: the ops of one exact batch by device time);
3. **peak memory** of each phase (CUDA's max_memory_allocated over what was allocated before it)
   against the prediction from ntkselect's measured per-pass costs (``ntkselect.model.memory``)
   plus the merged weights the phase holds.

It writes one JSON file (``--out``) and prints it. ``--smoke`` runs the same code on a CPU with
a tiny model in seconds (the test suite does), so the script is known to run before a GPU is
lent. ``--time-budget`` skips what would not finish in time and says so in the JSON.

    python benchmarks/device_check.py --out runs/device/device_check.json       # on the GPU
    python benchmarks/device_check.py --smoke --out /tmp/device_check.json      # anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ntkselect.data.batching import collate
from ntkselect.data.records import TokenizedExample
from ntkselect.grads.fused import lora_parameters
from ntkselect.grads.projection import RademacherProjector, cache_bytes_per_block
from ntkselect.model.lm import final_hidden
from ntkselect.model.loading import load_model
from ntkselect.model.memory import measure_costs
from ntkselect.model.runtime import Runtime
from ntkselect.runs.preflight import MEASURED_PASSES
from ntkselect.selection.ntk.stage1 import embed
from ntkselect.selection.ntk.stage2 import domain_mean_gradient, projected_features, score_against
from ntkselect.training.warmup import WarmupOptions, add_lora

SMOKE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@dataclasses.dataclass
class Shape:
    model: str  # what --model takes
    exact_domain: int  # domain examples of the exactness check
    exact_candidates: int  # candidates of the exactness check (the reference is one example at a time)
    speed_candidates: int  # candidates timed
    length: int  # tokens per example


SHAPES = {
    "smollm2-135m": Shape("random:smollm2-135m", 8, 64, 512, 512),
    "llama-3-8b": Shape("random:llama-3-8b", 4, 24, 64, 512),
    "qwen3-8b": Shape("random:qwen3-8b", 4, 24, 64, 512),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_examples(n: int, length: int, vocab: int, seed: int) -> list[TokenizedExample]:
    """n examples of ``length`` random token ids, every token after the first trained."""
    g = np.random.default_rng(seed)
    return [TokenizedExample(g.integers(3, vocab, length).tolist(), [False] + [True] * (length - 1), False) for _ in range(n)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra * ra).sum() * (rb * rb).sum()))


def compare(got: np.ndarray, ref: np.ndarray) -> dict:
    k = max(1, len(ref) // 4)
    top = len(set(np.argsort(-got)[:k]) & set(np.argsort(-ref)[:k])) / k
    return {
        "relative_error": float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)),
        "spearman": spearman(got, ref),
        "top_quarter_overlap": top,
    }


def reference_scores(model, domain, candidates, rt: Runtime) -> np.ndarray:
    """s_j = ⟨mean_i g(x_i), g(c_j)⟩ with g from plain autograd, one example at a time, through
    peft's own LoRA layers, on the full (1, T, V) logits in float32."""
    params = [p for _, p in lora_parameters(model)]

    def grad(e, i):
        b = collate([e], [i], rt.pad_id).to(rt.device)
        with rt.autocast():
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False).logits  # (1, T, V)
        f = (logits.float().sum(-1) * b.target_mask).sum() / b.target_mask.sum()  # (1/T) Σ_t Σ_k logit[t, k]
        return torch.cat([g.reshape(-1).float() for g in torch.autograd.grad(f, params)])  # (D,)

    gbar = sum(grad(e, i) for i, e in enumerate(domain)) / len(domain)
    return np.array([float(gbar @ grad(e, i)) for i, e in enumerate(candidates)])


def cast_frozen(model, dtype: torch.dtype) -> None:
    """The frozen weights to ``dtype`` in place (LoRA A, B stay float32, as peft keeps them)."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)


class Phase:
    """Time (CUDA-synchronised) and peak device memory of one call."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        out = fn()
        sync(self.device)
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(self.device) - base if self.device.type == "cuda" else None
        return out, seconds, peak


def check_shape(name: str, shape: Shape, device: torch.device, args, deadline: float) -> dict:
    res: dict = {"shape": name, "model": shape.model, "length": shape.length, "lora": {"r": 8, "target_modules": "all-linear"}}
    t0 = time.perf_counter()
    model = add_lora(load_model(shape.model, torch.float32, device), WarmupOptions(r=8, alpha=16, dropout=0.0, target_modules="all-linear", seed=0))
    res["load_float32_seconds"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a warmed-up-like adapter: peft starts B at zero, which would hide dA
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.01)
    model.eval()
    cfg = model.get_base_model().config
    vocab = int(cfg.vocab_size)
    dim = sum(p.numel() for _, p in lora_parameters(model))
    res.update(params=sum(p.numel() for p in model.parameters() if not p.requires_grad), grad_dim=dim, vocab=vocab)
    adapted = sum(m.get_base_layer().weight.numel() for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer") and len(m.lora_A))
    domain = random_examples(shape.exact_domain, shape.length, vocab, 0)
    cands = random_examples(shape.exact_candidates, shape.length, vocab, 1)
    tokens = args.batch_size * shape.length
    rt32 = Runtime(device=device, dtype=torch.float32, model_dtype=torch.float32, batch_size=args.batch_size, max_batch_tokens=tokens, progress=False)

    # -- 1. exactness: float32 reference, ntkselect in float32 and in bfloat16 weights ---------
    t = time.perf_counter()
    ref = reference_scores(model, domain, cands, rt32)
    res["reference_seconds"] = time.perf_counter() - t
    ours32 = score_against(model, cands, domain_mean_gradient(model, domain, rt32), rt32)
    exact = {"float32": compare(ours32, ref)}
    half = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    cast_frozen(model, half)
    rth = dataclasses.replace(rt32, dtype=half, model_dtype=half)
    oursh = score_against(model, cands, domain_mean_gradient(model, domain, rth), rth)
    exact[str(half).replace("torch.", "")] = compare(oursh, ref)
    res["exactness"] = exact
    res["exactness_candidates"], res["exactness_domain"] = len(cands), len(domain)
    print(f"[{name}] exactness vs the float32 per-example autograd reference: {json.dumps(exact)}", flush=True)

    # -- 2 + 3. speed and memory, in half precision (the user's setting on a GPU) ----------
    speed = random_examples(shape.speed_candidates, shape.length, vocab, 2)
    n_tok = shape.speed_candidates * shape.length
    B, L = args.batch_size, shape.length
    costs = measure_costs(model, rth, ("forward", "sum", "dot", "per_example"), vocab=vocab, passes=MEASURED_PASSES)
    merged = torch.empty((), dtype=half).element_size() * adapted  # W + sBA of every adapted layer, held during a stage

    def predicted(kind: str, extra: float = 0.0, with_merged: bool = True, batch: int = B) -> int:
        """The plan's peak: the largest batch's measured cost, plus the merged weights the phase holds."""
        return int(costs[kind].bytes(batch, L, batch * (L - 1)) + (merged if with_merged else 0) + extra)

    phase = Phase(device)
    rows: dict = {}
    warm = speed[:B]

    def plain():
        with torch.no_grad(), model.disable_adapter():
            for i in range(0, len(speed), B):
                batch = collate(speed[i : i + B], list(range(i, min(i + B, len(speed)))), rth.pad_id).to(device)
                with rth.autocast():
                    final_hidden(model, batch)

    gbar = None

    def run(label, fn, warm_fn, pred):
        nonlocal gbar
        if time.perf_counter() > deadline:
            rows[label] = {"skipped": "time budget"}
            return None
        warm_fn()  # kernels compiled, allocator warmed: what is timed is the steady state
        out, s, peak = phase(fn)
        rows[label] = {"seconds": s, "tokens_per_s": n_tok / s, "peak_bytes": peak, "predicted_peak_bytes": pred}
        if peak is not None and pred:
            rows[label]["peak_vs_predicted"] = peak / pred
        print(f"[{name}] {label:<10} {n_tok / s:12,.0f} tok/s  {s:8.2f} s  peak {peak if peak is None else f'{peak / 2**20:,.0f} MiB'}", flush=True)
        return out

    def plain_warm():
        with torch.no_grad(), model.disable_adapter():
            batch = collate(warm, list(range(len(warm))), rth.pad_id).to(device)
            with rth.autocast():
                final_hidden(model, batch)

    run("forward", plain, plain_warm, predicted("forward", with_merged=False))
    run("stage1", lambda: embed(model, speed, rth), lambda: embed(model, warm, rth), predicted("forward"))
    dom = speed[: max(1, len(speed) // 8)]

    def domain_pass():
        nonlocal gbar
        gbar = domain_mean_gradient(model, dom, rth)

    # the domain vector (once per run: ~1K domain examples against M = 4N candidates) apart from the
    # candidates' scores (what grows with the pool); the candidates' row is the one the targets read
    n_tok_all = n_tok
    n_tok = len(dom) * shape.length
    run("domain", domain_pass, lambda: domain_mean_gradient(model, warm[:2], rth), predicted("sum", 4 * dim, batch=min(B, len(dom))))
    n_tok = n_tok_all
    run("exact", lambda: score_against(model, speed, gbar, rth), lambda: score_against(model, warm, gbar, rth), predicted("dot", 4 * dim))
    if args.profile and device.type == "cuda" and gbar is not None:
        res["exact_profile"] = profile_exact(model, warm, gbar, rth)
    # projected (p = 8192): every candidate's gradient gathered into one chunk, projected in one pass over the blocks
    proj = RademacherProjector(dim, args.proj_dim, seed=0, device=device, dtype=half)
    chunk = len(speed) * dim * 4
    pred_proj = predicted("per_example", chunk + 4 * len(speed) * args.proj_dim)
    # time one group of blocks as a pass makes them (many per call on a GPU), then decide whether a whole pass fits
    group = min(proj.n_blocks, proj.group(half))
    proj.blocks(0, group, half)
    sync(device)
    t = time.perf_counter()
    proj.blocks(0, group, half)
    sync(device)
    pass_s = (time.perf_counter() - t) / group * proj.n_blocks
    res["projection_pass_seconds_estimated"] = pass_s
    res["projection_blocks"] = proj.n_blocks
    if time.perf_counter() + 2 * pass_s + 3 * rows.get("exact", {}).get("seconds", 0) > deadline:
        rows["projected"] = {"skipped": f"time budget: one pass over the {proj.n_blocks} projection blocks takes {pass_s:.1f} s"}
    else:
        run(
            "projected",
            lambda: projected_features(model, speed, proj, rth, chunk_bytes=chunk),
            lambda: projected_features(model, warm[:2], proj, rth, chunk_bytes=2 * dim * 4),
            pred_proj,
        )
    # the same with the generator's bytes kept after their first pass (RademacherProjector's cache): on
    # a GPU, eager Philox is what a pass costs; the warm-up pass fills the cache, the timed one expands it
    cache = proj.n_blocks * cache_bytes_per_block(args.proj_dim)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else cache * 4
    if cache > free // 3:
        rows["projected_cached"] = {"skipped": f"its cache ({cache / 2**30:.1f} GiB) is over a third of the free memory"}
    elif time.perf_counter() + 1.5 * pass_s + 3 * rows.get("exact", {}).get("seconds", 0) > deadline:
        rows["projected_cached"] = {"skipped": f"time budget: the pass that fills the cache takes {pass_s:.1f} s"}
    else:
        kept = RademacherProjector(dim, args.proj_dim, seed=0, device=device, dtype=half, cache_bytes=cache)
        run(
            "projected_cached",
            lambda: projected_features(model, speed, kept, rth, chunk_bytes=chunk),
            lambda: projected_features(model, warm[:2], kept, rth, chunk_bytes=2 * dim * 4),
            pred_proj + cache,
        )
        kept = None
    # ratios of time per token (the domain pass has fewer tokens than the others)
    f = rows.get("forward", {}).get("tokens_per_s")
    ratios = {}
    if f:
        for k in ("stage1", "domain", "exact", "projected", "projected_cached"):
            if "tokens_per_s" in rows.get(k, {}):
                ratios[f"{k}_time_vs_forward"] = f / rows[k]["tokens_per_s"]
        if "stage1_time_vs_forward" in ratios:
            ratios["stage1_throughput_vs_forward"] = 1 / ratios.pop("stage1_time_vs_forward")
    res.update(
        speed={"precision": str(half).replace("torch.", ""), "candidates": len(speed), "tokens": n_tok_all, "batch_size": B, "rows": rows, "ratios": ratios},
        merged_weights_bytes=merged,
        memory_costs={k: dataclasses.asdict(v) for k, v in costs.items()},
        seconds=time.perf_counter() - t0,
    )
    model = None  # freed before the next shape (the closures above are done with it)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def profile_exact(model, batch_examples, gbar, rt: Runtime, top: int = 15) -> list[dict]:
    """The ops of one exact stage-2 batch by device time (torch.profiler), after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    score_against(model, batch_examples, gbar, rt)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        score_against(model, batch_examples, gbar, rt)
        sync(rt.device)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        rows.append({"op": e.key, "device_ms": t / 1e3, "calls": e.count, "cpu_ms": e.cpu_time_total / 1e3})
    total = sum(r["device_ms"] for r in rows if not r["op"].startswith(("aten::", "autograd::", "ProfilerStep")))
    rows.sort(key=lambda r: -r["device_ms"])
    out = rows[:top]
    out.append({"op": "(all kernels)", "device_ms": total})
    for r in out[:top]:
        print(f"  {r['device_ms']:9.2f} ms  {r.get('calls', ''):>6}  {r['op'][:90]}", flush=True)
    return out


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--shapes", default="smollm2-135m,llama-3-8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, in seconds: the script's own test")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--proj-dim", type=int, default=8192)
    ap.add_argument("--profile", action="store_true", help="on CUDA: the ops of one exact stage-2 batch by device time, into the JSON")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds; phases that would start later are skipped (and say so)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.time_budget
    if args.smoke:
        import tempfile

        cfg = Path(tempfile.mkdtemp(prefix="device-check-")) / "config.json"
        cfg.write_text(json.dumps(SMOKE_CONFIG))
        shapes = {"smoke": Shape(f"random:{cfg}", 3, 8, 12, 32)}
        device = torch.device("cpu")
        args.proj_dim = 64
        args.batch_size = 4
    else:
        names = [s.strip() for s in args.shapes.split(",") if s.strip()]
        bad = [s for s in names if s not in SHAPES]
        if bad:
            ap.error(f"--shapes: unknown shape {bad[0]!r}; use {', '.join(SHAPES)}")
        shapes = {s: SHAPES[s] for s in names}
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else (args.device if args.device != "auto" else "cpu"))
    out: dict = {"environment": environment(device), "smoke": args.smoke, "time_budget_s": args.time_budget, "shapes": {}}
    for name, shape in shapes.items():
        try:
            out["shapes"][name] = check_shape(name, shape, device, args, deadline)
        except torch.cuda.OutOfMemoryError as err:  # one shape's failure must not lose the others' figures
            out["shapes"][name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        if device.type == "cuda":
            out["shapes"][name]["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))  # after every shape: a timeout keeps what finished
    out["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
