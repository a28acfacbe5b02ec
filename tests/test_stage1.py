"""Stage 1: embeddings and nearest-neighbour votes against a brute-force reference."""

from __future__ import annotations

import numpy as np
import torch

from helpers import make_lora_model
from ntkselect.model.runtime import Runtime
from ntkselect.selection.ntk.stage1 import embed, knn_votes, preselect, vote_degeneracy


def brute_votes(d, p, k):
    dn = d / np.linalg.norm(d, axis=1, keepdims=True)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    sims = dn @ pn.T  # (n_domain, n_pool)
    votes = np.zeros(len(p), np.int64)
    best = np.full(len(p), -np.inf)
    for row in sims:
        top = np.argsort(-row, kind="stable")[:k]
        votes[top] += 1
        best[top] = np.maximum(best[top], row[top])  # best cosine among its voters
    return votes, best


def test_votes_match_brute_force():
    rng = np.random.default_rng(0)
    d, p = rng.normal(size=(20, 16)).astype(np.float32), rng.normal(size=(200, 16)).astype(np.float32)
    votes, best = knn_votes(d, p, 7)
    ref_votes, ref_best = brute_votes(d, p, 7)
    np.testing.assert_array_equal(votes, ref_votes)
    assert votes.sum() == 20 * 7
    voted = votes > 0
    np.testing.assert_allclose(best[voted], ref_best[voted], rtol=1e-5)
    assert np.isneginf(best[~voted]).all()


def test_preselect_orders_by_votes_then_similarity_then_position():
    # two domain points; candidates 0..5 are duplicates in pairs so ties must be broken
    d = np.array([[1, 0], [0, 1]], np.float32)
    p = np.array([[1, 0.1], [1, 0.1], [0.1, 1], [0.1, 1], [1, 1], [-1, -1]], np.float32)
    res = preselect(d, p, m=5, k=3)
    assert res.votes.tolist() == [1, 1, 1, 1, 2, 0]
    # [4] has two votes; then the four one-vote candidates by best cosine (all equal), then position
    assert res.selected.tolist() == [4, 0, 1, 2, 3]
    assert preselect(d, p, m=5, k=3).selected.tolist() == res.selected.tolist()


def test_k_is_raised_until_enough_candidates_have_votes():
    rng = np.random.default_rng(1)
    d, p = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(100, 8)).astype(np.float32)
    res = preselect(d, p, m=40, k=2)
    assert res.k_used > 2
    assert (res.votes > 0).sum() >= 40
    assert len(res.selected) == 40 and len(set(res.selected.tolist())) == 40
    assert (res.votes[res.selected] > 0).all()


def test_m_larger_than_pool_keeps_everything():
    rng = np.random.default_rng(2)
    d, p = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(10, 8)).astype(np.float32)
    assert sorted(preselect(d, p, m=50, k=2).selected.tolist()) == list(range(10))


def brute_weighted(d, p, k, weight):
    """Each domain example's k nearest by cosine, weighted naively: (K - r) / K for the r-th, or its cosine."""
    d, p = d.astype(np.float64), p.astype(np.float64)
    dn = d / np.linalg.norm(d, axis=1, keepdims=True)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    w = np.zeros(len(p))
    for row in dn @ pn.T:
        for r, j in enumerate(np.argsort(-row, kind="stable")[:k]):
            w[j] += (k - r) / k if weight == "rank" else row[j]
    return w


def test_weighted_votes_match_brute_force_and_order_a_homogeneous_domain():
    rng = np.random.default_rng(3)
    centre = rng.normal(size=16)
    d = (centre + 0.01 * rng.normal(size=(10, 16))).astype(np.float32)  # near-copies of one template
    p = rng.normal(size=(60, 16)).astype(np.float32)
    count = preselect(d, p, m=8, k=8)
    deg = vote_degeneracy(count)
    assert deg["max_votes"] == 10 and deg["kept_at_max_votes"] == 1.0 and deg["distinct_vote_counts_kept"] == 1  # the count orders nothing
    for weight in ("rank", "similarity"):
        res = preselect(d, p, m=8, k=8, weight=weight)
        ref = brute_weighted(d, p, 8, weight)
        np.testing.assert_allclose(res.weight, ref, rtol=1e-6, atol=1e-9)  # the search runs in float32
        np.testing.assert_array_equal(res.votes, count.votes)
        assert res.selected.tolist() == np.lexsort((np.arange(60), -ref))[:8].tolist()
        deg = vote_degeneracy(res)
        assert deg["vote"] == weight and deg["distinct_vote_weights_kept"] > 1  # the weights still order it
    assert preselect(d, p, m=8, k=8, weight="rank").selected.tolist() == preselect(d, p, m=8, k=8, weight="rank").selected.tolist()


