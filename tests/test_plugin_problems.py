"""One broken installed plugin must not take the others down: it is reported and skipped, the other
methods stay available and their results validate, and the leaderboard never turns an existing
board into an empty one or exits 0 having refused results.

The broken plugins are fake entry points added next to the real ones (no pip install): the test
replaces `benchsuite.methods.entry_points` and clears the discovery caches before and after.
"""

from __future__ import annotations

import warnings

import pytest

import benchsuite.methods as methods
from benchsuite.errors import ContractError
from benchsuite.hookspecs import Method, hookimpl
from benchsuite.results import validate as validate_module
from benchsuite.results.store import ResultStore
from benchsuite.results.validate import validate_result
from results_factory import make_result, sha
from test_run import run_quiet


class _Dist:
    """Just what `methods._source_of` reads from a distribution."""

    def __init__(self, name: str, version: str = "1.0") -> None:
        self.metadata, self.version = {"Name": name}, version


class _EntryPoint:
    def __init__(self, name: str, dist: str, load) -> None:
        self.name, self.dist, self._load = name, _Dist(dist), load

    def load(self):
        return self._load()


def _methods_plugin(*classes):
    class Plugin:
        @hookimpl
        def benchsuite_methods(self):
            return list(classes)

    return Plugin()


class _BadContract:
    @hookimpl
    def benchsuite_methods(self, registry):  # an argument the discovery hookspec does not have
        return []


def _failing_import():
    raise ImportError("No module named 'missing_dependency'")


class ThirdPartyOk(Method):
    name = "third_party_ok"
    summary = "a well-formed third-party method"


class FakeCoop(Method):
    name = "coop"  # the built-in's name
    summary = "a third-party copy of a built-in name"


class SharedA(Method):
    name = "shared_name"


class SharedB(Method):
    name = "shared_name"


class BadName(Method):
    name = "Bad-Name"


FAKES = [
    _EntryPoint("zz_import", "dist-import", _failing_import),
    _EntryPoint("zz_contract", "dist-contract", _BadContract),
    _EntryPoint("zz_names", "dist-names", lambda: _methods_plugin(BadName, "not a class", ThirdPartyOk)),
    _EntryPoint("zz_coop", "dist-coop", lambda: _methods_plugin(FakeCoop)),
    _EntryPoint("zz_shared_a", "dist-a", lambda: _methods_plugin(SharedA)),
    _EntryPoint("zz_shared_b", "dist-b", lambda: _methods_plugin(SharedB)),
]


def _clear_caches() -> None:
    methods.discover.cache_clear()
    methods.plugins.cache_clear()
    validate_module._installed_default.cache_clear()


@pytest.fixture
def broken_plugins(monkeypatch):
    """The real entry points plus the fake broken ones, for one test."""
    real = methods.entry_points
    monkeypatch.setattr(methods, "entry_points", lambda group: [*real(group=group), *FAKES])
    _clear_caches()
    try:
        yield
    finally:
        monkeypatch.undo()
        _clear_caches()


def _problem(plugin: str) -> methods.PluginProblem:
    found = [p for p in methods.problems() if p.plugin == plugin]
    assert found, [str(p) for p in methods.problems()]
    return found[0]


def test_broken_plugins_are_skipped_with_a_warning_and_the_rest_is_discovered(broken_plugins):
    with pytest.warns(methods.PluginWarning) as caught:
        found = methods.discover()
    assert found["coop"].source == "builtin" and found["coop"].cls is not FakeCoop  # the built-in keeps its name
    assert found["third_party_ok"].source == "dist-names"  # a plugin's good method survives its bad ones
    assert "shared_name" not in found and "Bad-Name" not in found
    texts = [str(w.message) for w in caught]
    for plugin, dist in [("zz_import", "dist-import"), ("zz_contract", "dist-contract"), ("zz_names", "dist-names"),
                         ("zz_coop", "dist-coop"), ("zz_shared_a", "dist-a"), ("zz_shared_b", "dist-b")]:
        assert any(repr(plugin) in t and dist in t and "Fix:" in t for t in texts), (plugin, texts)
    assert "missing_dependency" in _problem("zz_import").what
    assert "discovery contract" in _problem("zz_contract").what
    assert "built-in" in _problem("zz_coop").what and "rename" in _problem("zz_coop").fix
    assert "dist-a" in _problem("zz_shared_a").what and "dist-b" in _problem("zz_shared_a").what
    names = [p.what for p in methods.problems() if p.plugin == "zz_names"]
    assert any("'Bad-Name' is not allowed" in w for w in names) and any("'not a class'" in w for w in names)


