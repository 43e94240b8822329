"""Nothing unsafe or incomparable reaches the leaderboard: injection, forged recipes, mixed weights,
hostile result files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchsuite.leaderboard import build_leaderboard
from benchsuite.results.store import MAX_RESULT_BYTES, MAX_RESULT_DEPTH, ResultStore, dump_json
from benchsuite.results.validate import validate_files, validate_result
from results_factory import default_recipe, make_result, sha

HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "[x](javascript:alert(1))", "a`b|c"]
#: markup that would be live in the rendered markdown (an escaped bracket is preceded by a backslash)
RAW_MARKUP = [r"<script", r"<img", r"(?<!\\)\]\(javascript:", r"(?<!\\)\[x", r"a`b", r"b\|c"]


def _b2n(method: str = "coop", **kw) -> dict:
    return make_result("base2new", method, "dtd", 1, metrics={"base": 80.0, "new": 60.0}, **kw)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_method_names_are_refused_by_validate(name):
    problems = validate_result(_b2n("kgcoop", job__method=name, method__name=name))
    assert any(p.startswith("$.job.method") for p in problems)
    assert any(p.startswith("$.method.name") for p in problems)


@pytest.mark.parametrize("text", HOSTILE)
def test_no_user_string_reaches_the_markdown_raw(text):
    results = [
        (Path("/r/name.json"), _b2n("kgcoop", job__method=text, method__name=text)),  # refused, reason quotes it
        (Path("/r/override.json"), _b2n("kgcoop", method__default_recipe=False,
                                        method__recipe={"epochs": 5, "lr": 0.002, "n_ctx": text},
                                        method__overrides={"n_ctx": text})),
        (Path("/r/key.json"), _b2n("kgcoop", method__default_recipe=False, method__overrides={text: 1})),
        (Path("/r/backbone.json"), _b2n("maple", backbone__pretrained=text)),
        (Path(f"/r/{text.replace('/', '_')}.json"), {"not": "a result"}),
    ]
    md = build_leaderboard(results, root=Path("/r"))
    for raw in RAW_MARKUP:
        assert not re.search(raw, md), raw
    assert "&lt;" in md or "\\[" in md or "\\`" in md


def test_discovery_skips_a_method_name_that_is_not_an_identifier(monkeypatch):
    import benchsuite.methods as methods
    from benchsuite.hookspecs import hookimpl

    class Bad:
        name = "<img src=x onerror=alert(1)>"

    class Plugin:
        @hookimpl
        def benchsuite_methods(self):
            return [Bad]

    class EntryPoint:
        name, dist = "evil", None

        def load(self):
            return Plugin()

    monkeypatch.setattr(methods, "entry_points", lambda group: [EntryPoint()])
    methods.discover.cache_clear()
    methods.plugins.cache_clear()
    try:
        with pytest.warns(methods.PluginWarning, match="not allowed"):
            found = methods.discover()
        assert all(entry.cls is not Bad for entry in found.values())  # skipped: never a folder or a row
        assert any("not allowed" in p.what and "'evil'" in str(p) for p in methods.problems())
    finally:
        monkeypatch.undo()
        methods.discover.cache_clear()
        methods.plugins.cache_clear()


def test_a_forged_config_hash_is_refused():
    long_run = {**default_recipe("base2new", "coop", "dtd", 16), "epochs": 1000}
    honest = _b2n()
    forged = _b2n(method__recipe=long_run, method__config_hash=honest["method"]["config_hash"])
    problems = validate_result(forged)
    assert any(p.startswith("$.method.config_hash") for p in problems)
    assert any(p.startswith("$.method.recipe") and "epochs" in p for p in problems)


def test_a_changed_recipe_claiming_the_default_is_refused_even_with_a_matching_hash():
    long_run = {**default_recipe("base2new", "coop", "dtd", 16), "epochs": 1000}
    problems = validate_result(_b2n(method__recipe=long_run))  # the factory recomputes the hash
    assert len(problems) == 1 and problems[0].startswith("$.method.recipe: claims the default recipe")
    assert validate_result(_b2n(method__recipe=long_run, method__default_recipe=False,
                                method__overrides={"epochs": 1000})) == []
    assert validate_result(_b2n()) == []


def test_results_of_different_weights_are_not_merged():
    rows = [(Path(f"/r/s{seed}.json"), make_result("base2new", "coop", "dtd", seed,
                                                   metrics={"base": 80.0, "new": 60.0}))
            for seed in (1, 2)]
    other = make_result("base2new", "coop", "dtd", 3, metrics={"base": 99.0, "new": 99.0},
                        backbone__weights_sha256=sha("other weights"))
    md = build_leaderboard(rows + [(Path("/r/s3.json"), other)], root=Path("/r"))
    refused = md[md.index("## Refused results"):]
    assert "s3.json" in refused and "different weights for ViT-B-16/openai" in refused
    assert "99.00" not in md


def test_deep_and_huge_result_files_are_unreadable_not_fatal(tmp_path, capsys):
    good = _b2n()
    store = ResultStore(tmp_path)
    kept = store.write(good)
    deep = tmp_path / "base2new" / "deep.json"
    deep.write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    shallow_but_deep = tmp_path / "base2new" / "nested.json"
    shallow_but_deep.write_text('{"a":' * (MAX_RESULT_DEPTH + 5) + "1" + "}" * (MAX_RESULT_DEPTH + 5))
    huge = tmp_path / "base2new" / "huge.json"
    huge.write_text(dump_json({**good, "padding": "x" * MAX_RESULT_BYTES}))
    report = validate_files([kept, deep, shallow_but_deep, huge])
    assert report[kept] == []
    assert "nested too deeply" in report[deep][0]
    assert "nested deeper than" in report[shallow_but_deep][0]
    assert "byte limit" in report[huge][0]
    from benchsuite.leaderboard import load_results

    results, unreadable = load_results(tmp_path)
    assert [p for p, _ in results] == [kept]
    md = build_leaderboard(results, root=tmp_path, unreadable=unreadable)
    assert md.count("unreadable") == 3
    from benchsuite.cli import main

    assert main(["validate", str(deep), str(kept)]) != 0
    out = capsys.readouterr().out
    assert "deep.json" in out and "nested too deeply" in out