def test_count_vote_degeneracy_counts_distinct_votes():
    d = np.array([[1, 0], [0, 1]], np.float32)
    p = np.array([[1, 0.1], [1, 0.1], [0.1, 1], [0.1, 1], [1, 1], [-1, -1]], np.float32)
    res = preselect(d, p, m=5, k=3)
    assert vote_degeneracy(res) == {"vote": "count", "max_votes": 2, "kept_at_max_votes": 0.2, "distinct_vote_counts_kept": 2, "distinct_vote_counts": 2}


def test_embeddings_are_masked_means_and_batch_invariant(tiny_model_dir, examples, tokenizer, tmp_path):
    model = make_lora_model(tiny_model_dir)
    a = embed(model, examples, Runtime(batch_size=8, pad_id=tokenizer.pad_token_id, progress=False))
    b = embed(model, examples, Runtime(batch_size=3, padding_side="left", pad_id=tokenizer.pad_token_id, progress=False), out_path=tmp_path / "e.npy")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), b)  # disk-backed copy is complete
    e = examples[0]
    with torch.no_grad():  # one example alone, with the adapter applied (not merged)
        h = model.get_base_model().model(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0]
    np.testing.assert_allclose(a[0], h.mean(0).numpy(), rtol=1e-4, atol=1e-5)
    assert a.shape == (len(examples), 32)
    # the fused forward used for speed leaves the model exactly as it was
    assert all(m.merged is False for m in model.modules() if hasattr(m, "merged"))
    with torch.no_grad():
        h2 = model.get_base_model().model(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0]
    assert torch.equal(h, h2)


class _Counted:
    """A shard that counts the rows read from it."""

    def __init__(self, a, log):
        self.a, self.log = a, log

    def __len__(self):
        return len(self.a)

    def __getitem__(self, key):
        out = self.a[key]
        self.log.append(len(out))
        return out


def test_search_is_piece_and_sharding_invariant_and_reads_the_pool_once(monkeypatch):
    """Pieces of a few rows and chunks of a few queries (a tiny budget) give the same top-k, ties
    included (duplicated rows: the earlier position first), and every pool row is read once."""
    from ntkselect.selection.ntk import stage1
    from ntkselect.selection.tsds import tsds

    rng = np.random.default_rng(3)
    d, p = rng.normal(size=(9, 6)).astype(np.float32), rng.normal(size=(150, 6)).astype(np.float32)
    p[100:110] = p[10:20]  # exact duplicates: equal cosines
    ref_s, ref_i = stage1.knn_search(d, p, 12)
    monkeypatch.setattr(stage1, "SEARCH_BUDGET", 40)  # pieces of 12 rows, 1-2 queries per sort
    log: list[int] = []
    shards = [_Counted(p[a:b], log) for a, b in ((0, 37), (37, 38), (38, 150))]
    got_s, got_i = stage1.knn_search(d, shards, 12)
    np.testing.assert_array_equal(got_i, ref_i)
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-6)  # a matmul's last bit depends on its shape
    assert sum(log) == len(p)
    for row_i, row_s in zip(ref_i, ref_s):  # equal cosines: earlier pool position first
        for j in range(len(row_i) - 1):
            assert row_s[j] > row_s[j + 1] or row_i[j] < row_i[j + 1]
    sims = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float64) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    np.testing.assert_allclose(ref_s, -np.sort(-sims, axis=1)[:, :12], rtol=1e-6, atol=1e-6)  # float32 cosines, float64 reference
    log.clear()
    r = tsds(d, shards, max_k=5, kde_k=3)
    assert sum(log) == len(p) + r.neighbourhood  # the search's one read, then U's rows for the KDE
