"""Stage-2 speed and memory, side by side in one run.

On the same model, adapter and candidates it times
  (a) a LESS-style reference: one example at a time, a full backward pass through peft's LoRA
      layers on the full-vocabulary logits, then a dense Rademacher projection of the gradient
      (blocks generated on the fly, as TRAK's CPU projector does);
  (b) ntkselect's projected mode: batched per-example gradients, chunked block projection;
  (c) ntkselect's exact mode: batched contraction against the mean domain gradient;
  (d) a plain forward pass of the frozen model over the same tokens (the floor);
plus stage 1 (embeddings) against the same plain forward pass. Peak memory is the largest
increase of resident memory (CPU) or allocated memory (CUDA) over the loaded model during
each phase. The last line is JSON.

    python benchmarks/stage2.py --model default --candidates 64 --precision bfloat16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from tiny import tiny_model  # benchmarks/tiny.py: the shared tiny random Llama

from ntkselect.data.batching import collate
from ntkselect.data.records import load_records, tokenize_records
from ntkselect.grads.fused import lora_parameters
from ntkselect.grads.projection import RademacherProjector
from ntkselect.model.lm import final_hidden
from ntkselect.model.loading import load_model, load_tokenizer
from ntkselect.model.runtime import Runtime, resolve_device, resolve_precision
from ntkselect.selection.ntk.stage1 import embed
from ntkselect.selection.ntk.stage2 import domain_mean_gradient, projected_features, score_against
from ntkselect.training.warmup import WarmupOptions, add_lora


class PeakMemory:
    """Largest increase of memory during a ``with`` block, in MiB."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = self._rss()
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20 - self.base
        else:
            self._stop.set()
            self.thread.join()
            self.peak = max(self.peak, self._rss() - self.base)


def peak_rss_mib() -> float:
    """This process's own peak resident memory (VmHWM). Not getrusage's ru_maxrss, which a
    child inherits from its parent at fork on Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(device, fn):
    if device.type == "cuda":  # the first CUDA pass compiles kernels and grows the allocator: warm up, then time
        fn()
        torch.cuda.synchronize()
    with PeakMemory(device) as mem:
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        el = time.perf_counter() - t
    return out, el, mem.peak


def less_reference(model, examples, projector, rt):
    """One example at a time: full backward on Σ_k logits through peft's layers, then a dense projection."""
    params = [p for _, p in lora_parameters(model)]
    feats = []
    for i, e in enumerate(examples):
        b = collate([e], [i], rt.pad_id).to(rt.device)
        with rt.autocast():
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits  # (1, T, V)
        f = (logits.float().sum(-1) * b.target_mask).sum() / b.target_mask.sum()
        g = torch.autograd.grad(f, params)
        feats.append(projector.project(torch.cat([x.reshape(1, -1) for x in g], 1)))
    return torch.cat(feats)


