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
    "drop_last": False,
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


#: Harness keys measured in epochs, scaled by a profile like a method's `epoch_settings`.
HARNESS_EPOCH_SETTINGS = ("warmup_epochs",)


def profile_epoch_scale(epochs: int, profile: dict[str, Any]) -> float:
    """Scaled epochs / recipe epochs under a profile (1.0 without `epochs_scale` or training)."""
    if "epochs_scale" not in profile or epochs <= 0:
        return 1.0
    scaled = max(int(profile.get("min_epochs", 1)), math.ceil(epochs * profile["epochs_scale"]))
    return scaled / epochs


def _scale_setting(value: Any, scale: float) -> Any:
    """One rule for every epoch-indexed setting: ints rounded up (a positive setting stays >= 1),
    floats multiplied exactly; booleans and non-numbers are left alone."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, int):
        return math.ceil(value * scale - 1e-9)
    return value * scale


def apply_profile(recipe: dict[str, Any], profile: dict[str, Any],
                  epoch_settings: tuple[str, ...] = ()) -> dict[str, Any]:
    """A protocol profile scales every method's recipe identically (toy protocols): `epochs` to
    max(min_epochs, ceil(epochs * epochs_scale)), and every setting measured in epochs
    (`warmup_epochs`, the method's `epoch_settings`) by the same factor, scaled / original epochs."""
    out = dict(recipe)
    scale = profile_epoch_scale(int(out["epochs"]), profile)
    if scale != 1.0:
        out["epochs"] = round(out["epochs"] * scale)
        for key in (*HARNESS_EPOCH_SETTINGS, *epoch_settings):
            if key in out:
                out[key] = _scale_setting(out[key], scale)
    if "max_batch_size" in profile and out["epochs"] > 0:
        out["batch_size"] = min(out["batch_size"], int(profile["max_batch_size"]))
    return out


def check_recipe(method: str, recipe: dict[str, Any], image_inputs: tuple[str, ...]) -> None:
    """Refuse harness settings that cannot run, with one line naming the key and the fix."""
    epochs, warmup = recipe["epochs"], recipe["warmup_epochs"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (epochs, warmup))
    if numbers and epochs > 0 and warmup >= epochs:
        raise BenchsuiteError(f"method {method!r}: warmup_epochs={warmup} is not shorter than epochs={epochs}, so the "
                              f"whole training would run at warmup_lr; set warmup_epochs below {epochs} "
                              f"(--set {method}.warmup_epochs=...) or train longer")
    if recipe["image_input"] not in image_inputs:
        raise BenchsuiteError(f"method {method!r}: image_input={recipe['image_input']!r} is not one of "
                              f"{', '.join(image_inputs)}")
    if not isinstance(recipe["drop_last"], bool):
        raise BenchsuiteError(f"method {method!r}: drop_last must be true or false, got {recipe['drop_last']!r}")


def resolve_recipe(method: str, method_recipe: dict[str, Any] | None, profile: dict[str, Any],
                   overrides: Overrides, *, epoch_settings: tuple[str, ...] = (),
                   image_input: str = "features") -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's recipe, and the entries a user override changed. Unqualified overrides skip methods
    that learn nothing (zero-shot), so `--set epochs=5` shortens every trained method only.
    `epoch_settings` and `image_input` come from the method's class (`Method`)."""
    from ..hookspecs import IMAGE_INPUTS

    base = {**HARNESS_DEFAULTS, "image_input": image_input, **(method_recipe or {})}
    recipe = apply_profile(base, profile, epoch_settings)
    changes = dict(overrides.get(None, {})) if recipe["epochs"] > 0 else {}
    changes.update(overrides.get(method, {}))
    changed = {k: v for k, v in changes.items() if recipe.get(k, object()) != v}
    resolved = {**recipe, **changes}
    check_recipe(method, resolved, IMAGE_INPUTS)
    return resolved, changed


def config_hash(method: str, recipe: dict[str, Any]) -> str:
    blob = json.dumps({"method": method, "recipe": recipe}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
