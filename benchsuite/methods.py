"""Method registry: discovery through the `benchsuite` entry-point group, one manager per job."""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points

import pluggy

from .errors import ContractError
from .hookspecs import PROJECT, REQUIRED_HOOKS, DiscoverySpec, HarnessDefaults, Method, MethodSpec, SETTINGS

ENTRY_POINT_GROUP = "benchsuite"
#: Method names: lower-case identifiers (the result schema enforces the same pattern).
METHOD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodEntry:
    """A discovered method class and the distribution it comes from."""

    name: str
    cls: type
    source: str          #: "builtin" or the providing distribution's name
    version: str
    entry_point: str


def _source_of(ep) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", ""
    name = dist.metadata["Name"]
    return ("builtin" if name == "benchsuite" else name), dist.version


@dataclass(frozen=True)
class LoadedPlugin:
    """One entry point of the group, imported and registered in its own discovery manager."""

    name: str
    source: str
    version: str
    pm: pluggy.PluginManager


class PluginWarning(UserWarning):
    """A plugin, or one method of it, was skipped (its own category, so tools can filter or raise it)."""


@dataclass(frozen=True)
class PluginProblem:
    """Why a plugin or one of its methods was skipped, and what the user can do about it.

    Why a record and not an exception: one broken third-party plugin must not take the built-in
    methods, or the results they validate, down with it; the problem is shown instead (a warning
    at discovery, `benchsuite list methods`, and every error that meets the skipped name)."""

    plugin: str          #: entry point name
    source: str          #: the providing distribution ("builtin" for benchsuite itself)
    what: str
    fix: str
    method: str = ""     #: the method name concerned, when the problem is about one method

    def __str__(self) -> str:
        return f"benchsuite plugin {self.plugin!r} ({self.source}): {self.what}; skipped. Fix: {self.fix}"


#: what the last discovery skipped: "plugins" (import, contract) and "methods" (names, classes)
_SKIPPED: dict[str, tuple[PluginProblem, ...]] = {"plugins": (), "methods": ()}


def _record(kind: str, found: list[PluginProblem]) -> None:
    """Remember the problems of one discovery step and warn about each once."""
    _SKIPPED[kind] = tuple(found)
    for problem in found:
        warnings.warn(str(problem), PluginWarning, stacklevel=3)


def _load(ep) -> tuple[LoadedPlugin | None, PluginProblem | None]:
    """Import one entry point and register it in its own discovery manager, or say why not."""
    source, version = _source_of(ep)
    reinstall = f"reinstall or upgrade {source}, or uninstall it" if source != "unknown" else "fix or remove it"
    try:
        plugin = ep.load()
    except Exception as exc:  # a broken third-party plugin must not hide the others
        return None, PluginProblem(ep.name, source, f"failed to import ({type(exc).__name__}: {exc})", reinstall)
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(DiscoverySpec)
    try:
        pm.register(plugin, name=ep.name)
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as exc:
        return None, PluginProblem(ep.name, source, f"breaks the discovery contract ({exc})",
                                   f"its hooks must match DiscoverySpec in benchsuite/hookspecs.py; {reinstall}")
    return LoadedPlugin(ep.name, source, version, pm), None


@lru_cache(maxsize=1)
def plugins() -> tuple[LoadedPlugin, ...]:
    """Import every entry point of the group once; a broken one is skipped with a PluginWarning."""
    loaded, found = [], []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        plugin, problem = _load(ep)
        if problem is not None:
            found.append(problem)
        else:
            loaded.append(plugin)
    _record("plugins", found)
    return tuple(loaded)


def contributions(hook: str) -> list[tuple[LoadedPlugin, object]]:
    """Every item a discovery hook returns, with the plugin that contributed it."""
    return [(plugin, item) for plugin in plugins()
            for items in getattr(plugin.pm.hook, hook)() for item in items or []]


def add_commands(subparsers) -> None:
    """Let plugins add subcommands to the command line."""
    for plugin in plugins():
        plugin.pm.hook.benchsuite_commands(subparsers=subparsers)


def _class_problem(plugin: LoadedPlugin, cls: object) -> PluginProblem | None:
    """Why `cls`, returned by the plugin's benchsuite_methods hook, cannot be a method; None if it can."""
    name = getattr(cls, "name", "")
    fix = f"have benchsuite_methods return Method subclasses with a valid `name`, or uninstall {plugin.source}"
    if not isinstance(cls, type) or not name or not isinstance(name, str):
        return PluginProblem(plugin.name, plugin.source, f"hook benchsuite_methods returned {cls!r}, which is not a "
                                                          f"class with a non-empty `name`", fix)
    if not METHOD_NAME.fullmatch(name):
        return PluginProblem(plugin.name, plugin.source, f"method name {name!r} is not allowed; names are lower-case "
                             f"identifiers ({METHOD_NAME.pattern}), since they become folder names and leaderboard "
                             f"rows", fix, method=name)
    return None


def _plugin_classes(plugin: LoadedPlugin, found: list[PluginProblem]) -> list[type]:
    """The classes one plugin's benchsuite_methods hook returns (a hook that raises gives none)."""
    try:
        answers = plugin.pm.hook.benchsuite_methods()
    except Exception as exc:
        found.append(PluginProblem(plugin.name, plugin.source, f"hook benchsuite_methods raised "
                                   f"{type(exc).__name__}: {exc}", f"fix or uninstall {plugin.source}"))
        return []
    classes: list = []
    for answer in answers:
        if answer is not None and not isinstance(answer, (list, tuple)):
            found.append(PluginProblem(plugin.name, plugin.source, f"hook benchsuite_methods returned {answer!r}, "
                                       f"not a list of classes", f"return a list, or uninstall {plugin.source}"))
            continue
        classes += list(answer or [])
    return classes


