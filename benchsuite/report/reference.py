"""Published numbers as data: `leaderboard/reference/<method>.json`, schema-validated like results.

One file per method holds its published rows per protocol, backbone and shot count, each with its
source and the value keys the spec could not confirm (`unconfirmed`, shown with a mark). Values are
keyed like the leaderboard's cells: a training dataset (base2new: base/new/hm) or an evaluation
name (transfer: accuracy), plus `average` computed as the protocol aggregates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from ..errors import BenchsuiteError
from ..protocols import load_protocol
from ..results.schema import json_path

SCHEMA_FILE = "reference.schema.json"
HM_TOLERANCE = 0.015  # published HMs are rounded to 2 decimals from rounded Base and New


class ReferenceError(BenchsuiteError):
    """A reference file that is unreadable, off-schema or inconsistent with its protocol."""


@dataclass(frozen=True)
class Reference:
    """One published row: a method's numbers for one protocol, backbone and shot count."""

    method: str
    title: str
    family: str
    protocol: str
    model: str
    pretrained: str
    shots: int
    variant: str | None
    primary: bool
    seeds: str
    source: str
    values: dict[str, dict[str, float]]
    unconfirmed: frozenset[str] = frozenset()
    extra_knowledge: tuple[str, ...] = ()
    transductive: bool = False
    note: str = ""
    file: str = field(default="", compare=False)

    @property
    def label(self) -> str:
        return self.title + (f" ({self.variant})" if self.variant else "")


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    text = (resources.files("benchsuite.report") / SCHEMA_FILE).read_text(encoding="utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def problems(doc: Any) -> list[str]:
    """Schema violations, then consistency with the shipped protocols, as `<json path>: <problem>`."""
    errors = sorted(_validator().iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    out = [f"{json_path(e.absolute_path)}: {e.message[:300]}" for e in errors]
    if out:
        return out
    for i, entry in enumerate(doc["entries"]):
        where = f"$.entries[{i}]"
        try:
            p = load_protocol(entry["protocol"])
        except BenchsuiteError as exc:
            out.append(f"{where}.protocol: {exc}")
            continue
        keys = set(p.train_datasets if p.task != "transfer" else p.eval_names) | {"average"}
        for key, value in entry["values"].items():
            if key not in keys:
                out.append(f"{where}.values.{key}: not a dataset of {p.id} (expected one of {', '.join(sorted(keys))})")
            want = "base" if p.task == "base2new" else "accuracy"
            if want not in value:
                out.append(f"{where}.values.{key}: {p.id} values need {want!r}")
            elif p.task == "base2new":
                b, n, h = value["base"], value["new"], value["hm"]
                if abs((0.0 if b + n == 0 else 2 * b * n / (b + n)) - h) > HM_TOLERANCE:
                    out.append(f"{where}.values.{key}.hm: {h} is not HM({b}, {n})")
        for key in entry["unconfirmed"]:
            if key not in entry["values"]:
                out.append(f"{where}.unconfirmed: {key!r} has no value")
        if entry["shots"] not in p.shots:
            out.append(f"{where}.shots: {p.id} runs {p.shots} shots")
    return out


def _rows(doc: dict[str, Any], file: str) -> list[Reference]:
    decl = doc["declarations"]
    return [Reference(method=doc["method"], title=doc["title"], family=doc["family"], protocol=e["protocol"], model=e["backbone"]["model"],
                      pretrained=e["backbone"]["pretrained"], shots=e["shots"], variant=e["variant"],
                      primary=e["primary"], seeds=e["seeds"], source=e["source"],
                      values={k: dict(v) for k, v in e["values"].items()}, unconfirmed=frozenset(e["unconfirmed"]),
                      extra_knowledge=tuple(decl["extra_knowledge"]), transductive=decl["transductive"],
                      note=e.get("note", ""), file=file)
            for e in doc["entries"]]


def load_references(folder: Path | None) -> list[Reference]:
    """Every published row under `folder` (none when it is None or missing); a bad file raises one
    ReferenceError naming the file and its first problem."""
    if folder is None or not Path(folder).is_dir():
        return []
    rows: list[Reference] = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReferenceError(f"{path}: unreadable reference file ({exc}); fix or remove it") from None
        found = problems(doc)
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise ReferenceError(f"{path}: {found[0]}{more}; see benchsuite/report/{SCHEMA_FILE}")
        rows.extend(_rows(doc, path.name))
    return sorted(rows, key=lambda r: (r.protocol, r.model, r.pretrained, r.shots, r.method, not r.primary, r.variant or ""))


__all__ = ["Reference", "ReferenceError", "load_references", "problems"]
