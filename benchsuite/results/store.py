"""One JSON file per job, written atomically, with a per-job claim lock.

Jobs never share files, so any executor (threads, processes, a Slurm array) can write into one
root at once. A result file is either absent or complete: it is written to a temporary file in
the same directory, fsynced and renamed over the target, so a crash or kill mid-write leaves the
previous state (at worst a hidden `*.tmp` file that readers ignore), never a truncated result.
The temporary file's name records the writer's host and pid, so a later run removes it once that
writer is gone (`benchsuite.tempfiles.sweep_orphans`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import filelock

from ..errors import ResultError, writing
from ..tempfiles import temp_prefix
from .schema import validate_schema

LOCK_DIR = ".locks"
#: Limits for reading a result file (README: "Result files"): far above any real result.
MAX_RESULT_BYTES = 4 * 1024**2
MAX_RESULT_DEPTH = 32
ErrorHandler = Callable[[Path, str], None]


def _component(value: str, what: str) -> str:
    """A path component taken from a result; refuse anything that could escape the store root."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ResultError(f"{what} {value!r} cannot be used as a file or folder name in the result store")
    return value


def _warn(path: Path, message: str) -> None:
    warnings.warn(f"result file {path}: {message}", RuntimeWarning, stacklevel=3)


def dump_json(data: Any) -> str:
    """The canonical on-disk form: stable key order, so re-writes of equal results are equal; strict
    JSON (NaN and Infinity are not JSON: a ValueError names the problem instead of a file other
    tools cannot read)."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def atomic_write_text(target: Path, text: str) -> None:
    """Write `text` to `target` via temp file + fsync + os.replace; no partial file ever exists.

    A refusal of the file system (full disk, quota, read-only, permissions) is raised as a
    WriteError naming `target`, after the temporary file is removed."""
    with writing(target):
        _write_replace(target, text)
    _fsync_dir(target.parent)


def _write_replace(target: Path, text: str) -> None:
    """The write itself; any exception (a kill too) removes the temporary file first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target), suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible on Windows, where it is skipped."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (a hostile file must not exhaust the stack)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_RESULT_DEPTH:
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


class _NonFinite(ValueError):
    """NaN, Infinity or -Infinity in a file: Python's json accepts them, strict JSON does not."""


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(data, None) for a file holding a JSON object, else (None, why it cannot be used).

    Files above MAX_RESULT_BYTES or nested deeper than MAX_RESULT_DEPTH are refused unread: a
    result is a few kilobytes and a handful of levels deep, and such files would exhaust memory or
    the parser's and validator's recursion."""
    try:
        size = path.stat().st_size
        if size > MAX_RESULT_BYTES:
            return None, f"is {size} bytes, above the {MAX_RESULT_BYTES}-byte limit for result files"
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot be read: {exc}"
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except _NonFinite as exc:
        return None, f"holds {exc.args[0]}, which is not JSON (strict JSON has no NaN or Infinity)"
    except json.JSONDecodeError as exc:
        return None, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})"
    except RecursionError:
        return None, f"is nested too deeply to parse (limit {MAX_RESULT_DEPTH} levels)"
    if not isinstance(data, dict):
        return None, f"holds a JSON {type(data).__name__}, not an object"
    if _depth(data) > MAX_RESULT_DEPTH:
        return None, f"is nested deeper than {MAX_RESULT_DEPTH} levels, the limit for result files"
    return data, None


class ResultStore:
    """Result files under `root/<protocol>/<method>/<dataset>/<job id prefix>.json`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path_for(self, protocol_id: str, method: str, dataset: str, job_id: str) -> Path:
        return (
            self.root
            / _component(protocol_id, "protocol id")
            / _component(method, "method name")
            / _component(dataset, "dataset name")
            / f"{_component(job_id, 'job id')[:16]}.json"
        )

    def path_of(self, result: dict[str, Any]) -> Path:
        job = result["job"]
        return self.path_for(job["protocol"]["id"], job["method"], job["dataset"], job["id"])

    def existing(self, path: Path, job_id: str) -> dict[str, Any] | None:
        """The complete, schema-valid result of `job_id` at `path`, or None (re-run the job).

        Anything else there (truncated, corrupt, invalid, another job) is warned about, naming the
        file, and treated as missing so that the job runs again and replaces it atomically.
        """
        path = Path(path)
        if not path.exists():
            return None
        data, why = read_json(path)
        if data is None:
            _warn(path, f"{why}; treating the job as not done")
            return None
        problems = validate_schema(data)
        if problems:
            _warn(path, "fails the result schema (" + "; ".join(problems[:5]) + "); treating the job as not done")
            return None
        if data["job"]["id"] != job_id:
            _warn(path, f"holds job {data['job']['id']}, not {job_id}; treating the job as not done")
            return None
        return data

    def lock_path(self, job_id: str) -> Path:
        return self.root / LOCK_DIR / f"{_component(job_id, 'job id')}.lock"

    def claim_info_path(self, job_id: str) -> Path:
        return self.lock_path(job_id).with_suffix(".json")

    @contextlib.contextmanager
    def claim(self, job_id: str, info: dict[str, Any] | None = None) -> Iterator[bool]:
        """Yield True while this process holds the job's lock, False if another process runs it.

        Non-blocking (timeout 0): a worker that cannot claim a job skips it instead of waiting.
        `info` (what the job is, who runs it) is written beside the lock while it is held, so that
        `benchsuite status` can name running jobs; a lock nobody holds is stale, whatever it says.
        """
        lock_file = self.lock_path(job_id)
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(lock_file), timeout=0)
        try:
            lock.acquire()
            held = True
        except filelock.Timeout:
            held = False
        if not held:
            yield False
            return
        info_path = self.claim_info_path(job_id)
        try:  # a claim file that cannot be written (a full disk) must not keep the lock held
            if info is not None:
                atomic_write_text(info_path, dump_json({**info, "host": socket.gethostname(), "pid": os.getpid()}))
            yield True
        finally:
            if info is not None:
                with contextlib.suppress(OSError):
                    info_path.unlink()
            lock.release()

    def write(self, result: dict[str, Any]) -> Path:
        """Validate against the schema, then write atomically; returns the file written."""
        problems = validate_schema(result)
        if problems:
            raise ResultError("refusing to write a result that fails the schema:\n  " + "\n  ".join(problems))
        target = self.path_of(result)
        atomic_write_text(target, dump_json(result))
        return target

    def iter_results(self, on_error: ErrorHandler | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Every `*.json` object under root in sorted path order, skipping the lock folder.

        Unreadable files are passed to `on_error(path, reason)` (default: a warning), never raised,
        so one bad submission cannot hide all the others.
        """
        report = on_error or (lambda path, why: _warn(path, why))
        if not self.root.is_dir():
            return
        for path in sorted(self.root.rglob("*.json")):
            relative = path.relative_to(self.root)
            # lock, manifest and shared-training folders start with "." or "_": they hold no results
            if any(part.startswith((".", "_")) for part in relative.parts[:-1]) or not path.is_file():
                continue
            data, why = read_json(path)
            if data is None:
                report(path, str(why))
                continue
            yield path, data


__all__ = ["LOCK_DIR", "MAX_RESULT_BYTES", "MAX_RESULT_DEPTH", "ResultStore", "atomic_write_text", "dump_json", "read_json"]
