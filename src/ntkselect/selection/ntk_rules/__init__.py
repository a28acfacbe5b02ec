"""Selection rules on explicit per-example gradient features (issue 25): the cosine of unit,
centred or whitened NTK features, aggregated over the domain examples by their mean, their max,
round robin, or TSDS's transport and density. ``--method ntk-max``, ``ntk-rr``, ``ntk-whiten``,
``ntk-tsds`` and ``ntk-rules`` (any combination; :mod:`~ntkselect.selection.ntk_rules.selector`).

* :mod:`~ntkselect.selection.ntk_rules.features`: the features φ(∇f(x)) of D and of stage 1's
  candidates (the candidates shard by shard, resumable);
* :mod:`~ntkselect.selection.ntk_rules.rules`: the transforms (unit, centre, whiten) and the
  aggregations (mean, max, round robin), plain numpy on the features.
"""
