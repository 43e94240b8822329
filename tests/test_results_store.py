"""Result schema messages and the atomic, locked result store."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import warnings
from pathlib import Path

import pytest

try:
    from results_factory import DELETE, make_result
except ImportError:  # tests/ imported as a package
    from tests.results_factory import DELETE, make_result

from benchsuite.errors import ResultError
from benchsuite.results import store as store_module
from benchsuite.results.schema import load_schema, validate_schema
from benchsuite.results.store import ResultStore


def test_schema_ships_with_the_package_and_accepts_a_factory_result() -> None:
    assert load_schema()["$schema"].endswith("2020-12/schema")
    assert validate_schema(make_result("base2new", "coop", "dtd", 1)) == []


def test_schema_errors_name_json_paths_and_are_sorted() -> None:
    result = make_result(
        "base2new", "coop", "dtd", 1,
        job__protocol__hash="abc", backbone__precision="fp8", timing=DELETE, surprise=1,
        metrics__base__total=0,
    )
    problems = validate_schema(result)
    assert problems == sorted(problems, key=lambda m: m.split(":")[0].split("."))
    joined = "\n".join(problems)
    assert "$.job.protocol.hash: 'abc' does not match" in joined
    assert "$.backbone.precision: 'fp8' is not one of" in joined
    assert "$.metrics.base.total: 0 is less than the minimum of 1" in joined
    assert "$: 'timing' is a required property" in joined
    assert "$: Additional properties are not allowed ('surprise' was unexpected)" in joined
    assert len(problems) == 5


def test_schema_rejects_non_objects() -> None:
    assert validate_schema([1, 2]) == ["$: [1, 2] is not of type 'object'"]


def test_path_layout(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    job = "ab" * 32
    assert store.path_for("base2new", "coop", "dtd", job) == tmp_path / "base2new" / "coop" / "dtd" / f"{job[:16]}.json"
    with pytest.raises(ResultError):
        store.path_for("base2new", "../evil", "dtd", job)


def test_write_then_existing_round_trips(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    result = make_result("few_shot", "coop", "eurosat", 2, shots=4)
    path = store.write(result)
    assert path == store.path_for("few_shot", "coop", "eurosat", result["job"]["id"])
    assert json.loads(path.read_text(encoding="utf-8")) == result
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.existing(path, result["job"]["id"]) == result
        assert store.existing(tmp_path / "absent.json", result["job"]["id"]) is None


def test_write_refuses_schema_invalid_results_and_writes_nothing(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    result = make_result("base2new", "coop", "dtd", 1, metrics__new__accuracy=101.0)
    with pytest.raises(ResultError, match=r"\$\.metrics\.new\.accuracy"):
        store.write(result)
    assert list(tmp_path.rglob("*")) == []


def test_failed_replace_leaves_no_target_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResultStore(tmp_path)
    result = make_result("base2new", "coop", "dtd", 1)
    target = store.path_of(result)

    def boom(src: str, dst: str) -> None:
        raise OSError("disk vanished")

    monkeypatch.setattr(store_module.os, "replace", boom)
    with pytest.raises(OSError, match="disk vanished"):
        store.write(result)
    assert not target.exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_failed_rewrite_keeps_the_previous_complete_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResultStore(tmp_path)
    first = make_result("base2new", "coop", "dtd", 1, metrics={"base": 70.0, "new": 60.0})
    path = store.write(first)
    second = make_result("base2new", "coop", "dtd", 1, metrics={"base": 90.0, "new": 60.0})
    assert store.path_of(second) == path

    def fail_fsync(fd: int) -> None:
        raise OSError("killed mid-write")

    monkeypatch.setattr(store_module.os, "fsync", fail_fsync)
    with pytest.raises(OSError):
        store.write(second)
    assert json.loads(path.read_text(encoding="utf-8")) == first
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "schema", "other_job"])
def test_damaged_results_are_treated_as_missing_with_a_warning(tmp_path: Path, damage: str) -> None:
    store = ResultStore(tmp_path)
    result = make_result("base2new", "coop", "dtd", 1)
    path = store.write(result)
    text = path.read_text(encoding="utf-8")
    if damage == "truncate":
        path.write_text(text[: len(text) // 2], encoding="utf-8")
    elif damage == "garbage":
        path.write_bytes(b"\xff\xfe\x00 not json")
    elif damage == "schema":
        broken = dict(result)
        del broken["metrics"]
        path.write_text(json.dumps(broken), encoding="utf-8")
    else:
        other = make_result("base2new", "coop", "dtd", 2)
        path.write_text(json.dumps(other), encoding="utf-8")
    with pytest.warns(RuntimeWarning, match=path.name):
        assert store.existing(path, result["job"]["id"]) is None


def test_iter_results_reports_unreadable_files_and_skips_locks(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    good = store.write(make_result("base2new", "coop", "dtd", 1))
    bad = tmp_path / "base2new" / "coop" / "dtd" / "broken.json"
    bad.write_text('{"job": ', encoding="utf-8")
    (tmp_path / ".locks").mkdir(exist_ok=True)
    (tmp_path / ".locks" / "x.json").write_text("{}", encoding="utf-8")
    errors: list[tuple[Path, str]] = []
    found = list(store.iter_results(on_error=lambda p, why: errors.append((p, why))))
    assert [p for p, _ in found] == [good]
    assert [p for p, _ in errors] == [bad] and "line 1 column" in errors[0][1]
    with pytest.warns(RuntimeWarning, match="broken.json"):
        assert len(list(store.iter_results())) == 1


def test_claim_is_exclusive_and_released(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    with store.claim("a" * 64) as first:
        with store.claim("a" * 64) as second, store.claim("b" * 64) as other:
            assert (first, second, other) == (True, False, True)
    with store.claim("a" * 64) as again:
        assert again is True


def _worker(root: str, index: int, barrier, claims) -> None:  # runs in a spawned process
    store = ResultStore(Path(root))
    shared = make_result("base2new", "coop", "dtd", 1)
    barrier.wait()
    with store.claim(shared["job"]["id"]) as held:
        claims.put((index, held))
        barrier.wait()  # nobody releases before every process has tried to claim
    for seed in (1, 2, 3):
        store.write(make_result("base2new", f"m{index}", "dtd", seed, metrics={"base": 50.0 + index, "new": 40.0}))
        store.write(shared)  # every process also rewrites the same file at once
        time.sleep(0.001)


def test_concurrent_processes_claim_once_and_write_valid_files(tmp_path: Path) -> None:
    n = 5
    ctx = multiprocessing.get_context("spawn")
    barrier, claims = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), i, barrier, claims)) for i in range(n)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * n
    held = sorted(claims.get(timeout=5) for _ in range(n))
    assert sum(flag for _, flag in held) == 1
    store = ResultStore(tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and ".locks" not in p.parts]
    assert len(files) == n * 3 + 1 and all(p.suffix == ".json" for p in files)
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        assert validate_schema(data) == []
        assert store.existing(path, data["job"]["id"]) == data
    assert os.path.isdir(tmp_path / ".locks")
