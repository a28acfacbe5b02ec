"""ntkselect: select auxiliary fine-tuning data with the Jacobian-free NTK (NTK-Selector).

The public API, small on purpose:

* run a selection: :func:`select` with a :class:`SelectConfig` (what ``ntkselect select`` runs),
  returning a :class:`SelectionResult`; compare methods: :func:`run_evaluation` with an
  :class:`EvalConfig` (``ntkselect evaluate``); stage 2 alone: :func:`run_stage2`;
* add a selector: subclass :class:`Selector`, return a :class:`Ranking` from its ``rank`` given a
  :class:`SelectionContext`, and :func:`register_selector` it (``docs/ADDING_A_SELECTOR.md``);
  :func:`get_selector` and :func:`selector_names` read the registry;
* every user-facing failure is an :class:`NtkSelectError` with a one-line message.

The stages live in their own modules: :mod:`ntkselect.training.warmup`,
:mod:`ntkselect.selection.ntk.stage1`, :mod:`ntkselect.selection.ntk.stage2`; the selectors in
:mod:`ntkselect.selection`.
"""

from ntkselect.config import SelectConfig
from ntkselect.errors import NtkSelectError
from ntkselect.evaluation.harness import EvalConfig, run_evaluation
from ntkselect.pipeline import SelectionResult, select
from ntkselect.selection import Ranking, SelectionContext, Selector, get_selector, register_selector, selector_names
from ntkselect.selection.ntk.stage2 import run_stage2

__version__ = "0.1.0"

__all__ = [
    "select",
    "SelectConfig",
    "SelectionResult",
    "run_evaluation",
    "EvalConfig",
    "run_stage2",
    "Selector",
    "Ranking",
    "SelectionContext",
    "register_selector",
    "get_selector",
    "selector_names",
    "NtkSelectError",
]
