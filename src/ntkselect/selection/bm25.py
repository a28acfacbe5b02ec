"""``--method bm25``: lexical, the mean BM25 score of each candidate over the domain examples as queries."""

from __future__ import annotations

import importlib.util
import logging
import time

import numpy as np

from ntkselect.config import SelectConfig
from ntkselect.data.records import record_text
from ntkselect.errors import NtkSelectError
from ntkselect.selection.base import Ranking, SelectionContext, Selector, ordered
from ntkselect.selection.registry import register_selector

__all__ = ["BM25Selector"]

logger = logging.getLogger(__name__)

_MISSING = "--method bm25 needs the bm25s package: pip install 'ntkselect[baselines]'"


def _check(cfg: SelectConfig) -> None:
    if importlib.util.find_spec("bm25s") is None:
        raise NtkSelectError(_MISSING)


@register_selector("bm25", check=_check)
class BM25Selector(Selector):
    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        try:
            import bm25s
        except ImportError:
            raise NtkSelectError(_MISSING) from None
        t = time.perf_counter()
        corpus = [record_text(r.raw) for r in ctx.pool]
        queries = [record_text(r.raw) for r in ctx.domain]
        tok = bm25s.tokenize(corpus, stopwords="en", show_progress=False)
        if not tok.vocab:  # bm25s cannot index a corpus without a single term
            raise NtkSelectError(
                f"--method bm25: no record of --pool {ctx.cfg.pool} has a word BM25 can match (two or more letters or digits, not an "
                "English stop word), so every score would be 0; use another --method"
            )
        retriever = bm25s.BM25()  # Lucene variant, k1 = 1.5, b = 0.75
        retriever.index(tok, show_progress=False)
        vocab = tok.vocab  # {word: id}
        q_tok = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
        scores = np.zeros(len(corpus))
        for words in q_tok:
            known = [w for w in words if w in vocab]
            if known:
                scores += retriever.get_scores(known)
        scores /= max(1, len(queries))
        if not scores.any():
            logger.warning(
                "ntkselect: warning: --method bm25: no domain example shares a word with the pool, so every score is 0 and the "
                "selection is the pool's first --n records; a lexical method cannot rank this pool, consider another --method"
            )
        order, sc = ordered(np.arange(len(corpus)), scores)
        return Ranking(
            order,
            sc,
            info={
                "rule": "mean over domain queries of the BM25 score (bm25s, Lucene, k1=1.5, b=0.75, English stopwords)",
                "bm25s": getattr(bm25s, "__version__", "?"),
            },
            seconds=time.perf_counter() - t,
        )
