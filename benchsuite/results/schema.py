"""The shipped result JSON Schema and precise, path-named validation messages.

Messages name the JSON path of the offending value so a submitter can fix a result file without
reading the schema; they are sorted by path so output is stable across runs.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

SCHEMA_FILE = "result.schema.json"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_MESSAGE = 300


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The result schema shipped inside the package (works from a wheel, not only a checkout)."""
    text = (resources.files("benchsuite.results") / SCHEMA_FILE).read_text(encoding="utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return schema


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    return Draft202012Validator(load_schema())


def json_path(parts: Iterable[Any]) -> str:
    """JSONPath-style location: `$.job.protocol.hash`, `$.metrics["odd key"]`, `$.items[0]`."""
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(str(part)):
            out += f".{part}"
        else:
            out += f"[{json.dumps(str(part))}]"
    return out


def _message(error: ValidationError) -> str:
    text = error.message
    if len(text) > _MAX_MESSAGE:  # jsonschema quotes whole instances; keep messages readable
        text = text[: _MAX_MESSAGE - 1] + "…"
    return f"{json_path(error.absolute_path)}: {text}"


def non_finite(data: Any) -> list[str]:
    """`<json path>: ...` for every NaN or infinite number in `data` (iteratively: no recursion
    limit). JSON has no such numbers, and a NaN accuracy would be ranked, not refused."""
    found, stack = [], [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{json_path(path)}: {value} is not a finite number (strict JSON has no NaN or Infinity)")
        elif isinstance(value, dict):
            stack.extend(((*path, k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in enumerate(value))
    return sorted(found)


def validate_schema(result: Any) -> list[str]:
    """All schema violations of `result` as `<json path>: <problem>` messages, sorted by path,
    then every non-finite number."""
    errors = list(_validator().iter_errors(result))
    errors.sort(key=lambda e: ([str(p) for p in e.absolute_path], e.message))
    return [_message(e) for e in errors] + non_finite(result)


__all__ = ["SCHEMA_FILE", "json_path", "load_schema", "non_finite", "validate_schema"]
