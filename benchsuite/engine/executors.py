"""Executors: where `Runner.run_job` is called for each job of a grid.

Jobs are pure (one job, one atomically written result file, a claim lock while it runs), so an
executor only decides where and when a job runs; executors coordinate through the results folder.

- `run_local`: in this process, one job after the other.
- `run_pool`: one worker process per device (pinned with CUDA_VISIBLE_DEVICES) or N CPU workers,
  each loading the backbone once and pulling jobs; a worker that dies is replaced and its job
  retried once (it resumes from its epoch checkpoint).
- `submit_slurm`: the grid as ONE Slurm job array through submitit; a pre-empted or timed-out task
  saves its epoch checkpoint and is requeued.
- `shard`: the part of a grid that one of WORLD hand-launched processes runs.

This module imports neither torch nor submitit at import time: pool workers set
CUDA_VISIBLE_DEVICES before torch is first imported, and submitit is needed only for Slurm.
"""

from __future__ import annotations

import collections
import contextlib
import io
import multiprocessing
import multiprocessing.connection
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import BenchsuiteError
from ..suggest import unknown
from .jobs import Job

#: builds a Runner in the calling process; picklable (sent to pool workers and Slurm tasks)
RunnerFactory = Callable[..., Any]

#: rank/world variables of the usual launchers: torchrun, Slurm tasks, Open MPI, MPICH/Intel MPI
RANK_ENV = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"))

#: benchsuite's pre-emption warning signal, also inside Slurm jobs (submitit reads this variable)
PREEMPT_SIGNAL = "USR1"


