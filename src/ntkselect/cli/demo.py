"""The default demo: MMLU medical questions as D, other subjects plus reasoning-gym as C."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ntkselect.config import MAX_INT, SelectConfig
from ntkselect.data.demo import build_demo_data
from ntkselect.errors import NtkSelectError
from ntkselect.model.loading import check_model_options, resolve_model
from ntkselect.pipeline import SelectionResult, select_in
from ntkselect.runs.folder import DEMO_DATA, SELECT, check_paths, open_run
from ntkselect.selection.registry import selector_spec

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


def run_demo(
    out: str,
    domain: str = "medical",
    n_domain: int = 100,
    n_pool_mmlu: int = 800,
    n_pool_reasoning: int = 200,
    data_seed: int = 0,
    base: SelectConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> SelectionResult:
    """Write the demo data to ``out/data`` and run the selection into ``out``; progress messages go
    to ``log`` (default: this module's logger, at INFO)."""
    log = log or logger.info
    data = Path(out) / "data"
    # every option is checked before the data is written
    for flag, value in (("--domain-size", n_domain), ("--pool-mmlu", n_pool_mmlu), ("--pool-reasoning", n_pool_reasoning), ("--data-seed", data_seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > MAX_INT:
            raise NtkSelectError(f"{flag}: must be a non-negative integer (got {value!r})")
    if n_domain == 0 or n_pool_mmlu + n_pool_reasoning == 0:
        raise NtkSelectError("--domain-size and --pool-mmlu + --pool-reasoning must be positive: the demo needs a domain and a pool")
    pre = replace(base or SelectConfig(n=100), domain="-", pool="-", out=str(out)).validate()
    check_paths(out, SELECT, {})
    if selector_spec(pre.method).uses_model:
        check_model_options(pre.model, pre.target_modules(), pre.lora_r)
    check_paths(data, DEMO_DATA, {})
    cfg = replace(base or SelectConfig(n=100), domain=str(data / "domain.jsonl"), pool=str(data / "pool.jsonl"), out=str(out))
    if cfg.n <= 0:
        raise NtkSelectError("--n must be a positive integer")
    model = resolve_model(cfg.model)
    # --out is locked before anything is written in it, the demo data included: a second demo
    # into the same --out is refused before it rewrites the data a live run is reading
    with open_run(out, SELECT, {"--model": model if Path(model).is_dir() else None}, log=log) as run:
        info = build_demo_data(data, domain=domain, n_domain=n_domain, n_pool_mmlu=n_pool_mmlu, n_pool_reasoning=n_pool_reasoning, seed=data_seed)
        log(f"ntkselect demo: D = {info['counts']['domain'] if 'counts' in info else n_domain} {domain} questions, pool written to {data}")
        return select_in(run, cfg.validate(), log)
