"""Fast structural checks of image files, so a missing, empty or truncated image is reported before
training, naming the file and its split entry, instead of as a decoder traceback mid-run.

A full decode of every test image would cost about as much as a data-loading epoch; instead each
file is opened for its header (PIL reads a few KB) and, for JPEG and PNG, its end marker is looked
for in the last bytes (a truncated download lacks it). Only a file failing that quick test is fully
decoded, so a valid file with unusual trailing bytes is never refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from PIL import Image, UnidentifiedImageError

_TAIL = 4096
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"


def _ends_well(path: str, fmt: str | None) -> bool:
    if fmt not in ("JPEG", "PNG", "MPO"):
        return True
    with open(path, "rb") as handle:
        handle.seek(max(0, os.path.getsize(path) - _TAIL))
        tail = handle.read().rstrip(b"\x00\r\n ")
    return tail.endswith(_PNG_END if fmt == "PNG" else _JPEG_END)


def image_problem(path: str) -> str | None:
    """Why `path` cannot be used as an image (missing, empty, unreadable, truncated), or None."""
    try:
        if not os.path.isfile(path):
            return "is missing"
        if os.path.getsize(path) == 0:
            return "is empty (0 bytes)"
        with Image.open(path) as img:
            fmt = img.format
            if _ends_well(path, fmt):
                return None
            img.load()  # the quick test failed: decode fully before calling the file truncated
        return None
    except UnidentifiedImageError:
        return "is not an image format PIL can read"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot be decoded ({exc})"


def check_images(entries: Iterable[tuple[str, str, str]]) -> list[str]:
    """Problems of (dataset, split entry description, path) triples, one line each, each path once."""
    seen: set[str] = set()
    problems = []
    for dataset, entry, path in entries:
        if path in seen:
            continue
        seen.add(path)
        why = image_problem(path)
        if why is not None:
            problems.append(f"{dataset}: image {path} ({entry}) {why}; restore the file or remove its entry")
    return problems
