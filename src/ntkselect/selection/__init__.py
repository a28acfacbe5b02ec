"""ntkselect.selection: the selectors behind one interface, and their registry.

==========  ================================================================================
ntk         NTK-Selector: stage-1 votes keep M = factor x N, stage-2 Jacobian-free NTK mean score
            (:mod:`~ntkselect.selection.ntk`)
random      a seeded uniform sample of the pool (:mod:`~ntkselect.selection.random`)
embedding   stage 1's embeddings alone: top N by mean cosine to D (:mod:`~ntkselect.selection.embedding`)
bm25        lexical: mean BM25 score of each candidate over the domain examples as queries
            (:mod:`~ntkselect.selection.bm25`)
less        LESS (Xia et al. 2024): warm-up LoRA, Adam-preconditioned per-example loss
            gradients of the candidates, SGD gradients of D, Rademacher-projected, cosine,
            max over D (:mod:`~ntkselect.selection.less`)
tsds        TSDS (Liu et al. 2024) on stage 1's embeddings: optimal transport to D with a KDE
            near-duplicate penalty gives a probability per candidate; N distinct drawn without
            replacement in proportion to it (:mod:`~ntkselect.selection.tsds`)
ntk-plus    NTK-Selector variants beyond the paper, same stage 1: --kernel sum / trace / loss,
            --normalise, --diverse, --ensemble; presets ntk-norm, ntk-trace, ntk-loss,
            ntk-diverse, ntk-ensemble, ntk-cos (cosine kernel), ntk-vote (weighted stage-1 vote)
            change one thing each (:mod:`~ntkselect.selection.ntk_variants`)
ntk-rules   NTK gradient features of D and stage 1's candidates, unit / centred / whitened, by
            mean, max, round robin or TSDS over D; presets ntk-max, ntk-rr, ntk-whiten,
            ntk-tsds (:mod:`~ntkselect.selection.ntk_rules`)
==========  ================================================================================

Each module registers its selector (:func:`~ntkselect.selection.registry.register_selector`)
when imported; this package imports them all, in the order ``--method`` lists them.
"""

from ntkselect.selection.base import Ranking, SelectionContext, Selector, ordered
from ntkselect.selection.registry import (
    SelectorSpec,
    find_selector,
    get_selector,
    register_selector,
    selector_names,
    selector_spec,
    selector_specs,
    unregister_selector,
)

# the built-in selectors register themselves on import (keep this order: it is --method's, so isort must not sort it)
# isort: off
from ntkselect.selection.ntk import selector as _ntk  # noqa: F401,E402
from ntkselect.selection import random as _random  # noqa: F401,E402
from ntkselect.selection import embedding as _embedding  # noqa: F401,E402
from ntkselect.selection import bm25 as _bm25  # noqa: F401,E402
from ntkselect.selection import less as _less  # noqa: F401,E402
from ntkselect.selection import tsds as _tsds  # noqa: F401,E402
from ntkselect.selection.ntk_variants import selector as _ntk_variants  # noqa: F401,E402
from ntkselect.selection.ntk_rules import selector as _ntk_rules  # noqa: F401,E402
# isort: on

__all__ = [
    "Ranking",
    "SelectionContext",
    "Selector",
    "ordered",
    "SelectorSpec",
    "register_selector",
    "unregister_selector",
    "get_selector",
    "selector_spec",
    "find_selector",
    "selector_names",
    "selector_specs",
]
