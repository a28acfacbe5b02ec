"""Every selector: N distinct pool ids, deterministic for a seed, the same output files; and
the LESS gradients against a naive autograd loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import make_lora_model
from ntkselect.cli.main import main
from ntkselect.selection import selector_names


def _run(data, model, out, method, seed=0, *extra):
    dom, pool, _ = data
    args = [
        "select",
        "--domain",
        dom,
        "--pool",
        pool,
        "--n",
        5,
        "--out",
        out,
        "--model",
        model,
        "--method",
        method,
        "--seed",
        seed,
        "--warmup-epochs",
        1,
        "--knn-k",
        2,
        "--less-proj-dim",
        64,
        "--batch-size",
        4,
        "--max-batch-tokens",
        512,
        *extra,
    ]
    assert main([str(a) for a in args]) == 0
    sel = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    return sel, json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("method", selector_names())
def test_each_selector_returns_n_distinct_pool_ids_deterministically(data, tiny_model_dir, tmp_path, method):
    _, _, pool = data
    a, man = _run(data, tiny_model_dir, tmp_path / "a", method)
    b, _ = _run(data, tiny_model_dir, tmp_path / "b", method)
    ids = [r.get("id") or str(pool.index({k: v for k, v in r.items() if not k.startswith("selection_")})) for r in a]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert all(r["selection_method"] == method for r in a)
    if method == "tsds":  # in the order drawn; the score is the probability it was drawn with
        assert all(0 < r["selection_score"] <= 1 for r in a)
    elif method == "ntk-tsds":  # as tsds, over stage 1's candidates (fewer than N may have a nonzero probability)
        assert all(0 <= r["selection_score"] <= 1 for r in a)
    elif method == "ntk-rr":  # in the order taken; the score is the cosine of the take
        assert all(-1 - 1e-9 <= r["selection_score"] <= 1 + 1e-9 for r in a)
    else:
        assert [r["selection_score"] for r in a] == sorted((r["selection_score"] for r in a), reverse=True)
    assert a == b  # same seed, same selection and scores
    for f in ("selected.jsonl", "scores.jsonl", "train.jsonl", "manifest.json"):
        assert (tmp_path / "a" / f).exists()
    assert (tmp_path / "a" / "adapter").exists() == (method in ("ntk", "less", "embedding", "tsds") or method.startswith("ntk-"))
    assert man["method"] == method and man["cost"]["seconds"] >= 0 and man["cost"]["tokens"] >= 0
    assert len((tmp_path / "a" / "train.jsonl").read_text().splitlines()) == 8 + 5


def test_random_depends_on_seed(data, tiny_model_dir, tmp_path):
    a, _ = _run(data, tiny_model_dir, tmp_path / "a", "random", 0)
    b, _ = _run(data, tiny_model_dir, tmp_path / "b", "random", 1)
    assert [r.get("id") for r in a] != [r.get("id") for r in b]


def test_bm25_prefers_lexical_matches(data, tiny_model_dir, tmp_path):
    # the domain asks about the eight medical topics; the pool's medicine records name them
    sel, _ = _run(data, tiny_model_dir, tmp_path / "a", "bm25")
    assert all(r.get("source") == "medicine" for r in sel)


def test_embedding_score_is_mean_cosine(tiny_model_dir, tokenizer):
    from ntkselect.config import SelectConfig
    from ntkselect.data.records import Record, tokenize_records
    from ntkselect.model.runtime import Runtime
    from ntkselect.selection import SelectionContext, get_selector

    texts = [{"text": f"sample number {i} about {w}"} for i, w in enumerate(["hearts", "lungs", "laws", "sums", "cells", "bones", "maps"])]
    recs = [Record(id=str(i), raw=t, path="m.jsonl", line=i + 1) for i, t in enumerate(texts)]
    ex, _ = tokenize_records(recs, tokenizer, 64)
    cfg = SelectConfig(domain="-", pool="-", n=2, out="-", model=tiny_model_dir, warmup_epochs=0)
    ctx = SelectionContext(cfg, recs[:2], recs[2:], ex[:2], ex[2:], Runtime(pad_id=tokenizer.pad_token_id, progress=False), log=lambda *_: None)
    r = get_selector("embedding").rank(ctx, 2)
    dom, shards = ctx.embeddings()
    pool = np.concatenate([np.asarray(x) for x in shards])
    cos = (pool / np.linalg.norm(pool, axis=1, keepdims=True)) @ (dom / np.linalg.norm(dom, axis=1, keepdims=True)).T  # (5, 2)
    expect = cos.mean(1)
    assert np.allclose(r.scores, expect[r.order], atol=1e-5)
    assert list(r.order) == list(np.argsort(-expect, kind="stable"))


def test_less_features_equal_naive_adam_preconditioned_loss_gradients(tiny_model_dir, examples, tokenizer):
    """LESS's candidate features: the per-example loss gradient from the hooks, Adam-transformed,
    projected, equal the same computed one example at a time with autograd."""
    from ntkselect.data.batching import collate
    from ntkselect.grads.fused import flatten_grads, lora_parameters
    from ntkselect.grads.projection import RademacherProjector
    from ntkselect.model.runtime import Runtime
    from ntkselect.selection.ntk.stage2 import projected_features
    from ntkselect.training.warmup import per_example_loss, trained_token_loss

    model = make_lora_model(tiny_model_dir)
    names = [n for n, _ in lora_parameters(model)]
    dim = sum(p.numel() for _, p in lora_parameters(model))
    g = torch.Generator().manual_seed(3)
    m, v = torch.randn(dim, generator=g) * 1e-3, torch.rand(dim, generator=g) * 1e-5

    def adam(x):
        return (0.9 * m + 0.1 * x) / torch.sqrt(0.999 * v + 0.001 * x * x + 1e-8)

    proj = RademacherProjector(dim, 128, seed=5)
    rt = Runtime(batch_size=3, pad_id=tokenizer.pad_token_id, progress=False, dtype=torch.float32)
    got = projected_features(model, examples, proj, rt, objective=per_example_loss, transform=adam)  # (n, 128)
    params = [p for _, p in lora_parameters(model)]
    for i, ex in enumerate(examples):
        batch = collate([ex], [0], tokenizer.pad_token_id)
        grads = torch.autograd.grad(trained_token_loss(model, batch), params)
        flat = flatten_grads({n: gr.unsqueeze(0) for n, gr in zip(names, grads)}, names)
        want = proj.project(adam(flat)).numpy()[0]
        assert np.allclose(got[i], want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
