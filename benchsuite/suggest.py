""""Did you mean" hints for names typed on the command line (protocols, methods, datasets, recipe keys)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, or '' when none is close enough."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(what: str, name: str, known: Iterable[str]) -> str:
    """One line: the unknown name, the closest known one, and every known name."""
    known = sorted(str(k) for k in known)
    return f"unknown {what} {name!r}{did_you_mean(name, known)}; known: {', '.join(known) or 'none'}"
