"""NTK-Selector variants beyond the paper (issue 11): other kernels, normalised scores, a
diversity-aware selection rule, a checkpoint ensemble. ``--method ntk`` stays the paper's
method; these are ``--method ntk-plus`` (any combination) and the one-change presets
``ntk-norm``, ``ntk-trace``, ``ntk-loss``, ``ntk-diverse`` and ``ntk-ensemble``
(:mod:`~ntkselect.selection.ntk_variants.selector`).

* :mod:`~ntkselect.selection.ntk_variants.kernels`: the kernels (summed logits, Hutchinson
  trace, loss) as mean-kernel scores through fixed vectors, and the candidates' gradient norms
  from the LoRA hooks' factors;
* :mod:`~ntkselect.selection.ntk_variants.diversity`: the greedy score-minus-redundancy rule;
* :mod:`~ntkselect.selection.ntk_variants.ensemble`: warm-up checkpoints for the ensemble kernel.
"""
