"""A real single-node Slurm (scripts/slurm-cluster.sh): the grid as one submitit job array, a requeued
and a USR1-signalled training job resuming from its checkpoint, and `benchsuite status`.

Uses the cluster named by $SLURM_CONF when it answers (CI starts one before the tests), else starts
a throwaway one (root, slurm-wlm and munge needed); otherwise every test here is skipped with why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_executors import comparable, local_run, toy_args, toy_root  # noqa: F401  (fixtures)
from test_run import load_results, result_files, run_quiet

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm-cluster.sh"


def _answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A Slurm cluster to submit to (SLURM_CONF set for this process and its children)."""
    if os.environ.get("SLURM_CONF") and _answers():
        yield os.environ["SLURM_CONF"]
        return
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("Slurm tests skipped: slurm-wlm/munge are not installed (apt-get install slurm-wlm munge; "
                    ".ci/run does it)")
    if os.geteuid() != 0:
        pytest.skip("Slurm tests skipped: starting a throwaway cluster needs root")
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.skip(f"Slurm tests skipped: the cluster did not start: {started.stderr.strip()[-300:]}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def _squeue(job_id: str) -> tuple[str, str] | None:
    """(state, reason) of a job, None once it has left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True).stdout
    line = out.strip().splitlines()
    return tuple(line[0].split("|", 1)) if line else None


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _array_id(out: str) -> str:
    line = next(line for line in out.splitlines() if "submitted Slurm job array" in line)
    return line.split("job array ", 1)[1].split()[0]


def test_grid_as_one_job_array_equals_the_local_run(slurm, tmp_path, toy_root, local_run):  # noqa: F811
    results = tmp_path / "results"
    code, out, err = run_quiet(toy_args(toy_root, results, "--set", "epochs=6", "--executor", "slurm",
                                        "--time", "10", "--wait"))
    assert code == 0, out + err
    array = _array_id(out)
    assert f"benchsuite status --results {results} --protocol toy_few_shot" in out
    assert "6 finished, 0 failed" in out
    assert comparable(results) == local_run
    folders = [path.name for path in (results / "_slurm").iterdir() if path.is_dir()]
    assert {name.split("_")[0] for name in folders} == {array}  # ONE array (its folder holds the sbatch file)
    assert sorted(name for name in folders if "_" in name) == [f"{array}_{i}" for i in range(6)]
    code, out, err = run_quiet(["status", "--results", str(results), "--protocol", "toy_few_shot"])
    assert code == 0 and out.splitlines()[-1] == "complete", out + err


LONG = ["--method", "coop", "--seeds", "1", "--set", "epochs=30"]


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory, toy_root):  # noqa: F811
    results = tmp_path_factory.mktemp("long") / "results"
    code, out, err = run_quiet(toy_args(toy_root, results, *LONG))
    assert code == 0, out + err
    (result,) = load_results(results).values()
    return result


@pytest.mark.parametrize("interrupt", ["requeue", "usr1"])
def test_interrupted_slurm_job_resumes_from_its_checkpoint(interrupt, slurm, tmp_path, toy_root,  # noqa: F811
                                                           long_reference):
    results = tmp_path / "results"
    code, out, err = run_quiet(toy_args(toy_root, results, *LONG, "--executor", "slurm", "--time", "30"))
    assert code == 0, out + err
    array = _array_id(out)
    job = _wait_for(lambda: next((name for name in (f"{array}_0", array) if (results / "_slurm" / name).is_dir()), None),
                    60, "the task's folder")  # Slurm makes a one-task array a plain job
    checkpoints = results / "_checkpoints"
    _wait_for(lambda: any(checkpoints.glob("*.pt")), 300, "the first epoch checkpoint")
    if interrupt == "requeue":
        subprocess.run(["scontrol", "requeue", job], check=True)
    else:  # Slurm's pre-emption warning: submitit checkpoints and requeues the task itself
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
    # a requeued job waits ~120 s (reason BeginTime) before it may start again: release it now
    _wait_for(lambda: (_squeue(job) or ("", ""))[0] == "PENDING", 60, "the job to be requeued")
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    _wait_for(lambda: result_files(results), 300, "the resumed job's result", poll=0.5)
    (result,) = load_results(results).values()
    assert result["timing"]["train_resumed"] >= 1
    assert result["metrics"] == long_reference["metrics"]
    assert result["job"]["id"] == long_reference["job"]["id"]
    # one squeue call per poll: the job may leave the queue between two calls
    _wait_for(lambda: (_squeue(job) or ("COMPLETED",))[0] == "COMPLETED", 60, "the job to finish")
    assert list(checkpoints.glob("*.pt")) == []
    code, out, err = run_quiet(["status", "--results", str(results)])
    assert code == 0, out + err
