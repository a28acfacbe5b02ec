"""ntkselect: select auxiliary fine-tuning data with the Jacobian-free NTK (NTK-Selector).

The pipeline is one module per stage: :mod:`~ntkselect.warmup`, :mod:`~ntkselect.stage1`,
:mod:`~ntkselect.stage2`; :func:`select` runs them all from a :class:`SelectConfig`; :func:`run_evaluation` compares NTK-Selector
with the baselines in :mod:`~ntkselect.selectors` by fine-tuning and testing.
"""

from .config import SelectConfig
from .data import Record, load_records, tokenize_records
from .diagnose import DiagnoseOptions, diagnose
from .errors import NtkSelectError
from .evaluate import EvalConfig, run_evaluation
from .evaluation import evaluate_mc, mc_items
from .finetune import FinetuneRecipe, finetune
from .pipeline import SelectionResult, select
from .projection import RademacherProjector
from .report import build_report
from .runtime import Runtime
from .selectors import SELECTORS, get_selector
from .stage1 import embed, preselect
from .stage2 import run_stage2
from .warmup import WarmupOptions, add_lora, warmup

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