@torch.no_grad()
def plain_forward(base, examples, rt):
    from ntkselect.data.batching import iter_batches, make_batches

    for batch in iter_batches(examples, make_batches([len(e.input_ids) for e in examples], rt.batch_size, rt.max_batch_tokens), rt.pad_id):
        batch = batch.to(rt.device)
        with rt.autocast():
            final_hidden(base, batch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="what `ntkselect select --model` takes, or `tiny` for the tests' tiny random Llama")
    ap.add_argument("--candidates", type=int, default=64, help="candidates to score (K)")
    ap.add_argument("--domain", type=int, default=16, help="domain examples for the mean gradient")
    ap.add_argument("--reference-max", type=int, default=4, help="time the slow reference on at most this many candidates (its rate is per candidate)")
    ap.add_argument("--pool", default=None, help="JSONL/CSV/... of candidates (default: the demo's MMLU + reasoning-gym pool)")
    ap.add_argument("--proj-dim", type=int, default=8192)
    ap.add_argument("--precision", default="float32", choices=("float32", "bfloat16", "auto"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--max-batch-tokens",
        type=int,
        default=4096,
        help="padded tokens per batch; the memory probe compares K/10 and K candidates, so K/10 should fill at least one batch",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: reference,projected,exact,stage1,memory")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # internal: the memory probe
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    if args.model == "tiny":
        args.model = tiny_model(Path(tempfile.mkdtemp(prefix="ntkselect-tiny-")) / "tiny")
    device = resolve_device(args.device)
    rt = Runtime(
        device=device, dtype=resolve_precision(args.precision, device), batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, progress=False
    )
    tok = load_tokenizer(args.model)
    rt.pad_id = tok.pad_token_id
    if args.pool:
        recs = load_records(args.pool)
    else:
        from ntkselect.data.demo import build_demo_data

        tmp = tempfile.mkdtemp()
        build_demo_data(tmp, n_domain=args.domain, n_pool_mmlu=max(args.candidates - args.candidates // 5, 1), n_pool_reasoning=args.candidates // 5, seed=0)
        recs = load_records(os.path.join(tmp, "pool.jsonl")) + load_records(os.path.join(tmp, "domain.jsonl"))
    ex, stats = tokenize_records(recs, tok, 512)
    cand, dom = ex[: args.candidates], ex[args.candidates : args.candidates + args.domain] or ex[: args.domain]
    n_tok = sum(len(e.input_ids) for e in cand)

    base = load_model(args.model).to(device)
    model = add_lora(load_model(args.model).to(device), WarmupOptions(seed=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a warmed-up-like adapter: peft starts B at zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.01)
    model.eval()
    dim = sum(p.numel() for _, p in lora_parameters(model))
    print(
        f"model {args.model}: LoRA gradient dimension {dim:,}; {len(cand)} candidates, {n_tok:,} tokens; "
        f"device {device}, precision {str(rt.dtype).replace('torch.', '')}, p = {args.proj_dim}",
        flush=True,
    )

    rows = {}

    def report(name, n, seconds, mem, extra=""):  # rates per candidate, so partial runs compare
        rows[name] = {"candidates_per_s": n / seconds, "tokens_per_s": (n_tok * n / len(cand)) / seconds, "seconds": seconds, "peak_mib": mem}
        print(f"{name:<11} {n / seconds:9.2f} cand/s {rows[name]['tokens_per_s']:10.0f} tok/s {seconds:8.1f} s  peak +{mem:8.0f} MiB {extra}", flush=True)

    if not args.probe:
        _, t, m = timed(device, functools.partial(plain_forward, base, cand, rt))
        report("forward", len(cand), t, m)
    del base
    if "exact" not in skip:
        if args.probe:  # any fixed vector: the probe measures the candidates' memory, not the domain's
            gbar = {n: torch.randn(p.shape, generator=g).to(p) for n, p in lora_parameters(model)}
        else:
            gbar = domain_mean_gradient(model, dom, rt)
        _, t, m = timed(device, lambda: score_against(model, cand, gbar, rt))
        report("exact", len(cand), t, m)
        if args.probe:
            print(
                json.dumps(
                    {
                        "probe_candidates": len(cand),
                        "max_rss_mib": peak_rss_mib(),
                        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
                    }
                )
            )
            return 0
    if "projected" not in skip:
        proj = RademacherProjector(dim, args.proj_dim, seed=0, device=device, dtype=rt.dtype)
        _, t, m = timed(device, lambda: projected_features(model, cand, proj, rt))
        report("projected", len(cand), t, m)
    if "reference" not in skip:
        nref = min(args.reference_max, len(cand))
        proj = RademacherProjector(dim, args.proj_dim, seed=0, device=device, dtype=torch.float32)
        _, t, m = timed(device, lambda: less_reference(model, cand[:nref], proj, rt))
        report("reference", nref, t, m, f"(timed on {nref} candidates)")
    if "stage1" not in skip:
        _, t, m = timed(device, lambda: embed(model, cand, rt))
        report("stage1", len(cand), t, m)
        print(
            f"stage 1 throughput {rows['stage1']['tokens_per_s']:.0f} tok/s = "
            f"{rows['stage1']['tokens_per_s'] / rows['forward']['tokens_per_s']:.2f} x the plain forward pass"
        )

    out = {
        "model": args.model,
        "candidates": len(cand),
        "tokens": n_tok,
        "grad_dim": dim,
        "proj_dim": args.proj_dim,
        "device": str(device),
        "precision": str(rt.dtype).replace("torch.", ""),
        "rows": rows,
    }
    r = lambda a, b: rows[a]["candidates_per_s"] / rows[b]["candidates_per_s"] if a in rows and b in rows else None
    out["exact_vs_reference"] = r("exact", "reference")
    out["projected_vs_reference"] = r("projected", "reference")
    out["exact_vs_forward"] = rows["exact"]["seconds"] / rows["forward"]["seconds"] if "exact" in rows else None
    out["projected_vs_forward"] = rows["projected"]["seconds"] / rows["forward"]["seconds"] if "projected" in rows else None
    if "memory" not in skip:
        # peak memory of the whole process (model included) for the exact mode on K/10 and K
        # candidates, each in a fresh process so that neither inherits the other's allocations
        probes = {}
        for k in (max(1, len(cand) // 10), len(cand)):
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--candidates", str(k), "--probe"]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            probes[k] = json.loads(res.stdout.strip().splitlines()[-1])
        key = "cuda_peak_mib" if device.type == "cuda" else "max_rss_mib"
        (k1, p1), (k2, p2) = probes.items()
        print(f"peak memory, exact mode: {p1[key]:.0f} MiB for {k1} candidates, {p2[key]:.0f} MiB for {k2}: x{p2[key] / p1[key]:.3f}")
        out["memory_probes"] = probes
        out["exact_memory_10x_pool"] = p2[key] / p1[key]
    out["stage1_vs_forward"] = rows["stage1"]["seconds"] / rows["forward"]["seconds"] if "stage1" in rows else None
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
