"""ntkselect: select auxiliary fine-tuning data with the Jacobian-free NTK (NTK-Selector).

The pipeline is one module per stage: :mod:`~ntkselect.training.warmup`, :mod:`~ntkselect.selection.ntk.stage1`,
:mod:`~ntkselect.selection.ntk.stage2`; :func:`select` runs them all from a :class:`SelectConfig`; :func:`run_evaluation` compares NTK-Selector
with the baselines in :mod:`~ntkselect.selection.selectors` by fine-tuning and testing.
"""

from ntkselect.config import SelectConfig
from ntkselect.data.records import Record, load_records, tokenize_records
from ntkselect.diagnostics.diagnose import DiagnoseOptions, diagnose
from ntkselect.errors import NtkSelectError
from ntkselect.evaluation.harness import EvalConfig, run_evaluation
from ntkselect.evaluation.metrics import evaluate_mc, mc_items
from ntkselect.training.finetune import FinetuneRecipe, finetune
from ntkselect.pipeline import SelectionResult, select
from ntkselect.grads.projection import RademacherProjector
from ntkselect.report.html import build_report
from ntkselect.model.runtime import Runtime
from ntkselect.selection.selectors import SELECTORS, get_selector
from ntkselect.selection.ntk.stage1 import embed, preselect
from ntkselect.selection.ntk.stage2 import run_stage2
from ntkselect.training.warmup import WarmupOptions, add_lora, warmup

__version__ = "0.1.0"

__all__ = [
    "SelectConfig",
    "SelectionResult",
    "select",
    "NtkSelectError",
    "Record",
    "load_records",
    "tokenize_records",
    "Runtime",
    "WarmupOptions",
    "add_lora",
    "warmup",
    "embed",
    "preselect",
    "run_stage2",
    "RademacherProjector",
    "DiagnoseOptions",
    "diagnose",
    "build_report",
    "get_selector",
    "SELECTORS",
    "EvalConfig",
    "run_evaluation",
    "FinetuneRecipe",
    "finetune",
    "evaluate_mc",
    "mc_items",
]
