"""TSDS (--method tsds): the probabilities against a naive transcription of the authors'
algorithm (dense distances, a heap, loops), the distinct draw, sharding, duplicates, the CLI."""

from __future__ import annotations

import heapq
import json

import numpy as np
import pytest

from helpers import PLAN_POOL, plan_config, write_eval_data
from ntkselect.cli.main import main
from ntkselect.selection.tsds import draw_order, tsds


def brute_tsds(dom, pool, alpha, c, sigma, max_k, kde_k):
    """TSDS as the authors' tsds.py computes it, written out naively: dense Euclidean distances of
    the unit-normalised rows, sorted neighbour lists, the KDE from a dense distance matrix among
    the neighbourhood union, the heap sweep over (count, k, j) with the running total cost, then
    the per-query assignment with lastK. One change, as in ntkselect: a query never reached by the
    sweep gives its nearest candidate its whole 1/M (the original stops on an assertion)."""
    q = dom / np.linalg.norm(dom, axis=1, keepdims=True)
    x = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    m, n = len(q), len(x)
    big_k = min(n, max(2, min(max_k, n // 10)))
    kde_kk = min(n, max(1, min(kde_k, n // 10)))
    dist = np.sqrt(((q[:, None, :] - x[None, :, :]) ** 2).sum(-1))  # (M, n)
    nb = [sorted(range(n), key=lambda i: (dist[j, i], i))[:big_k] for j in range(m)]
    union = sorted({i for row in nb for i in row})
    rho = {}
    for u in union:
        d2 = sorted(float(((x[u] - x[v]) ** 2).sum()) for v in union)[:kde_kk]
        rho[u] = 1.0 if sigma == 0 else sum(max(0.0, 1 - e / sigma**2) for e in d2)
    w = [[1 / rho[i] for i in row] for row in nb]
    d = [[dist[j, i] for i in row] for j, row in enumerate(nb)]
    heap = [(w[j][0], 0, j) for j in range(m)]
    heapq.heapify(heap)
    wsum = [d[j][0] * w[j][0] for j in range(m)]
    cost, total, last, s = [0.0] * m, 0.0, [None] * m, None
    while heap:
        count, k, j = heapq.heappop(heap)
        s = count
        total -= cost[j]
        cost[j] = d[j][k + 1] * count - wsum[j]
        total += cost[j]
        if alpha / c * total >= (1 - alpha) * m:
            break
        last[j] = k
        if k < big_k - 2:
            heapq.heappush(heap, (count + w[j][k + 1], k + 1, j))
            wsum[j] += d[j][k + 1] * w[j][k + 1]
    probs = np.zeros(n)
    for j in range(m):
        if last[j] is None and w[j][0] > s:
            probs[nb[j][0]] += 1 / m
            continue
        top = last[j] or 0
        given = 0.0
        for k in range(top + 1):
            probs[nb[j][k]] += w[j][k] / (m * s)
            given += w[j][k] / (m * s)
        probs[nb[j][top + 1]] += max(1 / m - given, 0.0)
    return probs, s, union, rho


def clustered(seed, m=12, n=240, dim=8, spread=0.15):
    """Domain and pool around a few shared centres, so that neighbourhoods overlap and the KDE sees near-duplicates."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, dim))
    pool = centres[rng.integers(0, 5, n)] + spread * rng.normal(size=(n, dim))
    dom = centres[rng.integers(0, 5, m)] + spread * rng.normal(size=(m, dim))
    return dom, pool.astype(np.float32)


CASES = [  # alpha, C, sigma, max_k, kde_k
    (0.5, 5.0, 0.75, 5000, 1000),  # the defaults: K = kde K = n // 10 = 24
    (0.5, 0.2, 0.75, 12, 8),  # small C: the alpha / C condition stops the sweep
    (0.9, 0.05, 0.5, 10, 5),  # stops early
    (1.0, 5.0, 0.75, 6, 4),  # alpha = 1: stops at the first breakpoint, the other queries are capped
    (0.0, 5.0, 0.75, 7, 30),  # alpha = 0: never stops
    (0.5, 0.2, 0.0, 9, 3),  # sigma = 0: no KDE
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_probabilities_equal_a_naive_transcription(case, seed):
    alpha, c, sigma, max_k, kde_k = case
    dom, pool = clustered(seed)
    r = tsds(dom, pool, alpha=alpha, c=c, sigma=sigma, max_k=max_k, kde_k=kde_k)
    want, s, union, rho = brute_tsds(dom.astype(np.float64), pool.astype(np.float64), alpha, c, sigma, max_k, kde_k)
    # the search and the KDE's kernel values are float32 (the reference: float64), the rest float64
    # (a share 1/M - S/(M s) cancels: its error is relative to 1/M, not to itself)
    np.testing.assert_allclose(r.probs, want, rtol=1e-5, atol=1e-6 / len(dom))
    # a candidate whose share is 1/M - S/(M s) = 0 up to rounding (~1e-17) may come out 0 or not
    np.testing.assert_array_equal(r.probs > 1e-12, want > 1e-12)
    assert r.level == pytest.approx(s, rel=1e-5)
    assert r.neighbourhood == len(union)
    np.testing.assert_allclose(r.kde[union], [rho[u] for u in union], rtol=1e-5)
    assert r.probs.sum() == pytest.approx(1.0)
    clean = lambda p: np.where(p > 1e-12, p, 0.0)  # noqa: E731
    np.testing.assert_array_equal(draw_order(clean(r.probs), r.nearest, 0), draw_order(clean(want), r.nearest, 0))  # the same selection


def test_the_cases_cover_stopping_capping_and_duplicates():
    """The cases above are only a check if they reach every branch."""
    dom, pool = clustered(0)
    runs = [tsds(dom, pool, alpha=a, c=c, sigma=s, max_k=k, kde_k=kk) for a, c, s, k, kk in CASES]
    assert any(r.stopped for r in runs) and any(not r.stopped for r in runs)
    assert runs[3].capped_queries > 0 and runs[0].capped_queries == 0
    assert runs[0].near_duplicates > 1 and runs[5].near_duplicates is None
    assert len({int((r.probs > 0).sum()) for r in runs}) > 2


def test_sharding_does_not_change_the_probabilities(tmp_path):
    dom, pool = clustered(2)
    whole = tsds(dom, pool, c=0.3)
    cuts = [1, 2, 40, 41, 130, 239]
    shards = []
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(pool)])):  # memory-mapped, as the pool's embedding shards are
        np.save(tmp_path / f"{i}.npy", pool[a:b])
        shards.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    split = tsds(dom, shards, c=0.3)
    np.testing.assert_allclose(split.probs, whole.probs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(split.kde, whole.kde, rtol=1e-12)
    assert split.level == pytest.approx(whole.level, rel=1e-12)


def test_draw_is_deterministic_for_a_seed_and_follows_p():
    p = np.array([0.5, 0.3, 0.2, 0.0, 0.0, 0.0])
    near = np.array([0.0, 0.0, 0.0, 0.1, 0.9, 0.1])
    a, b = draw_order(p, near, 7), draw_order(p, near, 7)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(6))
    assert a[3:].tolist() == [4, 3, 5]  # p = 0: best cosine to the domain, then pool position
    firsts = np.bincount([draw_order(p, near, s)[0] for s in range(3000)], minlength=6) / 3000
    np.testing.assert_allclose(firsts[:3], p[:3], atol=0.03)  # the first draw is in proportion to p
    seconds = np.mean([draw_order(p, near, s)[1] == 2 for s in range(3000)])
    assert seconds == pytest.approx(0.5 * 0.2 / 0.5 + 0.3 * 0.2 / 0.7, abs=0.03)  # then without replacement


def test_different_seeds_draw_differently():
    dom, pool = clustered(3)
    r = tsds(dom, pool)
    orders = {tuple(draw_order(r.probs, r.nearest, s)[:10]) for s in range(4)}
    assert len(orders) == 4


def test_n_distinct_even_when_few_have_probability():
    dom, pool = clustered(4, m=3)
    r = tsds(dom, pool, alpha=1.0)  # each domain example gives everything to its nearest candidate
    nonzero = np.flatnonzero(r.probs > 0)
    assert 1 <= len(nonzero) <= 3
    order = draw_order(r.probs, r.nearest, 0)
    assert len(set(order[:50].tolist())) == 50 and sorted(order.tolist()) == list(range(len(pool)))
    assert set(order[: len(nonzero)].tolist()) == set(nonzero.tolist())
    rest = r.nearest[order[len(nonzero) :]]
    assert (np.diff(rest) <= 0).all()  # then by best cosine to the domain


def test_duplicates_share_the_mass_of_one_candidate():
    """One query between a single candidate a and three copies of b, equally near; far fillers.
    Without the KDE the copies get 3x a's mass together; with it, as much as a."""
    ang = np.deg2rad
    q = np.array([[1.0, 0.0, 0.0]])
    a = [np.cos(ang(30)), np.sin(ang(30)), 0.0]
    b = [np.cos(ang(30)), -np.sin(ang(30)), 0.0]  # |a - b| = 1 > sigma, |q - a| = |q - b| = 0.52
    rng = np.random.default_rng(0)
    fill = -np.abs(rng.normal(size=(56, 3))) - [3.0, 0.0, 0.0]  # the far side of the sphere
    pool = np.vstack([a, b, b, b, fill]).astype(np.float32)
    for sigma, ratio in ((0.0, 3.0), (0.75, 1.0)):
        r = tsds(q, pool, alpha=0.0, sigma=sigma, max_k=6, kde_k=6)  # alpha = 0: all K = 6 neighbours share the mass
        assert r.probs[1:4].sum() / r.probs[0] == pytest.approx(ratio)
        assert r.probs[1] == pytest.approx(r.probs[2]) == pytest.approx(r.probs[3])


def _select(data, model, out, *extra):
    dom, pool, _ = data
    args = [
        "select",
        "--domain",
        dom,
        "--pool",
        pool,
        "--out",
        out,
        "--model",
        model,
        "--method",
        "tsds",
        "--warmup-epochs",
        1,
        "--batch-size",
        4,
        "--max-batch-tokens",
        512,
        *extra,
    ]
    assert main([str(a) for a in args]) == 0
    rows = lambda f: [json.loads(line) for line in (out / f).read_text().splitlines()]  # noqa: E731
    return rows("selected.jsonl"), rows("scores.jsonl"), json.loads((out / "manifest.json").read_text())


def test_cli_select_method_tsds(data, tiny_model_dir, tmp_path, capsys):
    sel, scores, man = _select(data, tiny_model_dir, tmp_path / "a", "--n", 5)
    info = man["selector"]
    assert (info["alpha"], info["C"], info["sigma"], info["max_k"], info["kde_k"]) == (0.5, 5.0, 0.75, 5000, 1000)
    assert info["k_used"] == 2 and info["kde_k_used"] == 2  # 25 candidates: the pool // 10 caps, K at least 2
    assert "Efraimidis" in info["sampling"] and man["cost"]["tokens"] > 0 and (tmp_path / "a" / "adapter").exists()
    assert len(scores) == 25 and sum(r["score"] for r in scores) == pytest.approx(1.0)
    assert [r["selected"] for r in scores] == [True] * 5 + [False] * 20
    assert all(r["selection_score"] > 0 for r in sel) and len({r["selection_rank"] for r in sel}) == 5
    assert [r["selection_score"] for r in sel] == [r["score"] for r in scores[:5]]
    # more than have probability: the rest come from the zero-probability candidates, and the log says so
    sel, scores, man = _select(data, tiny_model_dir, tmp_path / "b", "--n", 12, "--tsds-alpha", 1)
    nz = man["selector"]["nonzero_probability"]
    assert nz < 12 and "nonzero probability" in capsys.readouterr().out
    assert len({json.dumps(r, sort_keys=True) for r in sel}) == 12
    assert all(r["score"] > 0 for r in scores[:nz]) and all(r["score"] == 0 for r in scores[nz:])


def test_bad_tsds_option_names_the_flag(data, tiny_model_dir, tmp_path, capsys):
    dom, pool, _ = data
    for flag, value in (("--tsds-alpha", 1.5), ("--tsds-c", 0), ("--tsds-sigma", -1), ("--tsds-max-k", 1), ("--tsds-kde-k", 0)):
        argv = ["select", "--domain", dom, "--pool", pool, "--n", 3, "--out", tmp_path / "x", "--method", "tsds", flag, value]
        assert main([str(a) for a in argv]) == 2
        assert flag in capsys.readouterr().err


def test_dry_run_prices_tsds(plan_files, tiny_model_dir, tmp_path):
    from ntkselect.runs.plan import estimate

    plan = estimate(plan_config(plan_files, tiny_model_dir, tmp_path / "run", method="tsds"))
    assert [s["stage"] for s in plan["stages"]] == ["load", "warm-up", "stage 1"]
    assert plan["model"] is not None and plan["disk"]["adapter"] > 0
    assert plan["disk"]["embeddings"] == (len(PLAN_POOL) - 1) * plan["model"]["hidden_size"] * 4


def test_evaluate_adds_tsds_to_a_finished_evaluation(tiny_model_dir, tmp_path, capsys):
    """`evaluate --methods tsds` runs, passes the --tsds-* options on, and joins an evaluation
    that was run without it (at the defaults the tsds options are not part of its fingerprint)."""
    from ntkselect.evaluation.harness import EvalConfig

    p = write_eval_data(tmp_path)
    out = tmp_path / "ev"
    args = [
        "evaluate",
        "--domain-train",
        p["train"],
        "--domain-test",
        p["test"],
        "--pool",
        p["pool"],
        "--n",
        3,
        "--out",
        out,
        "--model",
        tiny_model_dir,
        "--seeds",
        1,
        "--ft-epochs",
        1,
        "--ft-batch-size",
        4,
        "--batch-size",
        4,
        "--max-batch-tokens",
        512,
    ]
    assert main([str(a) for a in [*args, "--methods", "domain-only"]]) == 0
    before = (out / "cells" / "domain-only-seed0.json").stat().st_mtime_ns
    assert main([str(a) for a in [*args, "--methods", "domain-only,tsds"]]) == 0
    assert (out / "cells" / "domain-only-seed0.json").stat().st_mtime_ns == before  # reused
    cell = json.loads((out / "cells" / "tsds-seed0.json").read_text())
    assert cell["n_selected"] == 3 and cell["test_overlap"] == 0
    man = json.loads((out / "selections" / "tsds-seed0" / "manifest.json").read_text())
    assert man["method"] == "tsds" and man["selector"]["alpha"] == 0.5
    capsys.readouterr()
    assert main([str(a) for a in [*args, "--methods", "tsds", "--tsds-alpha", 0.9]]) == 2  # changed: refused, named
    assert "tsds_alpha" in capsys.readouterr().err
    cfg = EvalConfig(domain_train="a", domain_test="b", pool="c", n=1, out="o", tsds_alpha=0.25, tsds_c=2.0, tsds_sigma=0.0, tsds_max_k=7, tsds_kde_k=3)
    s = cfg.select_config("tsds", 0, "o")
    assert (s.method, s.tsds_alpha, s.tsds_c, s.tsds_sigma, s.tsds_max_k, s.tsds_kde_k) == ("tsds", 0.25, 2.0, 0.0, 7, 3)
