"""Command line: parses arguments and calls the library, nothing more.

Flags for ``select`` are generated from :class:`~ntkselect.config.SelectConfig`, so every
option has one name, one default and one help text.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from .config import SelectConfig
from .errors import NtkSelectError

__all__ = ["main", "build_parser"]


def _add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    defaults = defaults or {}
    for f in fields(SelectConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        help_ = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=default, help=help_)  # no "(default: False)" noise
            continue
        typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        required = bool(f.metadata.get("required")) and f.name not in defaults
        kw = {"choices": f.metadata["choices"]} if f.metadata.get("choices") else {}
        p.add_argument(flag, type=typ, default=argparse.SUPPRESS if required else default, required=required, help=help_, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ntkselect", description="Select auxiliary training data for a low-resource domain with the Jacobian-free NTK (NTK-Selector).")
    sub = parser.add_subparsers(dest="command", required=True)
    sel = sub.add_parser("select", help="select N pool examples for a domain", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_flags(sel)
    demo = sub.add_parser("demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="run the selection on the embedded default: SmolLM2-135M-Instruct, MMLU medical as D, other MMLU subjects + reasoning-gym as the pool")
    demo.add_argument("--domain-name", default="medical", choices=("medical", "legal", "psychology"), help="which MMLU domain plays D")
    demo.add_argument("--domain-size", type=int, default=100, help="domain questions")
    demo.add_argument("--pool-mmlu", type=int, default=800, help="MMLU questions from other subjects in the pool")
    demo.add_argument("--pool-reasoning", type=int, default=200, help="reasoning-gym problems in the pool")
    demo.add_argument("--data-seed", type=int, default=0, help="seed for sampling the demo data")
    _add_config_flags(demo, skip=("domain", "pool"), defaults={"n": 100, "out": "runs/demo"})
    return parser


def _config(args: argparse.Namespace) -> SelectConfig:
    names = {f.name for f in fields(SelectConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return SelectConfig(**kw)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .pipeline import summarise

        if args.command == "select":
            from .pipeline import select

            result = select(_config(args))
        else:
            from .demo import run_demo

            cfg = _config(argparse.Namespace(**{**vars(args), "domain": "-", "pool": "-"}))
            result = run_demo(args.out, domain=args.domain_name, n_domain=args.domain_size, n_pool_mmlu=args.pool_mmlu,
                              n_pool_reasoning=args.pool_reasoning, data_seed=args.data_seed, base=cfg)
        print(summarise(result.manifest))
        return 0
    except NtkSelectError as err:
        print(f"ntkselect: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ntkselect: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
