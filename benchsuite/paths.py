"""Where benchsuite keeps what it can rebuild: the toy world, the test-set feature cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$BENCHSUITE_CACHE`, or ~/.cache/benchsuite when it is unset or empty."""
    return Path(os.path.expanduser(os.environ.get("BENCHSUITE_CACHE") or "~/.cache/benchsuite")).absolute()
