"""Executors without Slurm: the pool, sharding, concurrent processes on one results folder, status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchsuite.engine.executors import parse_shard, shard
from benchsuite.engine.jobs import expand_grid
from benchsuite.errors import BenchsuiteError
from benchsuite.protocols import load_protocol
from test_run import load_results, result_files, run_quiet, temp_files

GRID = ["--protocol", "toy_few_shot", "--method", "coop", "zeroshot_clip", "--dataset", "toy_textures",
        "--shots", "1", "--seeds", "1", "2", "3", "--quiet"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from benchsuite.toy.datasets import materialize

    return materialize(tmp_path_factory.mktemp("toy") / "world", scale=0.2)


def toy_args(toy_root: Path, results: Path, *extra: str) -> list[str]:
    return ["run", *GRID, "--data-root", str(toy_root), "--results", str(results),
            "--feature-cache", str(results.parent / f"{results.name}-features"), *extra]


class Close(float):
    """A float that equals any float within 1e-4: ECE sums softmax confidences, whose last bits
    depend on the thread count (a pool worker gets a share of the cores, the local run all of them);
    accuracies, correct counts and per-class accuracies are compared exactly."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and abs(float(self) - other) <= 1e-4

    __hash__ = float.__hash__


def _close_ece(metrics: dict) -> dict:
    return {k: {m: (Close(v) if m == "ece" and isinstance(v, float) else v) for m, v in d.items()}
            for k, d in metrics.items()}


def comparable(results: Path) -> dict:
    """What must not depend on the executor: identity, recipe, data and metrics of every job."""
    return {key: (r["job"], r["method"], r["data"], _close_ece(r["metrics"]))
            for key, r in load_results(results).items()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, toy_root):
    results = tmp_path_factory.mktemp("local") / "results"
    code, out, err = run_quiet(toy_args(toy_root, results, "--set", "epochs=6"))
    assert code == 0, out + err
    assert len(result_files(results)) == 6
    return comparable(results)


def test_pool_of_two_workers_gives_the_local_results(tmp_path, toy_root, local_run):
    results = tmp_path / "results"
    code, out, err = run_quiet(toy_args(toy_root, results, "--set", "epochs=6", "--executor", "pool",
                                        "--workers", "2"))
    assert code == 0, out + err
    assert "6 computed, 0 reused, 0 failed" in out
    assert comparable(results) == local_run
    code, out, err = run_quiet(["status", "--results", str(results)])
    assert code == 0 and "complete" in out.splitlines()[-1], out + err


def _kill_first_checkpointed_worker(results: Path, killed: list, stop: threading.Event) -> None:
    """SIGKILL the process that claims a job as soon as that job has written an epoch checkpoint."""
    while not stop.is_set() and not killed:
        for ckpt in (results / "_checkpoints").glob("*.pt"):
            info_path = results / ".locks" / f"{ckpt.stem}.json"
            try:
                info = json.loads(info_path.read_text())
            except (OSError, ValueError):
                continue
            if info["pid"] != os.getpid():
                os.kill(info["pid"], signal.SIGKILL)
                killed.append(info)
                return
        time.sleep(0.01)


def test_a_worker_killed_mid_job_is_replaced_and_its_job_resumes_to_the_same_result(tmp_path, toy_root, local_run):
    results = tmp_path / "results"
    killed: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_first_checkpointed_worker, args=(results, killed, stop), daemon=True)
    watcher.start()
    try:
        code, out, err = run_quiet(toy_args(toy_root, results, "--set", "epochs=6", "--executor", "pool",
                                            "--workers", "2"))
    finally:
        stop.set()
        watcher.join()
    assert killed, "the watcher never saw a checkpointed job to kill"
    assert code == 0, out + err
    assert "died (exit code -9)" in out and "retrying" in out
    assert temp_files(results) == []
    assert comparable(results) == local_run
    victim = next(r for r in load_results(results).values()
                  if (r["job"]["method"], r["job"]["seed"]) == (killed[0]["method"], killed[0]["seed"]))
    assert victim["timing"]["train_resumed"] == 1
    assert list((results / "_checkpoints").glob("*.pt")) == []


def test_shards_are_disjoint_and_cover_the_grid():
    protocol = load_protocol("toy_few_shot")
    grid = expand_grid(protocol, ["coop", "zeroshot_clip"])
    for world in (1, 2, 3, 7, len(grid) + 3):
        parts = [shard(grid, rank, world) for rank in range(world)]
        labels = [job.label() for part in parts for job in part]
        assert sorted(labels) == sorted(job.label() for job in grid)  # covering
        assert len(labels) == len(set(labels))  # disjoint
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "1", "WORLD_SIZE": "4"}, (1, 4)),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}, (2, 3)),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, (0, 2)),
    ({"PMI_RANK": "5", "PMI_SIZE": "8"}, (5, 8)),
])
def test_shard_auto_reads_launcher_variables(env, expected):
    assert parse_shard("auto", env) == expected


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_bad_shards_are_refused(text):
    with pytest.raises(BenchsuiteError, match="--shard"):
        parse_shard(text, {})