def test_a_skipped_duplicate_name_is_a_clear_error_not_an_unknown_method(broken_plugins):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", methods.PluginWarning)
        with pytest.raises(ContractError) as info:
            methods.get_method("shared_name")
    message = str(info.value)
    assert "dist-a" in message and "dist-b" in message and "uninstall" in message


def test_results_of_other_methods_still_validate_with_a_broken_plugin_installed(broken_plugins):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", methods.PluginWarning)
        assert validate_result(make_result("base2new", "coop", "dtd", 1, metrics={"base": 80.0, "new": 60.0})) == []
        assert validate_result(make_result("base2new", "kgcoop", "dtd", 1,
                                           metrics={"base": 80.0, "new": 60.0})) == []
        # a name two plugins claim cannot be vouched for: refused, saying why (not accepted unchecked)
        problems = validate_result(make_result("base2new", "shared_name", "dtd", 1,
                                               metrics={"base": 80.0, "new": 60.0}))
    assert len(problems) == 1 and "shared_name" in problems[0] and "dist-a" in problems[0]


def test_list_methods_shows_what_was_skipped(broken_plugins):
    code, out, err = run_quiet(["list", "methods"])
    assert code == 0
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"coop", "zeroshot_clip", "third_party_ok"} <= rows and "shared_name" not in rows
    skipped = [line for line in err.splitlines() if line.strip().startswith("SKIPPED")]
    assert len(skipped) == len(methods.problems()) >= 6
    assert any("zz_import" in line and "dist-import" in line and "Fix:" in line for line in skipped)


@pytest.mark.filterwarnings("ignore::benchsuite.methods.PluginWarning")
def test_run_names_the_plugin_when_asked_for_a_skipped_method(broken_plugins, tmp_path):
    code, out, err = run_quiet(["run", "--protocol", "toy_few_shot", "--method", "shared_name",
                                "--results", str(tmp_path / "r")])
    assert code == 2 and "Traceback" not in err
    assert "dist-a" in err and "dist-b" in err


# ---- the leaderboard never blanks a board, and fails when it refused results


def _b2n(method: str, seed: int, **kw) -> dict:
    return make_result("base2new", method, "dtd", seed, metrics={"base": 80.0, "new": 60.0}, **kw)


def test_leaderboard_refuses_to_overwrite_a_board_with_an_empty_one(tmp_path):
    results, out = tmp_path / "results", tmp_path / "board.md"
    store = ResultStore(results)
    store.write(_b2n("coop", 1))
    code, _, err = run_quiet(["leaderboard", "--results", str(results), "--out", str(out), "--no-plots"])
    assert code == 0, err
    board = out.read_text(encoding="utf-8")
    for path in results.rglob("*.json"):
        path.unlink()
    store.write(_b2n("coop", 1, job__protocol__hash=sha("an edited protocol")))  # refused
    code, _, err = run_quiet(["leaderboard", "--results", str(results), "--out", str(out), "--no-plots"])
    assert code == 2 and "Traceback" not in err
    assert "no result" in err and "1 refused" in err and str(out) in err and "$.job.protocol.hash" in err
    assert out.read_text(encoding="utf-8") == board


def test_leaderboard_exits_nonzero_saying_how_many_results_it_refused_and_why(tmp_path):
    results, out = tmp_path / "results", tmp_path / "board.md"
    store = ResultStore(results)
    store.write(_b2n("coop", 1))
    bad = store.write(_b2n("kgcoop", 1, job__protocol__hash=sha("an edited protocol")))
    code, stdout, err = run_quiet(["leaderboard", "--results", str(results), "--out", str(out), "--no-plots"])
    assert code == 1, stdout + err
    assert out.is_file() and "coop" in out.read_text(encoding="utf-8")  # the merged results are still written
    assert "1 result file(s)" in err and "1 merged" in err and str(out) in err
    assert str(bad) in err and "$.job.protocol.hash" in err
    code, _, err = run_quiet(["leaderboard", "--results", str(results), "--out", str(out), "--no-plots", "--check"])
    assert code == 1 and "1 result file(s)" in err  # an up-to-date board with refusals still fails the check
