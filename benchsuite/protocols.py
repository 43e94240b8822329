"""Frozen protocol definitions: loading, content hashing and version pinning.

A protocol is a JSON file in the `benchsuite_protocols` package (the repository's `protocols/`).
Its content hash is the sha256 of its canonical JSON. `protocols/pins.json` pins the hash of every
(id, version); a protocol whose content changes without a version bump no longer matches its pin,
and both the test suite and `load_protocol` refuse it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .errors import ProtocolError
from .suggest import unknown

PINS_FILE = "pins.json"
TASKS = ("base2new", "transfer", "few_shot")


@dataclass(frozen=True)
class Protocol:
    """A loaded protocol; `spec` is the JSON content, `hash` its canonical sha256."""

    id: str
    version: int
    hash: str
    spec: dict[str, Any]

    @property
    def task(self) -> str:
        return self.spec["task"]

    @property
    def seeds(self) -> list[int]:
        return list(self.spec["seeds"])

    @property
    def shots(self) -> list[int]:
        return list(self.spec["shots"])

    @property
    def train_datasets(self) -> list[str]:
        """Datasets a job trains on: each dataset, or the single transfer source."""
        if self.task == "transfer":
            return [self.spec["source"]]
        return list(self.spec["datasets"])

    @property
    def eval_names(self) -> list[str]:
        """Metric keys a complete result of this protocol carries (before per-dataset expansion)."""
        if self.task == "base2new":
            return list(self.spec["evals"])
        if self.task == "transfer":
            return [self.spec["source"], *self.spec["targets"]]
        return ["test"]

    @property
    def profile(self) -> dict[str, Any]:
        """Recipe scaling applied identically to every method (empty for the real protocols)."""
        return dict(self.spec.get("profile", {}))

    def ref(self) -> dict[str, Any]:
        """What every result records about its protocol."""
        return {"id": self.id, "version": self.version, "hash": self.hash}


def content_hash(spec: dict[str, Any]) -> str:
    """sha256 of the canonical JSON form (sorted keys, no whitespace)."""
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _files():
    return resources.files("benchsuite_protocols")


def load_pins() -> dict[str, dict[str, str]]:
    return json.loads((_files() / PINS_FILE).read_text(encoding="utf-8"))


def protocol_ids() -> list[str]:
    names = [p.name for p in _files().iterdir() if p.name.endswith(".json") and p.name != PINS_FILE]
    return sorted(n[: -len(".json")] for n in names)


def _check_spec(pid: str, spec: dict[str, Any]) -> None:
    required = {"id", "version", "task", "shots", "seeds", "model_selection", "metric", "eval_batch_size"}
    missing = sorted(required - set(spec))
    if missing:
        raise ProtocolError(f"protocol {pid!r} lacks the keys {missing}")
    if spec["id"] != pid:
        raise ProtocolError(f"protocol file {pid}.json declares id {spec['id']!r}; the id must equal the file name")
    if spec["task"] not in TASKS:
        raise ProtocolError(f"protocol {pid!r} has task {spec['task']!r}; expected one of {TASKS}")
    if spec["task"] == "transfer" and not {"source", "targets"} <= set(spec):
        raise ProtocolError(f"transfer protocol {pid!r} needs 'source' and 'targets'")
    if spec["task"] != "transfer" and "datasets" not in spec:
        raise ProtocolError(f"protocol {pid!r} needs 'datasets'")


def load_protocol(pid: str, *, verify_pin: bool = True) -> Protocol:
    """Load a shipped protocol by id; refuse one whose content does not match its pinned hash."""
    if pid not in protocol_ids():
        raise ProtocolError(unknown("protocol", pid, protocol_ids()) + " (`benchsuite list protocols`)")
    spec = json.loads((_files() / f"{pid}.json").read_text(encoding="utf-8"))
    _check_spec(pid, spec)
    digest = content_hash(spec)
    if verify_pin:
        pinned = load_pins().get(pid, {}).get(str(spec["version"]))
        if pinned != digest:
            raise ProtocolError(
                f"protocol {pid!r} version {spec['version']} has hash {digest[:12]}, but pins.json pins "
                f"{(pinned or 'nothing')[:12]}: a frozen protocol was edited. Restore it, or bump its "
                f"version and pin the new hash (`benchsuite list protocols --hashes`)."
            )
    return Protocol(id=pid, version=int(spec["version"]), hash=digest, spec=spec)


def all_protocols(*, verify_pin: bool = True) -> list[Protocol]:
    return [load_protocol(pid, verify_pin=verify_pin) for pid in protocol_ids()]


def pin_matches(protocol: Protocol) -> bool:
    """Whether pins.json pins this protocol's (id, version) to its current content hash."""
    return load_pins().get(protocol.id, {}).get(str(protocol.version)) == protocol.hash
