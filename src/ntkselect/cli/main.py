"""Command line: parses arguments and calls the library, nothing more.

Flags for ``select`` are generated from :class:`~ntkselect.config.SelectConfig`, so every
option has one name, one default and one help text.

The library reports through :mod:`logging` (the ``ntkselect`` loggers) and prints nothing
itself; while a command runs, :func:`main` shows those messages as plain lines, information
on stdout and warnings on stderr. What a command produces (the plan, the summary, the file it
wrote) and its one-line errors are printed here.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from ntkselect.cli.demo import run_demo
from ntkselect.config import SelectConfig, field_help
from ntkselect.data.demo import build_eval_data
from ntkselect.diagnostics.diagnose import DiagnoseOptions, diagnose
from ntkselect.diagnostics.diagnose import summarise as summarise_diagnosis
from ntkselect.errors import NtkSelectError
from ntkselect.evaluation.harness import EvalConfig, run_evaluation
from ntkselect.pipeline import select, summarise
from ntkselect.report.html import build_report
from ntkselect.runs.plan import estimate, format_plan
from ntkselect.selection.registry import describe_methods, selector_names

__all__ = ["main", "build_parser"]


def _add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    defaults = defaults or {}
    for f in fields(SelectConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        help_ = describe_methods() if f.name == "method" else field_help(f)  # --method: the registered selectors
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=default, help=help_)  # no "(default: False)" noise
            continue
        typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        required = bool(f.metadata.get("required")) and f.name not in defaults
        choices: Any = selector_names() if f.name == "method" else f.metadata.get("choices")
        kw = {"choices": choices} if choices else {}
        p.add_argument(flag, type=typ, default=argparse.SUPPRESS if required else default, required=required, help=help_, **kw)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the flag and the fix) instead of the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"ntkselect: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ntkselect", description="Select auxiliary training data for a low-resource domain with the Jacobian-free NTK (NTK-Selector).")
    sub = parser.add_subparsers(dest="command", required=True)
    sel = sub.add_parser("select", help="select N pool examples for a domain", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_flags(sel)
    demo = sub.add_parser(
        "demo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="run the selection on the embedded default: SmolLM2-135M-Instruct, MMLU medical as D, other MMLU subjects + reasoning-gym as the pool",
    )
    demo.add_argument("--domain-name", default="medical", choices=("medical", "legal", "psychology"), help="which MMLU domain plays D")
    demo.add_argument("--domain-size", type=int, default=100, help="domain questions")
    demo.add_argument("--pool-mmlu", type=int, default=800, help="MMLU questions from other subjects in the pool")
    demo.add_argument("--pool-reasoning", type=int, default=200, help="reasoning-gym problems in the pool")
    demo.add_argument("--data-seed", type=int, default=0, help="seed for sampling the demo data")
    _add_config_flags(demo, skip=("domain", "pool", "dry_run"), defaults={"n": 100, "out": "runs/demo"})
    _add_diagnostic_commands(sub)
    _add_evaluate_commands(sub)
    return parser


def _add_evaluate_commands(sub) -> None:
    ev = sub.add_parser("evaluate", help="select with each method, fine-tune on D ∪ S with one recipe, and compare test accuracy over seeds")
    _add_eval_flags(ev)
    ed = sub.add_parser(
        "eval-data",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="write a seeded, stratified MMLU train/test split of a domain and a pool for `evaluate`",
    )
    ed.add_argument("--domain-name", default="medical", choices=("medical", "legal", "psychology"), help="which MMLU domain")
    ed.add_argument("--out", required=True, help="folder for domain_train.jsonl, domain_test.jsonl, pool.jsonl, split.json")
    ed.add_argument("--n-train", type=int, default=100, help="domain training questions (D)")
    ed.add_argument("--n-test", type=int, default=300, help="domain test questions")
    ed.add_argument("--pool-mmlu", type=int, default=1000, help="MMLU questions from the other subjects in the pool")
    ed.add_argument("--pool-reasoning", type=int, default=200, help="reasoning-gym problems in the pool")
    ed.add_argument("--gsm8k", default=None, help="local GSM8K JSONL (question, answer) to add to the pool")
    ed.add_argument("--pool-gsm8k", type=int, default=0, help="GSM8K problems in the pool (needs --gsm8k)")
    ed.add_argument("--seed", type=int, default=0, help="seed of the split and the samples")


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with any of these options as keys (bare or under [evaluate]); flags given on the command line win")
    for f in fields(EvalConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "") + ("" if f.metadata.get("required") else f" (default: {f.default})")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
            continue
        typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        kw = {"choices": f.metadata["choices"]} if f.metadata.get("choices") else {}
        p.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help_, **kw)  # SUPPRESS: only given flags override --config


def _eval_config(args: argparse.Namespace):
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(EvalConfig)}}
    if getattr(args, "config", None):
        return EvalConfig.from_toml(args.config, given)
    return EvalConfig(**given)


def config_from_args(args: argparse.Namespace) -> SelectConfig:
    names = {f.name for f in fields(SelectConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return SelectConfig(**kw)


def _add_diagnostic_commands(sub) -> None:
    """``diagnose`` (flags from :class:`~ntkselect.diagnostics.diagnose.DiagnoseOptions`) and ``report``."""
    diag = sub.add_parser(
        "diagnose",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="check the NTK-like assumption on a probe set: kernel stability during fine-tuning, the Jacobian-free approximation, kernel regression",
    )
    for f in fields(DiagnoseOptions):
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if f.type in ("bool", bool):
            diag.add_argument(flag, action="store_true", help=help_)
            continue
        typ = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        kw = {"choices": f.metadata["choices"]} if f.metadata.get("choices") else {}
        diag.add_argument(flag, type=typ, default=f.default, required=bool(f.metadata.get("required")), help=help_, **kw)
    rep = sub.add_parser(
        "report", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="write RUN_DIR/report.html, a self-contained page on a selection run"
    )
    rep.add_argument("run_dir", help="the --out folder of a finished selection run")
    rep.add_argument("--top", type=int, default=5, help="how many of the best and of the lowest-ranked selected examples to show")
    rep.add_argument("--neighbours", type=int, default=3, help="nearest domain examples shown for each")


def _diagnostic_command(args: argparse.Namespace) -> int:
    if args.command == "report":
        print(f"ntkselect: wrote {build_report(args.run_dir, top=args.top, neighbours=args.neighbours)}")
        return 0
    kw = {f.name: getattr(args, f.name) for f in fields(DiagnoseOptions)}
    opts = DiagnoseOptions.from_run(args.run, **kw) if args.run else DiagnoseOptions(**kw)
    print(summarise_diagnosis(diagnose(opts)))
    return 0


class _ConsoleHandler(logging.Handler):
    """ntkselect's log messages as the bare lines the CLI shows: INFO on stdout, WARNING and above
    on stderr. The stream is looked up for each message, so redirections made after the handler
    was installed (pytest's capture, contextlib.redirect_stdout) see it; errors writing it (a
    closed pipe) propagate as they would from print."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        stream.write(self.format(record) + "\n")
        stream.flush()


