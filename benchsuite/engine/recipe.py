"""Resolve a job's recipe: harness defaults < method default < protocol profile < user overrides."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from ..errors import BenchsuiteError

HARNESS_DEFAULTS: dict[str, Any] = {
    "epochs": 0,
    "batch_size": 32,
    "lr": 0.002,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "model_selection": "last_epoch",
}


Overrides = dict[str | None, dict[str, Any]]


def parse_overrides(pairs: list[str]) -> Overrides:
    """`key=value` (every trained method) or `method.key=value` (that method) pairs from `--set`.

    Values are parsed as JSON when they can be (numbers, booleans), else kept as strings.
    """
    out: Overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise BenchsuiteError(f"--set expects key=value or method.key=value, got {pair!r}")
        key, raw = (part.strip() for part in pair.split("=", 1))
        method, _, name = key.rpartition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(method or None, {})[name] = value
    return out


def apply_profile(recipe: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """A protocol profile scales every method's recipe identically (toy protocols)."""
    out = dict(recipe)
    if "epochs_scale" in profile and out["epochs"] > 0:
        out["epochs"] = max(int(profile.get("min_epochs", 1)), math.ceil(out["epochs"] * profile["epochs_scale"]))
    if "max_batch_size" in profile and out["epochs"] > 0:
        out["batch_size"] = min(out["batch_size"], int(profile["max_batch_size"]))
    return out


def resolve_recipe(method: str, method_recipe: dict[str, Any] | None, profile: dict[str, Any],
                   overrides: Overrides) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's recipe, and the entries a user override changed. Unqualified overrides skip methods
    that learn nothing (zero-shot), so `--set epochs=5` shortens every trained method only."""
    recipe = apply_profile({**HARNESS_DEFAULTS, **(method_recipe or {})}, profile)
    changes = dict(overrides.get(None, {})) if recipe["epochs"] > 0 else {}
    changes.update(overrides.get(method, {}))
    changed = {k: v for k, v in changes.items() if recipe.get(k, object()) != v}
    return {**recipe, **changes}, changed


def config_hash(method: str, recipe: dict[str, Any]) -> str:
    blob = json.dumps({"method": method, "recipe": recipe}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
