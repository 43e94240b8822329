"""A results folder that cannot be written: a run whose jobs are all done there reuses them and
exits 0 without writing anything; a run that would have to write something is refused, before the
backbone is loaded when the recipe identity already shows a missing job.

The tests run as any user (root ignores permission bits), so the folder is made read-only by
refusing, with EROFS as a read-only file system does, every call that would create, change or
remove something under it; any write attempted is recorded and fails the test."""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import pytest

from benchsuite import cli
from test_run import result_files, run_quiet

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _read_only(monkeypatch, root: Path) -> list[str]:
    """Make `root` behave as a read-only file system for this process; returns the refused writes."""
    root = Path(os.path.abspath(root))
    refused: list[str] = []

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        target = Path(os.path.abspath(os.fsdecode(path)))
        return target == root or root in target.parents

    def refuse(path):
        refused.append(os.fsdecode(path))
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_open, real_io_open, real_mkdir = os.open, io.open, os.mkdir

    def guarded_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and inside(path):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_io_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_io_open(file, mode, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            if os.path.exists(path):  # as on a read-only file system: an existing folder is EEXIST
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def guard(real):
        def guarded(*paths, **kwargs):
            for path in paths:
                if inside(path):
                    refuse(path)
            return real(*paths, **kwargs)
        return guarded

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_io_open)
    monkeypatch.setattr(builtins, "open", guarded_io_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    for name in ("replace", "rename", "unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    return refused


def _only_the_probe(refused: list[str]) -> bool:
    """The one write a run attempts in a read-only folder: the probe that finds it read-only."""
    return len(refused) == 1 and ".write-probe" in Path(refused[0]).name


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from benchsuite.toy.datasets import materialize

    return materialize(tmp_path_factory.mktemp("toy") / "world", scale=0.2)


def _argv(toy_root: Path, results: Path) -> list[str]:
    return ["run", "--protocol", "toy_few_shot", "--method", "zeroshot_clip", "--dataset", "toy_textures",
            "--shots", "1", "--seeds", "1", "2", "--data-root", str(toy_root), "--results", str(results),
            "--feature-cache", str(results.parent / "features"), "--quiet"]


def test_a_read_only_folder_whose_jobs_are_done_is_reused_with_exit_0(tmp_path, toy_root, monkeypatch):
    results = tmp_path / "results"
    code, out, err = run_quiet(_argv(toy_root, results))
    assert code == 0 and len(result_files(results)) == 2, out + err
    before = _tree(results)
    refused = _read_only(monkeypatch, results)
    code, out, err = run_quiet(_argv(toy_root, results))
    monkeypatch.undo()
    assert code == 0, out + err
    assert "0 computed, 2 reused, 0 failed" in out and "not writable" in out
    assert _only_the_probe(refused) and _tree(results) == before  # nothing written, nothing else attempted


def test_a_read_only_folder_with_a_job_to_compute_is_refused_before_the_backbone(tmp_path, toy_root, monkeypatch):
    results = tmp_path / "results"
    code, out, err = run_quiet(_argv(toy_root, results))
    assert code == 0, out + err
    result_files(results)[0].unlink()
    before = _tree(results)
    refused = _read_only(monkeypatch, results)

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded for a run that cannot write its result")

    monkeypatch.setattr(cli, "_load_backbone", no_backbone)
    code, out, err = run_quiet(_argv(toy_root, results))
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in err, out + err
    line = next(line for line in err.splitlines() if line.startswith("benchsuite: error:"))
    assert "not writable" in line and "1 of 2 job(s)" in line and "toy_few_shot/zeroshot_clip/toy_textures" in line
    assert "--results DIR" in line
    assert _only_the_probe(refused) and _tree(results) == before