@contextlib.contextmanager
def _console_logging():
    """Show the ``ntkselect`` loggers' INFO messages on the console while a command runs, and
    only there (not also through handlers the caller put on the root logger); restored after."""
    lg = logging.getLogger("ntkselect")
    handler = _ConsoleHandler()
    saved = lg.level, lg.propagate
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        yield
    finally:
        lg.removeHandler(handler)
        lg.setLevel(saved[0])
        lg.propagate = saved[1]


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that cleanup runs as for Ctrl-C."""


@contextlib.contextmanager
def _signals(process: bool):
    """While a command runs in the main thread: SIGTERM ends it like Ctrl-C (temporary files
    removed, an unfinished run left to resume) instead of killing it mid-write. A signal that
    reaches a forked child (a worker) ends that child as if unhandled. After an interrupt, a
    second Ctrl-C or SIGTERM exits at once, also while the interpreter exits (``process``: this
    is the process's command line); the handlers are restored after a call with an argv list."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    me = os.getpid()

    def on_term(signum, frame):
        if os.getpid() != me:  # a forked child: die as the default would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Terminated()

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        if not (process and signal.getsignal(signal.SIGINT) is _quiet_exit):
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def _quiet_exit(signum, frame) -> None:
    # a second Ctrl-C (or SIGTERM) while the first one's cleanup or the interpreter's exit runs:
    # leave at once, without a traceback (a later run sweeps what is left)
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _console_logging(), _signals(process=argv is None):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command in ("diagnose", "report"):
            return _diagnostic_command(args)
        if args.command == "select":
            cfg = config_from_args(args)
            if cfg.dry_run:
                print(format_plan(estimate(cfg)))
                return 0
            result = select(cfg)
        elif args.command == "evaluate":
            m = run_evaluation(_eval_config(args))
            print((Path(m["config"]["out"]) / "results.md").read_text())
            return 0
        elif args.command == "eval-data":
            info = build_eval_data(
                args.out, args.domain_name, args.n_train, args.n_test, args.pool_mmlu, args.pool_reasoning, args.gsm8k, args.pool_gsm8k, args.seed
            )
            print(
                f"ntkselect: wrote {info['counts']['train']} train / {info['counts']['test']} test {args.domain_name} questions and a pool of "
                f"{info['counts']['pool']} ({', '.join(f'{k} {v}' for k, v in info['pool_per_source'].items())}) to {args.out}"
            )
            return 0
        else:
            cfg = config_from_args(argparse.Namespace(**{**vars(args), "domain": "-", "pool": "-"}))
            result = run_demo(
                args.out,
                domain=args.domain_name,
                n_domain=args.domain_size,
                n_pool_mmlu=args.pool_mmlu,
                n_pool_reasoning=args.pool_reasoning,
                data_seed=args.data_seed,
                base=cfg,
            )
        print(summarise(result.manifest))
        return 0
    except NtkSelectError as err:
        print(f"ntkselect: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `ntkselect ... | head`: the reader went away
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            # A full disk mid-run: outputs are written atomically and manifest.json last, so the
            # folder holds nothing a rerun would trust.
            where = f"--out {args.out}" if getattr(args, "out", None) else (err.filename or "the output folder")
            print(
                f"ntkselect: error: no space left on device while writing to {where}; free some space or choose another --out "
                "(the run is unfinished and has no manifest.json, so a rerun starts over)",
                file=sys.stderr,
            )
            return 2
        if err.filename is None or os.environ.get("NTKSELECT_DEBUG"):
            return _unexpected(err)
        print(
            f"ntkselect: error: cannot use {err.filename}: {err.strerror or err}; check that it exists and that you may read or write it "
            "(a rerun resumes an unfinished run)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as err:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, _quiet_exit)
        term = isinstance(err, _Terminated)
        print(f"ntkselect: {'terminated' if term else 'interrupted'} (a rerun resumes an unfinished run)", file=sys.stderr)
        return 143 if term else 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        return _unexpected(err)


def _unexpected(err: BaseException) -> int:
    """A failure ntkselect did not foresee (a bug, or the machine ran out of memory): one line, or
    the traceback with NTKSELECT_DEBUG=1."""
    if os.environ.get("NTKSELECT_DEBUG"):
        raise err
    msg = " ".join(str(err).split())[:300] or type(err).__name__
    if isinstance(err, MemoryError) or "out of memory" in msg.lower() or "can't allocate memory" in msg.lower():
        print(
            f"ntkselect: error: out of memory ({msg}); lower --batch-size, --max-batch-tokens or --max-length, or use a machine with more memory "
            "(a rerun resumes an unfinished run)",
            file=sys.stderr,
        )
        return 2
    print(
        f"ntkselect: error: unexpected {type(err).__name__}: {msg} (this is a bug in ntkselect: rerun with NTKSELECT_DEBUG=1 "
        "to see the traceback, and report it)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
