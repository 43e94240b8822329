"""Method registry: discovery through the `benchsuite` entry-point group, one manager per job."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points

import pluggy

from .errors import ContractError
from .hookspecs import PROJECT, REQUIRED_HOOKS, DiscoverySpec, HarnessDefaults, Method, MethodSpec

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


@lru_cache(maxsize=1)
def plugins() -> tuple[LoadedPlugin, ...]:
    """Import every entry point of the group once (a broken one warns and is skipped)."""
    loaded = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        source, version = _source_of(ep)
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not hide the others
            warnings.warn(f"benchsuite plugin {ep.name!r} ({source}) failed to import: {exc}", stacklevel=2)
            continue
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(DiscoverySpec)
        try:
            pm.register(plugin, name=ep.name)
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise ContractError(f"plugin {ep.name!r} ({source}) breaks the discovery contract: {exc}") from exc
        loaded.append(LoadedPlugin(ep.name, source, version, pm))
    return tuple(loaded)


def contributions(hook: str) -> list[tuple[LoadedPlugin, object]]:
    """Every item a discovery hook returns, with the plugin that contributed it."""
    return [(plugin, item) for plugin in plugins()
            for items in getattr(plugin.pm.hook, hook)() for item in items or []]


def add_commands(subparsers) -> None:
    """Let plugins add subcommands to the command line."""
    for plugin in plugins():
        plugin.pm.hook.benchsuite_commands(subparsers=subparsers)


@lru_cache(maxsize=1)
def discover() -> dict[str, MethodEntry]:
    """The methods every plugin contributes, by name."""
    found: dict[str, MethodEntry] = {}
    for plugin in plugins():
        source, version, ep_name = plugin.source, plugin.version, plugin.name
        for classes in plugin.pm.hook.benchsuite_methods():
            for cls in classes or []:
                name = getattr(cls, "name", "")
                if not isinstance(cls, type) or not name or not isinstance(name, str):
                    raise ContractError(f"plugin {ep_name!r} ({source}), hook benchsuite_methods: returned "
                                        f"{cls!r}, which is not a class with a non-empty `name`")
                if not METHOD_NAME.fullmatch(name):
                    raise ContractError(f"plugin {ep_name!r} ({source}): method name {name!r} is not allowed; "
                                        f"names are lower-case identifiers ({METHOD_NAME.pattern}), since they "
                                        f"become folder names and leaderboard rows")
                if name in found:
                    other = found[name]
                    raise ContractError(f"method name {name!r} is provided twice: by {other.source} "
                                        f"({other.entry_point}) and by {source} ({ep_name}); uninstall one")
                found[name] = MethodEntry(name, cls, source, version, ep_name)
    return found


def get_method(name: str) -> MethodEntry:
    methods = discover()
    if name not in methods:
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
    return pm, instance


def implements(pm: pluggy.PluginManager, plugin: object, hook: str) -> bool:
    return any(impl.plugin is plugin for impl in getattr(pm.hook, hook).get_hookimpls())
