"""Per-example gradient features for the selection rules: F(x) = [φ(∇f_1(x)), ..., φ(∇f_G(x))] / √G
(:func:`~ntkselect.selection.ntk_variants.kernels.kernel_features`), so ⟨F(x), F(x')⟩ is the
(projected) kernel Θ(x, x') of the variant's objectives f_g, with φ the seeded Rademacher
projection to ``--feature-dim`` p dimensions (the identity for p = 0).

Unlike ntk's stage 2, which contracts every candidate against one fixed vector, a rule that
looks at each domain example separately (max, round robin, transport) or at the features'
covariance (whitening) needs the features themselves: |D| x G p for the domain (computed here)
and M x G p for stage 1's candidates (the :data:`FEATURES` shard task, each shard kept on disk).
Their cost is LESS's on M candidates instead of the pool: one forward + backward per example and
objective, and the projection of each chunk of per-example gradients (one pass over the
projection blocks per chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ntkselect.grads.projection import make_projector
from ntkselect.runs.shards import ShardTask, register_task
from ntkselect.selection.ntk_variants.kernels import Kernel, kernel_features

__all__ = ["FeaturePayload", "FEATURES", "features_of"]


@dataclass
class FeaturePayload:
    """The :data:`FEATURES` task's input: the objectives, the LoRA gradient size and the projection."""

    kernel: Kernel
    dim: int  # D, the LoRA gradient size
    proj_dim: int  # p (0: unprojected)
    seed: int  # the projection's seed


def features_of(model, examples, rt, payload: FeaturePayload, ids=None, desc="rules: gradient features") -> np.ndarray:
    """(n, G p) float32 features of ``examples`` (p = D when unprojected), in input order."""
    projector = make_projector(payload.dim, payload.proj_dim, payload.seed, device=rt.device)
    return kernel_features(model, examples, rt, payload.kernel, projector, desc=desc, ids=ids)


#: the shard task of the candidates' gradient features
FEATURES = register_task(ShardTask("rule-features", features_of, FeaturePayload))