# ---- sharding ------------------------------------------------------------------------------------
def parse_shard(text: str, environ: dict[str, str] | None = None) -> tuple[int, int]:
    """`RANK/WORLD`, or `auto`: rank and world from torchrun, Slurm or MPI variables."""
    if text == "auto":
        env = os.environ if environ is None else environ
        for rank_var, world_var in RANK_ENV:
            if rank_var in env and world_var in env:
                return parse_shard(f"{env[rank_var]}/{env[world_var]}")
        raise BenchsuiteError("--shard auto: none of " + ", ".join(f"{r}/{w}" for r, w in RANK_ENV)
                              + " is set; pass --shard RANK/WORLD")
    try:
        rank, world = (int(part) for part in text.split("/"))
    except ValueError:
        raise BenchsuiteError(f"--shard expects RANK/WORLD (e.g. 0/4) or auto, got {text!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise BenchsuiteError(f"--shard {text}: need 0 <= RANK < WORLD, e.g. 0/{max(world, 1)}")
    return rank, world


def shard(jobs: Sequence[Job], rank: int, world: int) -> list[Job]:
    """Every WORLD-th job from RANK: shards are disjoint, cover the grid and are balanced within one
    job (the grid order groups jobs of one dataset, so each shard gets a similar mix)."""
    return list(jobs[rank::world])


# ---- local ---------------------------------------------------------------------------------------
def run_local(factory: RunnerFactory, jobs: list[Job]):
    """In this process (the default executor)."""
    return factory().run(jobs)


# ---- pool ----------------------------------------------------------------------------------------
@dataclass
class PoolSummary:
    """Same fields as runner.RunSummary, plus the number of workers that died."""

    written: list[Path]
    skipped: list[str]
    failed: list[str]
    deaths: int = 0


def _worker(factory: RunnerFactory, name: str, device: str | None, threads: int | None,
            conn: multiprocessing.connection.Connection) -> None:
    """A pool worker: pin the device, build the runner once, then run jobs until told to stop."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        runner = factory()
    except BenchsuiteError as exc:  # a bad backbone or device: the same one-line error as without a pool
        conn.send(("error", None, str(exc)))
        return
    conn.send(("ready", None, None))
    while True:
        message = conn.recv()
        if message is None:
            return
        index, total, job = message
        try:
            path = runner.run_job(job, prefix=f"[{index + 1}/{total} {name}] {job.label()}")
            conn.send(("done", index, str(path) if path is not None else None))
        except BenchsuiteError as exc:  # includes NonFiniteLoss: the job failed, the worker lives on
            runner._log_failure(job, f"{type(exc).__name__}: {exc}\n")
            conn.send(("failed", index, str(exc)))
        except Exception as exc:  # a bug in a method or the harness: log it, keep the worker
            runner._log_failure(job)
            conn.send(("failed", index, f"{type(exc).__name__}: {exc}"))


def _write_failure(results: Path, job: Job, text: str) -> Path:
    from ..results.status import failure_log
    from ..results.store import atomic_write_text

    path = failure_log(results, job.protocol.id, job.method, job.dataset, job.shots, job.seed)
    atomic_write_text(path, f"{job.label()}\n{text}")
    return path


def run_pool(factory: RunnerFactory, jobs: list[Job], *, devices: list[str] | None = None, workers: int = 1,
             results: Path, echo=print) -> PoolSummary:
    """Run `jobs` in worker processes: one per entry of `devices` (CUDA ids) or `workers` on CPU.

    A worker that dies (killed, out of memory) is replaced; its job is queued again once (it then
    resumes from its epoch checkpoint), and counted failed if it dies a second time.
    """
    slots: list[str | None] = list(devices) if devices else [None] * workers
    threads = None if devices else max(1, (os.cpu_count() or 1) // len(slots))
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: CUDA_VISIBLE_DEVICES applies, no forked CUDA
    pending = collections.deque(range(len(jobs)))
    attempts = collections.Counter()
    summary = PoolSummary([], [], [])
    live: dict[int, dict[str, Any]] = {}  # slot -> {"proc", "conn", "job"}

    def start(slot: int) -> None:
        parent, child = ctx.Pipe()
        name = f"worker {slot}" + (f" cuda {slots[slot]}" if slots[slot] is not None else "")
        proc = ctx.Process(target=_worker, args=(factory, name, slots[slot], threads, child), daemon=True)
        proc.start()
        child.close()
        live[slot] = {"proc": proc, "conn": parent, "job": None}

    def feed(slot: int) -> None:
        worker = live[slot]
        if pending:
            index = pending.popleft()
            attempts[index] += 1
            worker["job"] = index
            worker["conn"].send((index, len(jobs), jobs[index]))
        else:
            worker["job"] = None
            worker["conn"].send(None)

    for slot in range(min(len(slots), len(jobs))):
        start(slot)
    while live:
        waitables = {}
        for slot, worker in live.items():
            waitables[worker["conn"]] = slot
            waitables[worker["proc"].sentinel] = slot
        for ready in multiprocessing.connection.wait(list(waitables)):
            slot = waitables[ready]
            if slot not in live:
                continue
            worker = live[slot]
            if ready is worker["conn"]:
                try:
                    kind, index, detail = worker["conn"].recv()
                except (EOFError, OSError):
                    continue  # the process died; its sentinel reports it
                if kind == "error":
                    for other in live.values():
                        other["proc"].kill()
                    raise BenchsuiteError(detail)
                if kind == "done":
                    (summary.written.append(Path(detail)) if detail else summary.skipped.append(jobs[index].label()))
                elif kind == "failed":
                    summary.failed.append(f"{jobs[index].label()}: {detail}")
                feed(slot)
                if worker["job"] is None:
                    worker["proc"].join()
                    del live[slot]
            elif not worker["proc"].is_alive():
                worker["proc"].join()
                code, index = worker["proc"].exitcode, worker["job"]
                del live[slot]
                if index is None and code == 0:
                    continue
                summary.deaths += 1
                if index is not None:
                    if attempts[index] < 2:
                        echo(f"benchsuite: worker {slot} died (exit code {code}) running {jobs[index].label()}; "
                             f"retrying it in a new worker")
                        pending.appendleft(index)
                    else:
                        summary.failed.append(f"{jobs[index].label()}: its worker died twice (exit code {code})")
                        _write_failure(results, jobs[index], f"worker died twice, last exit code {code}\n")
                if index is None:  # it died before taking a job: starting another would loop
                    summary.failed.append(f"worker {slot} died before taking a job (exit code {code}); "
                                          f"see its output above")
                elif pending:
                    start(slot)
    return summary


# ---- Slurm ---------------------------------------------------------------------------------------
class SlurmTask:
    """One array task: build the runner in the Slurm job, run one job. submitit calls `checkpoint`
    on the pre-emption/time-out signal: the job's last epoch boundary is saved and the same task is
    requeued (Slurm then restarts it and it resumes from that checkpoint)."""

    def __init__(self, factory: RunnerFactory) -> None:
        self.factory = factory

    def __call__(self, job: Job) -> str | None:
        import signal

        # submitit owns SIGUSR1 (pre-emption/time-out warning: checkpoint, requeue); SIGTERM (requeue,
        # cancel, pre-emption's kill) saves the last epoch boundary and stops the job
        runner = self.factory(preempt_signals=(signal.SIGTERM,))
        try:
            path = runner.run_job(job, prefix=job.label())
        except Exception:
            runner._log_failure(job)
            raise
        return str(path) if path is not None else None

    def checkpoint(self, job: Job):
        from submitit.helpers import DelayedSubmission

        from .checkpoint import save_active

        save_active()
        return DelayedSubmission(self, job)


@dataclass
class SlurmOptions:
    partition: str | None = None
    time: int = 60  # minutes per task
    gpus_per_job: int = 0
    cpus_per_job: int = 1
    mem: str | None = None  # Slurm syntax: 16G
    array_parallelism: int = 256
    extra: dict[str, str] | None = None  # more sbatch options: KEY=VALUE
    signal_delay_s: int = 120  # the pre-emption/time-out warning comes this long before the kill


def parse_extra(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BenchsuiteError(f"--slurm-extra expects KEY=VALUE (an sbatch option without dashes, e.g. "
                                  f"account=myproj or qos=high), got {pair!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


#: sbatch options that send the array to another cluster, whose partitions this cluster's sinfo does not list
_OTHER_CLUSTER = ("clusters", "cluster", "M")
#: the sbatch options a refused submission may be about
_SBATCH_OPTIONS = "--partition, --time, --gpus-per-job, --cpus-per-job, --mem and --slurm-extra"


def slurm_partitions(timeout: float = 10.0) -> list[str] | None:
    """The cluster's partitions, hidden ones too (`sinfo -a -h -o %P`, the default's '*' dropped);
    None when sinfo is absent or does not answer: then sbatch has the last word."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return None
    try:
        out = subprocess.run([sinfo, "-a", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    names = {line.strip().rstrip("*") for line in out.stdout.splitlines() if line.strip()}
    return sorted(names) if out.returncode == 0 and names else None


def check_partition(options: SlurmOptions) -> None:
    """Refuse a partition the cluster does not have before any cost: sbatch would refuse it only
    after the preflight, and submitit would surface that as a traceback."""
    if not options.partition or any(key in (options.extra or {}) for key in _OTHER_CLUSTER):
        return
    known = slurm_partitions()
    if known is None:
        return
    for name in (part.strip() for part in options.partition.split(",")):
        if name not in known:
            raise BenchsuiteError(f"--partition: {unknown('Slurm partition', name, known)}; `sinfo -s` lists "
                                  f"the partitions and their state")


def submission_refused(stderr: str, options: SlurmOptions) -> BenchsuiteError:
    """sbatch's refusal as one line: its own error text, the option it is about, how to look it up."""
    reason = "; ".join(line.strip() for line in stderr.splitlines() if line.strip()) or "no error text"
    if options.partition and "partition" in reason.lower():
        return BenchsuiteError(f"--partition {options.partition}: sbatch refused the job array: {reason}; "
                               f"`sinfo -s` lists the partitions you can submit to")
    return BenchsuiteError(f"sbatch refused the job array: {reason}; check {_SBATCH_OPTIONS} "
                           f"(`sinfo -s` lists the partitions)")


def _map_array(executor: Any, task: SlurmTask, jobs: list[Job], options: SlurmOptions) -> list[Any]:
    """executor.map_array, with a refused submission raised as one clear line. submitit echoes
    sbatch's stderr itself before raising: it is held back here and shown once, in that line (or
    passed on unchanged when the submission succeeds)."""
    from submitit.core.utils import FailedJobError

    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            submitted = executor.map_array(task, jobs)
    except FailedJobError as exc:
        raise submission_refused(str(exc) or held.getvalue(), options) from None
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    sys.stderr.write(held.getvalue())
    return submitted


def submit_slurm(factory: RunnerFactory, jobs: list[Job], options: SlurmOptions, folder: Path) -> list[Any]:
    """Submit `jobs` as one Slurm job array; returns the submitit jobs (their ids share the array id)."""
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = PREEMPT_SIGNAL  # read by submitit at import, in the jobs too
    try:
        import submitit
        from submitit.slurm.slurm import SlurmJobEnvironment
    except ImportError:
        raise BenchsuiteError("--executor slurm needs submitit: pip install submitit") from None
    SlurmJobEnvironment.USR_SIG = PREEMPT_SIGNAL  # sbatch --signal, even if submitit was imported before
    if submitit.SlurmExecutor.affinity() < 1:
        raise BenchsuiteError("--executor slurm: no Slurm here (sbatch/srun not found); use --executor local "
                              "or pool, or run on a Slurm login node")
    executor = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=3)
    params: dict[str, Any] = {"time": options.time, "cpus_per_task": options.cpus_per_job,
                              "array_parallelism": options.array_parallelism, "job_name": "benchsuite",
                              "signal_delay_s": options.signal_delay_s}
    if options.partition:
        params["partition"] = options.partition
    if options.gpus_per_job:
        params["gpus_per_node"] = options.gpus_per_job
    if options.mem:
        params["mem"] = options.mem
    if options.extra:
        params["additional_parameters"] = dict(options.extra)
    executor.update_parameters(**params)
    return _map_array(executor, SlurmTask(factory), jobs, options)


def wait_slurm(submitted: list[Any], echo=print) -> tuple[int, list[str]]:
    """Wait for every task with a progress bar; (finished, failures)."""
    import logging

    from submitit.helpers import as_completed
    from tqdm import tqdm

    # without accounting (slurmdbd) every poll warns that sacct failed; squeue still answers
    logging.getLogger("submitit").setLevel(logging.ERROR)
    failures = []
    with tqdm(total=len(submitted), desc="slurm array", unit="job") as bar:
        for job in as_completed(submitted, poll_frequency=2):
            try:
                job.result()
            except Exception as exc:  # the task's own failure, as submitit reports it
                failures.append(f"task {job.job_id}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
            bar.update(1)
    return len(submitted) - len(failures), failures
