"""The selector registry: one registration per method, and everything else reads it.

A selector module registers its class once (after peft's ``register_peft_method``)::

    @register_selector("tsds", uses_model=True, uses_embeddings=True, options=("tsds_alpha", ...),
                       cost=tsds_cost, summary="TSDS, Liu et al. 2024, on stage-1 embeddings")
    class TsdsSelector(Selector):
        def rank(self, ctx, n): ...

and from then on ``ntkselect select --method`` accepts it (its choices and help), the
configuration validates it, ``ntkselect evaluate`` can compare it, the dry run prices it with
its cost model, the preflight checks the model paths it uses, and the run writes ``adapter/``
when it uses the model. See ``docs/ADDING_A_SELECTOR.md``.

The built-in selectors register when :mod:`ntkselect.selection` is imported.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields

from ntkselect.config import SelectConfig, add_check
from ntkselect.errors import NtkSelectError
from ntkselect.runs.shards import ShardTask, register_task
from ntkselect.selection.base import Selector

__all__ = [
    "SelectorSpec",
    "register_selector",
    "unregister_selector",
    "get_selector",
    "selector_spec",
    "find_selector",
    "selector_names",
    "selector_specs",
    "describe_methods",
    "check_method",
    "RESERVED_NAMES",
]

#: names ``ntkselect evaluate`` uses for its own rows, so no selector may take them
RESERVED_NAMES = ("domain-only", "oracle", "base")
#: model paths the preflight (:mod:`ntkselect.runs.preflight`) can check for a method, beyond
#: the warm-up and the stage-1 embeddings every model / embedding method gets
PREFLIGHT_PATHS = ("ntk", "less")
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class SelectorSpec:
    """A registered selector.

    ``options``: the :class:`~ntkselect.config.SelectConfig` fields the method reads beyond the
    shared ones (for the reader and for ``evaluate``); ``cost``: its dry-run cost model,
    ``cost(plan)`` with a :class:`~ntkselect.runs.plan.PlanBuilder` (None: nothing beyond the
    shared warm-up / stage 1 and loading); ``tasks``: the shard tasks it runs
    (:class:`~ntkselect.runs.shards.ShardTask`); ``check``: ``check(cfg)`` raises an
    :class:`~ntkselect.errors.NtkSelectError` for a configuration the method cannot run
    (called by :meth:`SelectConfig.validate`); ``paths``: preflight paths it uses (of
    :data:`PREFLIGHT_PATHS`); ``summary``: a few words for ``--method``'s help."""

    name: str
    cls: type
    summary: str = ""
    uses_model: bool = False
    uses_embeddings: bool = False
    options: tuple[str, ...] = ()
    cost: Callable | None = None
    tasks: tuple = ()
    check: Callable | None = None
    paths: tuple[str, ...] = ()

    def make(self):
        return self.cls()


_REGISTRY: dict[str, SelectorSpec] = {}


def register_selector(
    name: str,
    cls: type | None = None,
    *,
    summary: str = "",
    uses_model: bool = False,
    uses_embeddings: bool = False,
    options: tuple[str, ...] = (),
    cost: Callable | None = None,
    tasks: tuple = (),
    check: Callable | None = None,
    paths: tuple[str, ...] = (),
):
    """Register the :class:`~ntkselect.selection.base.Selector` subclass ``cls`` as ``--method name``.

    Used as a decorator (``@register_selector("name", ...)``) or called with the class. Sets the
    class's ``name``, ``uses_model`` and ``uses_embeddings`` from the registration, registers its
    shard tasks, and returns the class. Registering a name again replaces it only when it is the
    same class (a module imported twice); another class under a taken name is refused."""
    if cls is None:
        return lambda c: register_selector(
            name, c, summary=summary, uses_model=uses_model, uses_embeddings=uses_embeddings, options=options, cost=cost, tasks=tasks, check=check, paths=paths
        )
    if not isinstance(name, str) or not _NAME.match(name) or name in RESERVED_NAMES:
        raise ValueError(
            f"selector name {name!r}: use lower-case letters, digits, '-' and '_', starting with a letter, and none of {', '.join(RESERVED_NAMES)}"
        )
    if not (isinstance(cls, type) and issubclass(cls, Selector)):
        raise TypeError(f"selector {name!r}: {cls!r} is not a subclass of ntkselect.Selector")
    old = _REGISTRY.get(name)
    if old is not None and (old.cls.__module__, old.cls.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"selector {name!r} is already registered ({old.cls.__module__}.{old.cls.__qualname__})")
    known = {f.name for f in fields(SelectConfig)}
    unknown = [o for o in options if o not in known]
    if unknown:
        raise ValueError(f"selector {name!r}: options {', '.join(unknown)} are not SelectConfig fields; add them to ntkselect/config.py")
    if uses_embeddings and not uses_model:
        raise ValueError(f"selector {name!r}: the stage-1 embeddings come from the warmed-up model, so uses_embeddings needs uses_model")
    bad = [p for p in paths if p not in PREFLIGHT_PATHS]
    if bad:
        raise ValueError(f"selector {name!r}: unknown preflight paths {', '.join(bad)}; known: {', '.join(PREFLIGHT_PATHS)}")
    for t in tasks:
        if not isinstance(t, ShardTask):
            raise TypeError(f"selector {name!r}: {t!r} is not a ShardTask")
        register_task(t)
    cls.name, cls.uses_model, cls.uses_embeddings = name, uses_model, uses_embeddings
    _REGISTRY[name] = SelectorSpec(name, cls, summary, uses_model, uses_embeddings, tuple(options), cost, tuple(tasks), check, tuple(paths))
    return cls


def unregister_selector(name: str) -> None:
    """Forget ``name`` (for tests and plugins that register temporarily)."""
    _REGISTRY.pop(name, None)


def find_selector(name: str) -> SelectorSpec | None:
    return _REGISTRY.get(name)


def selector_spec(name: str) -> SelectorSpec:
    """The registration of ``--method name``; an unknown name is a one-line error."""
    if name not in _REGISTRY:
        raise NtkSelectError(f"--method {name!r} is not a selector; use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def get_selector(name: str):
    """A new instance of the selector registered as ``name``."""
    return selector_spec(name).make()


def selector_names() -> tuple[str, ...]:
    """The registered names, in registration order (the built-ins first)."""
    return tuple(_REGISTRY)


def selector_specs() -> tuple[SelectorSpec, ...]:
    return tuple(_REGISTRY.values())


def describe_methods() -> str:
    """``--method``'s help: every registered name with its summary."""
    items = [f"{s.name} ({s.summary})" if s.summary else s.name for s in _REGISTRY.values()]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]
    return "selector: " + listed


def check_method(cfg: SelectConfig) -> None:
    """``--method`` names a registered selector, and the configuration gives the method what it
    needs (its registration's ``check``). Every :meth:`SelectConfig.validate` runs it."""
    if cfg.method not in _REGISTRY:
        raise NtkSelectError(f"--method: must be one of {', '.join(_REGISTRY)} (got {cfg.method!r})")
    check = _REGISTRY[cfg.method].check
    if check is not None:
        check(cfg)


add_check(check_method)
