"""The default demo: MMLU medical questions as D, other subjects plus reasoning-gym as C."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .config import SelectConfig
from .demo_data import build_demo_data
from .errors import NtkSelectError
from .pipeline import SelectionResult, select

__all__ = ["run_demo"]


def run_demo(out: str, domain: str = "medical", n_domain: int = 100, n_pool_mmlu: int = 800, n_pool_reasoning: int = 200,
             data_seed: int = 0, base: SelectConfig | None = None, log=print) -> SelectionResult:
    """Write the demo data to ``out/data`` and run the selection into ``out``."""
    data = Path(out) / "data"
    info = build_demo_data(data, domain=domain, n_domain=n_domain, n_pool_mmlu=n_pool_mmlu, n_pool_reasoning=n_pool_reasoning, seed=data_seed)
    log(f"ntkselect demo: D = {info['counts']['domain'] if 'counts' in info else n_domain} {domain} questions, pool written to {data}")
    cfg = replace(base or SelectConfig(n=100), domain=str(data / "domain.jsonl"), pool=str(data / "pool.jsonl"), out=str(out))
    if cfg.n <= 0:
        raise NtkSelectError("--n must be a positive integer")
    return select(cfg, log=log)
