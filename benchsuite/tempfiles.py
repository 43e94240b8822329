"""Temporary files of atomic writes, named after their writer, and the removal of orphans.

Every atomic write (result files, few-shot manifests, shared trainings) first writes a hidden
temporary file beside its target and renames it. A writer killed in between leaves that file
behind forever. Its name records the host and the process id of the writer, so a later run can
remove exactly those whose writer is gone: same host, process no longer alive. Files of another
host (a shared filesystem) or of a live process are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path

_PATTERN = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]*\.tmp$")
#: written by benchsuite before temporary names carried the host: `<name>.tmp<pid>`
_LEGACY = re.compile(r"^.+\.tmp(?P<pid>\d+)$")
_LEGACY_MIN_AGE = 3600.0


def host_tag() -> str:
    """This host's name reduced to letters, digits and dashes (so that names parse back)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "host")[:40] or "host"


def temp_prefix(target: Path) -> str:
    """The prefix for `tempfile.mkstemp(prefix=..., suffix='.tmp')` beside `target`."""
    return f".{target.name}.{host_tag()}.{os.getpid()}."


def temp_path(target: Path, tag: str = "w") -> Path:
    """A temporary path beside `target`, recognisable as this process's."""
    return target.parent / f"{temp_prefix(target)}{tag}.tmp"


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists (even one of another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # unknown: keep the file
    return True


def is_orphan(path: Path, *, now: float | None = None) -> bool:
    """Whether `path` is a temporary file of a writer that is gone (on this host)."""
    match = _PATTERN.match(path.name)
    if match is not None:
        return match["host"] == host_tag() and not pid_alive(int(match["pid"]))
    legacy = _LEGACY.match(path.name)
    if legacy is None:
        return False
    try:  # no host recorded: also require an age no live write reaches
        age = (now or time.time()) - path.stat().st_mtime
    except OSError:
        return False
    return age > _LEGACY_MIN_AGE and not pid_alive(int(legacy["pid"]))


def sweep_orphans(root: Path) -> list[Path]:
    """Remove orphan temporary files anywhere under `root`; return those removed."""
    removed: list[Path] = []
    root = Path(root)
    if not root.is_dir():
        return removed
    now = time.time()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if ".tmp" not in name:
                continue
            path = Path(folder) / name
            if is_orphan(path, now=now):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed
