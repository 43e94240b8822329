"""User-facing errors. Each message names the bad input and says how to fix it."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class BenchsuiteError(Exception):
    """Base class: the CLI prints these as one clean message, without a traceback."""


class DatasetError(BenchsuiteError):
    """A dataset folder is missing or does not follow the expected layout."""


class ProtocolError(BenchsuiteError):
    """A protocol file is unknown, malformed or changed without a version bump."""


class ContractError(BenchsuiteError):
    """A method plugin breaks the plugin contract (names the plugin and the hook)."""


class BackboneError(BenchsuiteError):
    """A backbone name, pretrained tag or checkpoint file cannot be loaded."""


class ResultError(BenchsuiteError):
    """A result file fails the JSON Schema or disagrees with its protocol."""


#: what to do when the file system refuses a file, by errno (a full disk is the user's to fix, not a bug)
_REFUSAL_ADVICE = {
    errno.ENOSPC: "the disk is full: free space on it, or write elsewhere",
    errno.EDQUOT: "your disk quota is used up: free space within it, or write elsewhere",
    errno.EROFS: "that file system is read-only: write elsewhere",
    errno.EACCES: "permission denied: fix the permissions, or use another place",
    errno.EPERM: "permission denied: fix the permissions, or use another place",
}
#: the options that choose where benchsuite writes, named when no command narrowed it down
WRITE_ELSEWHERE = "--results DIR for run, --out FILE for leaderboard"
#: the errnos of a file system refusing a file: reported as one line, never a traceback
REFUSAL_ERRNOS = frozenset(_REFUSAL_ADVICE)


def errno_name(code: int | None) -> str:
    """'ENOSPC' for 28: the name users search for."""
    return errno.errorcode.get(code, str(code)) if code is not None else "no errno"


def refusal_advice(code: int | None, elsewhere: str = WRITE_ELSEWHERE) -> str:
    """What to do when the file system refused a file with errno `code`, naming the options that
    choose another place."""
    return f"{_REFUSAL_ADVICE.get(code, 'check that folder, or write elsewhere')} ({elsewhere})"


class WriteError(BenchsuiteError, OSError):
    """A file could not be written (full disk, quota, read-only or forbidden folder), naming it.

    Also an OSError, so code that tolerates a failed write (failure logs, the feature cache) still
    catches it; built like an OSError (errno, strerror, filename) so that it pickles to pool workers
    and Slurm tasks. `elsewhere` names the options that pick another place; the CLI narrows it.
    """

    elsewhere = WRITE_ELSEWHERE

    def __str__(self) -> str:
        return (f"cannot write {self.filename}: {self.strerror} ({errno_name(self.errno)}); "
                f"{refusal_advice(self.errno, self.elsewhere)}")


@contextlib.contextmanager
def writing(target: os.PathLike | str) -> Iterator[None]:
    """Within it, a refusal of the file system becomes a WriteError naming `target` (not the
    temporary file the write went through); an OSError without errno is no such refusal and passes."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        if exc.errno is None:
            raise
        raise WriteError(exc.errno, exc.strerror or str(exc), os.fspath(target)) from exc


class Preempted(BaseException):
    """A job was asked to stop (a pre-emption signal) after saving its epoch checkpoint. A
    BaseException, like KeyboardInterrupt, so per-job failure handling never records it as a failure."""
