"""The environment failing is one clear line, never a traceback: a full, read-only or forbidden disk
on every write (results, grid records, the leaderboard, its plots), a Slurm partition the cluster
does not have, and an unknown --executor. No temporary file is left behind, even by a killed writer."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchsuite import cli
from benchsuite.engine.feature_cache import FeatureCache, feature_key
from benchsuite.errors import BenchsuiteError, WriteError
from benchsuite.results.store import ResultStore, atomic_write_text
from benchsuite.tempfiles import host_tag
from fixture_data import make_data_root
from results_factory import make_result
from test_run import result_files, run_quiet, temp_files

NO_SPACE = os.strerror(errno.ENOSPC)
READ_ONLY = os.strerror(errno.EROFS)


class BackboneLoaded(AssertionError):
    """Raised by the patched loader: the run got past every check this test is about."""


@pytest.fixture
def no_backbone(monkeypatch):
    def refuse(*args, **kwargs):
        raise BackboneLoaded("the backbone was loaded")
    monkeypatch.setattr(cli, "_load_backbone", refuse)


@pytest.fixture(scope="module")
def pets_root(tmp_path_factory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("pets"), ["oxford_pets"])


def _run_argv(pets_root: Path, results: Path, pretrained: str = "none", *extra: str) -> list[str]:
    return ["run", "--protocol", "base2new", "--method", "zeroshot_clip", "--dataset", "oxford_pets", "--seeds", "1",
            "--backbone", "bs-tiny-test", "--pretrained", pretrained, "--data-root", str(pets_root),
            "--results", str(results), "--feature-cache", str(results.parent / "features"), "--quiet", *extra]


def _one_error(code: int, out: str, err: str) -> str:
    """The single `benchsuite: error:` line of a refused command (exit code 2, no traceback)."""
    assert code == 2, out + err
    assert "Traceback" not in err and "usage:" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("benchsuite: error: "), err
    return lines[0]


def _refuse_replace(monkeypatch, code: int, when) -> list[Path]:
    """os.replace fails with errno `code` for targets `when` accepts (as a full or read-only disk
    does at the end of a write); returns the targets refused."""
    real, refused = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if when(Path(dst)):
            refused.append(Path(dst))
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return refused


# ---- (a) full, read-only and forbidden disks ------------------------------------------------------------

def test_a_full_disk_recording_the_grid_is_one_line_naming_the_file(tmp_path, pets_root, monkeypatch, no_backbone):
    results = tmp_path / "results"
    refused = _refuse_replace(monkeypatch, errno.ENOSPC, lambda dst: "_grids" in dst.parts)
    line = _one_error(*run_quiet(_run_argv(pets_root, results)))
    assert refused and str(refused[0]) in line, line
    assert f"{NO_SPACE} (ENOSPC)" in line and "free space" in line and "--results DIR" in line, line
    assert temp_files(results) == []


def test_a_result_that_cannot_be_written_names_the_file_and_leaves_no_temporary(tmp_path, pets_root, monkeypatch,
                                                                                 tiny_checkpoint):
    results = tmp_path / "results"
    result_folder = results / "base2new"  # not the grid record, claim files, logs or the feature cache
    refused = _refuse_replace(monkeypatch, errno.ENOSPC,
                              lambda dst: dst.suffix == ".json" and dst.is_relative_to(result_folder))
    # the grid stops at the first result it cannot write (every later job would train and fail to save)
    line = _one_error(*run_quiet(_run_argv(pets_root, results, str(tiny_checkpoint))))
    assert f"cannot write {refused[0]}: {NO_SPACE} (ENOSPC)" in line and "--results DIR" in line, line
    assert result_files(results) == [] and temp_files(results) == []
    line = _one_error(*run_quiet(_run_argv(pets_root, results, str(tiny_checkpoint), "--fail-fast")))
    assert f"cannot write {refused[-1]}: {NO_SPACE} (ENOSPC)" in line and "--results DIR" in line, line
    assert temp_files(results) == []


def _one_result(root: Path) -> Path:
    ResultStore(root).write(make_result("base2new", "coop", "dtd", 1, shots=16, metrics={"base": 80.0, "new": 60.0}))
    return root


def test_a_read_only_leaderboard_file_is_one_line_naming_it(tmp_path, monkeypatch):
    results, out = _one_result(tmp_path / "results"), tmp_path / "board" / "README.md"
    _refuse_replace(monkeypatch, errno.EROFS, lambda dst: dst == out)
    line = _one_error(*run_quiet(["leaderboard", "--results", str(results), "--out", str(out), "--no-plots",
                                  "--reference", str(tmp_path / "no-references")]))
    assert f"cannot write {out}: {READ_ONLY} (EROFS)" in line and "--out FILE" in line, line
    assert not out.exists() and temp_files(out.parent) == []


def test_a_full_disk_while_drawing_a_plot_names_the_plot(tmp_path, monkeypatch):
    from benchsuite.report import plots

    results, out = _one_result(tmp_path / "results"), tmp_path / "board" / "README.md"

    def full(plot, path):  # matplotlib's write fails as a write() does: errno, no file name
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(plots, "render", full)
    line = _one_error(*run_quiet(["leaderboard", "--results", str(results), "--out", str(out),
                                  "--reference", str(tmp_path / "no-references")]))
    png = out.parent / "plots" / "README"
    assert f"cannot write {png}{os.sep}" in line and ".png:" in line and "(ENOSPC)" in line, line


def test_a_refusal_outside_benchsuites_writers_is_one_line_naming_the_target(tmp_path, monkeypatch):
    target = tmp_path / "bench.json"

    def forbidden(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / ".bench.json.tmp"), None,
                              str(target))

    def bug(args):
        raise OSError("a bug, not the disk")

    monkeypatch.setattr(cli, "_cmd_status", forbidden)
    line = _one_error(*run_quiet(["status", "--results", str(tmp_path)]))
    assert f"{target}: {os.strerror(errno.EACCES)} (EACCES)" in line and "--results DIR" in line, line
    monkeypatch.setattr(cli, "_cmd_status", bug)
    with pytest.raises(OSError, match="a bug"):  # anything else keeps its traceback: it is a bug report
        run_quiet(["status", "--results", str(tmp_path)])


def test_a_write_error_is_still_an_os_error_and_travels_between_processes(tmp_path, monkeypatch):
    import pickle

    _refuse_replace(monkeypatch, errno.EDQUOT, lambda dst: True)
    with pytest.raises(OSError) as caught:  # callers that tolerate failed writes still catch it
        atomic_write_text(tmp_path / "r.json", "{}")
    error = caught.value
    assert isinstance(error, WriteError) and isinstance(error, BenchsuiteError)
    assert error.filename == str(tmp_path / "r.json") and error.errno == errno.EDQUOT
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    assert "quota" in str(error) and list(tmp_path.iterdir()) == []


def test_a_killed_feature_cache_write_is_removed_by_the_next_write(tmp_path):
    root, key = tmp_path / "features", feature_key("m", "w" * 64, "f" * 64, "t", "fp32")
    killed = ("import os, sys, torch\n"
              "from benchsuite.engine.feature_cache import FeatureCache\n"
              "os.replace = lambda *a: os._exit(9)  # killed between writing and renaming: no cleanup runs\n"
              "FeatureCache(sys.argv[1]).put(sys.argv[2], torch.randn(4, 3), torch.arange(4), {})\n")
    done = subprocess.run([sys.executable, "-c", killed, str(root), key], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    (left,) = [p for p in root.iterdir() if p.is_dir()]
    assert left.name.startswith(f".{key}.") and (left / "features.npy").is_file()
    other, third = (feature_key("m", "w" * 64, fp * 64, "t", "fp32") for fp in "gh")
    live = root / f".{third}.{host_tag()}.{os.getppid()}.w.tmp"  # a writer still running
    elsewhere = root / f".{third}.another-host.{2**22 + 1}.w.tmp"
    live.mkdir()
    elsewhere.mkdir()
    cache = FeatureCache(root)
    assert cache.put(other, torch.randn(4, 3), torch.arange(4), {}) is True
    assert not left.exists() and live.is_dir() and elsewhere.is_dir()  # a live writer's and another host's stay
    assert (root / other).is_dir() and cache.get(other) is not None


# ---- (b) a Slurm partition the cluster does not have --------------------------------------------------------

SBATCH_REFUSES = ("echo 'sbatch: error: invalid partition specified: {partition}' >&2\n"
                  "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
                  "exit 1\n")
SBATCH_ACCEPTS = "echo 'Submitted batch job 4242'\n"


def _fake_slurm(tmp_path: Path, monkeypatch, *, sinfo: str, sbatch: str) -> Path:
    """sinfo, sbatch and srun as scripts first on PATH; each sbatch call copies its script to calls/."""
    folder, calls = tmp_path / "fake-slurm", tmp_path / "calls"
    folder.mkdir()
    calls.mkdir()
    scripts = {"srun": "exit 0\n", "sinfo": sinfo, "sbatch": f'cp "$1" "{calls}/"\n{sbatch}'}
    for name, body in scripts.items():
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}", encoding="utf-8")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")  # submit_slurm sets it; restored after the test
    return calls


def test_a_partition_sinfo_does_not_list_is_refused_before_any_work(tmp_path, pets_root, monkeypatch, no_backbone):
    calls = _fake_slurm(tmp_path, monkeypatch, sinfo="printf 'debug*\\ngpu\\n'\n", sbatch=SBATCH_ACCEPTS)
    results = tmp_path / "results"
    line = _one_error(*run_quiet(_run_argv(pets_root, results, "none", "--executor", "slurm", "--partition", "gpux")))
    assert "--partition: unknown Slurm partition 'gpux' (did you mean 'gpu'?); known: debug, gpu" in line, line
    assert "sinfo -s" in line and list(calls.iterdir()) == []
    assert not (results / "_grids").exists()  # refused before the preflight and the grid record


def test_a_partition_sbatch_refuses_is_one_line_with_sbatchs_words(tmp_path, pets_root, monkeypatch, no_backbone):
    calls = _fake_slurm(tmp_path, monkeypatch, sinfo="echo 'slurm_load_partitions: Unable to contact slurm "
                                                     "controller' >&2\nexit 1\n",
                        sbatch=SBATCH_REFUSES.format(partition="nosuch"))
    line = _one_error(*run_quiet(_run_argv(pets_root, tmp_path / "results", "none", "--executor", "slurm",
                                           "--partition", "nosuch")))
    assert line.startswith("benchsuite: error: --partition nosuch: sbatch refused the job array: "), line
    assert "invalid partition specified: nosuch" in line and "Invalid partition name specified" in line, line
    assert "sinfo -s" in line and len(list(calls.iterdir())) == 1


def test_a_listed_partition_is_submitted(tmp_path, pets_root, monkeypatch, no_backbone):
    calls = _fake_slurm(tmp_path, monkeypatch, sinfo="printf 'debug*\\ngpu\\n'\n", sbatch=SBATCH_ACCEPTS)
    code, out, err = run_quiet(_run_argv(pets_root, tmp_path / "results", "none", "--executor", "slurm",
                                         "--partition", "debug"))
    assert code == 0 and "submitted Slurm job array 4242" in out, out + err
    (script,) = calls.iterdir()
    assert "#SBATCH --partition=debug" in script.read_text(encoding="utf-8").splitlines()


# ---- (c) an unknown executor ----------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("slrum", "--executor: unknown executor 'slrum' (did you mean 'slurm'?); known: local, pool, slurm"),
    ("nosuch", "--executor: unknown executor 'nosuch'; known: local, pool, slurm"),
])
def test_an_unknown_executor_is_one_line_naming_the_valid_ones(value, expected):
    line = _one_error(*run_quiet(["run", "--executor", value]))  # before argparse asks for --protocol
    assert line == f"benchsuite: error: {expected}", line


def test_the_executor_option_still_parses_and_lists_its_values():
    parser = cli.build_parser(plugin_commands=False)
    assert parser.parse_args(["run", "--protocol", "p"]).executor == "local"
    assert parser.parse_args(["run", "--protocol", "p", "--executor", "pool"]).executor == "pool"
    run = next(a for a in parser._actions if a.dest == "command").choices["run"]
    assert "--executor {local,pool,slurm}" in run.format_help()