def test_hand_launched_shards_complete_the_grid(tmp_path, toy_root):
    results = tmp_path / "results"
    seen = []
    for rank in range(3):
        code, out, err = run_quiet(toy_args(toy_root, results, "--method", "zeroshot_clip", "--shard", f"{rank}/3"))
        assert code == 0, out + err
        assert "1 computed" in out  # 3 seeds of one method, one per shard
        seen.append(len(result_files(results)))
    assert seen == [1, 2, 3]
    code, out, _ = run_quiet(["status", "--results", str(results)])
    assert code == 0, out


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchsuite.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_processes_on_one_results_folder_never_run_a_job_twice(tmp_path, toy_root):
    results = tmp_path / "results"
    argv = toy_args(toy_root, results, "--set", "epochs=4")
    procs = [_cli(*argv) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    written = [line for out in outputs for line in out.splitlines() if " -> " in line]
    labels = [line.split("] ", 1)[1].split(":", 1)[0] for line in written]
    assert len(labels) == len(set(labels)) == 6, written
    assert len(result_files(results)) == 6


def test_cross_dataset_and_domain_generalization_in_parallel_train_once(tmp_path, toy_root):
    results = tmp_path / "results"
    common = ["--method", "coop", "--seeds", "1", "--set", "epochs=3", "--quiet", "--data-root", str(toy_root),
              "--results", str(results), "--no-feature-cache"]
    procs = [_cli("run", "--protocol", p, *common) for p in ("toy_cross_dataset", "toy_domain_generalization")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    found = [json.loads(p.read_text()) for p in result_files(results)]
    assert len(found) == 2
    shared = sorted((r["timing"]["train_shared_from"] or "") for r in found)
    ids = {r["job"]["id"] for r in found}
    assert shared[0] == "" and shared[1] in ids  # one trained, the other reused exactly that training
    assert found[0]["metrics"]["toy_objects"] == found[1]["metrics"]["toy_objects"]
    assert found[0]["timing"]["train_images"] == found[1]["timing"]["train_images"]


def test_status_reports_running_failed_and_missing_jobs(tmp_path):
    from benchsuite.results.status import failure_log, record_grid
    from benchsuite.results.store import ResultStore

    results = tmp_path / "results"
    cells = [("toy_few_shot", "coop", "toy_textures", 1, seed) for seed in (1, 2, 3)]
    record_grid(results, cells)
    log = failure_log(results, *cells[1])
    log.parent.mkdir(parents=True)
    log.write_text("Traceback ...\n")
    store = ResultStore(results)
    info = {"label": "x", "protocol": "toy_few_shot", "method": "coop", "dataset": "toy_textures", "shots": 1,
            "seed": 1}
    with store.claim("a" * 64, info) as held:
        assert held
        code, out, err = run_quiet(["status", "--results", str(results)])
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("toy_few_shot"))
    assert row.split()[2:] == ["0", "1", "1", "1", "3"]  # done running failed missing total
    assert f"failed: toy_few_shot/coop/toy_textures/1shot/seed2 (log: {log})" in out
    assert out.splitlines()[-1] == "incomplete"
    # the claim ended: the job is no longer running
    code, out, _ = run_quiet(["status", "--results", str(results), "--protocol", "toy_few_shot"])
    row = next(line for line in out.splitlines() if line.startswith("toy_few_shot"))
    assert row.split()[2:] == ["0", "0", "1", "2", "3"]
    code, out, err = run_quiet(["status", "--results", str(results), "--protocol", "base2new"])
    assert code == 1 and "no grid recorded" in err


@pytest.mark.parametrize("extra,named", [
    (["--workers", "2"], "--executor pool"),
    (["--executor", "pool", "--workers", "0"], "--workers"),
    (["--shard", "4/4"], "--shard"),
    (["--executor", "slurm", "--slurm-extra", "nokey"], "--slurm-extra"),
    (["--executor", "pool", "--workers", "2", "--pretrained", "/nonexistent/weights.pt"], "/nonexistent/weights.pt"),
])
def test_bad_executor_options_are_one_clear_line(extra, named, tmp_path, toy_root):
    code, out, err = run_quiet(toy_args(toy_root, tmp_path / "r", *extra))
    assert code == 2, out + err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() or result_files(tmp_path / "r") == []