def _settle(name: str, claims: list[MethodEntry]) -> tuple[MethodEntry | None, list[PluginProblem]]:
    """Who gets a method name claimed more than once, and a problem for every copy skipped.

    The rule: the same class under two entry points is one method; a built-in keeps its name and a
    third-party copy is skipped (an installed plugin cannot silently replace a built-in method or
    relabel its results); two third-party copies are both skipped, since either could be the one
    meant and results cannot say which."""
    distinct = [c for i, c in enumerate(claims) if all(c.cls is not o.cls for o in claims[:i])]
    if len(distinct) == 1:
        return distinct[0], []
    builtins = [c for c in distinct if c.source == "builtin"]
    keeper = builtins[0] if len(builtins) == 1 else None
    where = " and ".join(f"{c.source} ({c.entry_point})" for c in distinct)
    problems = []
    for copy in distinct:
        if copy is keeper:
            continue
        if keeper is not None:
            what = f"method name {name!r} is already a built-in method's, which keeps it"
            fix = f"rename the method in {copy.source} (its `name`), or uninstall {copy.source}"
        else:
            what = f"method name {name!r} is provided by {where}, so no copy is used (either could be meant)"
            fix = f"uninstall all but one of {', '.join(sorted({c.source for c in distinct}))}, or rename one method"
        problems.append(PluginProblem(copy.entry_point, copy.source, what, fix, method=name))
    return keeper, problems


@lru_cache(maxsize=1)
def discover() -> dict[str, MethodEntry]:
    """The methods every plugin contributes, by name.

    Never raises for a bad plugin: a plugin that fails to import or breaks the discovery contract,
    a returned object that is not a class with a valid name, and a name claimed twice (see
    `_settle`: a built-in keeps its name, two third-party copies are both dropped) are skipped with
    a PluginWarning naming the plugin, its distribution and the fix; `problems()` lists them."""
    claims: dict[str, list[MethodEntry]] = defaultdict(list)
    found: list[PluginProblem] = []
    for plugin in plugins():
        for cls in _plugin_classes(plugin, found):
            problem = _class_problem(plugin, cls)
            if problem is not None:
                found.append(problem)
                continue
            claims[cls.name].append(MethodEntry(cls.name, cls, plugin.source, plugin.version, plugin.name))
    methods: dict[str, MethodEntry] = {}
    for name, entries in claims.items():
        keeper, dropped = _settle(name, entries)
        found += dropped
        if keeper is not None:
            methods[name] = keeper
    _record("methods", found)
    return methods


def problems() -> tuple[PluginProblem, ...]:
    """Everything the current discovery skipped: broken plugins first, then skipped methods."""
    discover()
    return _SKIPPED["plugins"] + _SKIPPED["methods"]


def skipped_method(name: str) -> PluginProblem | None:
    """Why the method `name` is not available although a plugin provides it; None otherwise."""
    if name in discover():
        return None
    return next((p for p in _SKIPPED["methods"] if p.method == name), None)


def get_method(name: str) -> MethodEntry:
    methods = discover()
    if name not in methods:
        skipped = skipped_method(name)
        if skipped is not None:
            raise ContractError(f"method {name!r} is not available: plugin {skipped.plugin!r} ({skipped.source}): "
                                f"{skipped.what}. Fix: {skipped.fix}")
        raise ContractError(f"unknown method {name!r}; installed methods: {', '.join(sorted(methods)) or 'none'}. "
                            f"A third-party method must be pip-installed and declare an entry point in the "
                            f"'{ENTRY_POINT_GROUP}' group")
    return methods[name]


def job_manager(entry: MethodEntry) -> tuple[pluggy.PluginManager, Method]:
    """A fresh manager holding one instance of the method plus the harness defaults."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(MethodSpec)
    pm.register(HarnessDefaults(), name="harness")
    try:
        instance = entry.cls()
    except Exception as exc:
        raise ContractError(f"method {entry.name!r} ({entry.source}): constructing {entry.cls.__name__}() "
                            f"without arguments failed: {exc}") from exc
    try:
        pm.register(instance, name=f"method:{entry.name}")
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ContractError(f"method {entry.name!r} ({entry.source}) breaks the plugin contract: {exc}") from exc
    for hook in REQUIRED_HOOKS:
        if not implements(pm, instance, hook):
            raise ContractError(f"method {entry.name!r} ({entry.source}) does not implement the required hook "
                                f"{hook!r}; see benchsuite/hookspecs.py")
    setting = getattr(entry.cls, "setting", "inductive")
    if setting not in SETTINGS:
        raise ContractError(f"method {entry.name!r} ({entry.source}): setting {setting!r} is not one of "
                            f"{', '.join(SETTINGS)} (Method.setting in benchsuite/hookspecs.py)")
    return pm, instance


def implements(pm: pluggy.PluginManager, plugin: object, hook: str) -> bool:
    return any(impl.plugin is plugin for impl in getattr(pm.hook, hook).get_hookimpls())
