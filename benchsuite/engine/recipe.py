"""Resolve a job's recipe: harness defaults < method default < protocol profile < user overrides."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from ..errors import BenchsuiteError
from ..suggest import did_you_mean

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

#: CoOp's few-shot schedule (methods.md 4.2): epochs by shots per class; ProGrad and ProDA train for it too.
COOP_FEW_SHOT_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}


def coop_few_shot_epochs(dataset: str, shots: int) -> int:
    """Epochs of CoOp's few-shot configs: ``vit_b16_ep50`` on ImageNet at every shot count, else by shots."""
    return 50 if dataset == "imagenet" else COOP_FEW_SHOT_EPOCHS.get(shots, 200)


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
        if not name or (_ and not method):
            raise BenchsuiteError(f"--set {pair}: expected key=value or method.key=value with a non-empty key")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(method or None, {})[name] = value
    return out


#: Harness keys whose values have a meaningful range: (lowest allowed, is the lowest itself allowed, highest or None).
_RANGES: dict[str, tuple[float, bool, float | None]] = {
    "epochs": (0, True, None), "batch_size": (1, True, None), "lr": (0, False, None), "momentum": (0, True, 1),
    "weight_decay": (0, True, None), "warmup_epochs": (0, True, None), "warmup_lr": (0, True, None),
}


def _shown(method: str | None, key: str, value: Any, flag: str = "--set") -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return f"{flag} {method + '.' if method else ''}{key}={text}"


def check_value(method: str | None, key: str, value: Any, default: Any, flag: str = "--set") -> Any:
    """`value` typed like the recipe's `default` (and within range for harness keys), or one clear error.

    Why: an ill-typed override (`epochs=abc`, `lr=nan`) otherwise fails deep inside training with a
    traceback, or worse, trains with a nonsensical value and records it as a valid result.
    """
    shown = _shown(method, key, value, flag)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise BenchsuiteError(f"{shown}: {key!r} takes true or false (default {json.dumps(default)})")
        return value
    if isinstance(default, (int, float)):
        wants_int = isinstance(default, int)
        ok = isinstance(value, int) if wants_int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not math.isfinite(value):
            kind = "an integer" if wants_int else "a finite number"
            raise BenchsuiteError(f"{shown}: {key!r} takes {kind} (default {default!r})")
        value = value if wants_int else float(value)
        if key in _RANGES:
            low, inclusive, high = _RANGES[key]
            if value < low or (value == low and not inclusive) or (high is not None and value >= high):
                bound = f"{'>=' if inclusive else '>'} {low}" + (f" and < {high}" if high is not None else "")
                raise BenchsuiteError(f"{shown}: {key!r} must be {bound} (default {default!r})")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        return json.dumps(value)  # `ctx_init=5`: a string setting keeps the text typed
    return value


def validate_overrides(overrides: Overrides, recipes: dict[str, list[dict[str, Any]]],
                       flag: str = "--set") -> Overrides:
    """Check `--set` entries against the resolved recipes of the methods in this run, before any cost.

    `recipes` maps each method of the run to the resolved recipes of its jobs. A qualified key
    (`coop.n_ctx`) must exist in that method's recipe; an unqualified key applies to every method
    that trains and must exist in each of their recipes (in a run where no method trains, it changes
    nothing but is still checked against every recipe). Values are typed like the default.
    Returns the overrides with values converted (an int given for a float setting becomes a float).
    `flag` names the option the entries came from in the errors (`bench --compare` takes them too).
    """
    out: Overrides = {}
    for method, entries in overrides.items():
        if method is None:  # checked against the methods it applies to (those that train), else all
            trained = sorted(m for m, rs in recipes.items() if any(trains(r) for r in rs))
            targets = trained or sorted(recipes)
        elif method not in recipes:
            raise BenchsuiteError(f"{flag} {method}.{next(iter(entries))}: method {method!r} is not part of this run"
                                  f"{did_you_mean(method, recipes)}; methods in this run: {', '.join(sorted(recipes))}")
        else:
            targets = [method]
        for key, value in entries.items():
            converted = value
            for target in targets:
                keys = sorted({k for r in recipes[target] for k in r})
                if key not in keys:
                    hint = did_you_mean(key, keys)
                    qualify = "" if method else "; an unqualified key applies to every trained method: qualify it " \
                                                "as METHOD.KEY=VALUE to set it for one method only"
                    raise BenchsuiteError(f"{_shown(method, key, value, flag)}: method {target!r} has no recipe key "
                                          f"{key!r}{hint}; its keys: {', '.join(keys)}{qualify}")
                default = next(r[key] for r in recipes[target] if key in r)
                converted = check_value(method, key, value, default, flag)
            out.setdefault(method, {})[key] = converted
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
    if out.get("iterations") and "epochs_scale" in profile:  # a toy profile shortens an iteration budget alike
        out["iterations"] = max(1, math.ceil(out["iterations"] * float(profile["epochs_scale"])))
    if "max_batch_size" in profile and trains(out):
        out["batch_size"] = min(out["batch_size"], int(profile["max_batch_size"]))
    return out


def trains(recipe: dict[str, Any]) -> bool:
    """Whether a resolved recipe trains: a budget of epochs, or of iterations (contract v3)."""
    return recipe.get("epochs", 0) > 0 or (recipe.get("iterations", 0) or 0) > 0


def check_recipe(method: str, recipe: dict[str, Any], image_inputs: tuple[str, ...]) -> None:
    """Refuse harness settings that cannot run, with one line naming the key and the fix."""
    iterations = recipe.get("iterations", 0)
    if iterations:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise BenchsuiteError(f"method {method!r}: iterations={iterations!r} must be a whole number of "
                                  f"optimizer steps (--set {method}.iterations=...)")
        if recipe["epochs"]:
            raise BenchsuiteError(f"method {method!r}: both epochs={recipe['epochs']} and iterations={iterations} "
                                  f"are set; a recipe has one budget (--set {method}.epochs=0 to train for the "
                                  f"iterations)")
        if recipe["warmup_epochs"]:
            raise BenchsuiteError(f"method {method!r}: an iteration budget has no warm-up (a per-iteration cosine), "
                                  f"but warmup_epochs={recipe['warmup_epochs']}; set warmup_epochs to 0")
    epochs, warmup = recipe["epochs"], recipe["warmup_epochs"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (epochs, warmup))
    if numbers and epochs > 0 and warmup >= epochs:
        raise BenchsuiteError(f"method {method!r}: warmup_epochs={warmup} is not shorter than epochs={epochs}, so the "
                              f"whole training would run at warmup_lr; set warmup_epochs below {epochs} "
                              f"(--set {method}.warmup_epochs=...) or train longer")
    if recipe["image_input"] not in image_inputs:
        raise BenchsuiteError(f"method {method!r}: image_input={recipe['image_input']!r} is not one of "
                              f"{', '.join(image_inputs)}")
    schedule = recipe.get("lr_schedule", "dassl")
    if schedule not in ("dassl", "cosine_per_iteration"):
        raise BenchsuiteError(f"method {method!r}: lr_schedule={schedule!r} is not one of dassl, cosine_per_iteration")
    if schedule == "cosine_per_iteration" and recipe["warmup_epochs"]:
        raise BenchsuiteError(f"method {method!r}: lr_schedule=cosine_per_iteration has no warm-up, but "
                              f"warmup_epochs={recipe['warmup_epochs']}; set warmup_epochs to 0")
    optimizer = recipe.get("optimizer", "sgd")
    if optimizer not in ("sgd", "adam", "adamw"):
        raise BenchsuiteError(f"method {method!r}: optimizer={optimizer!r} is not one of sgd, adam, adamw "
                              f"(--set {method}.optimizer=...)")
    eps = recipe.get("eps", 1e-8)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise BenchsuiteError(f"method {method!r}: eps={eps!r} must be a positive number (--set {method}.eps=...)")
    if not isinstance(recipe["drop_last"], bool):
        raise BenchsuiteError(f"method {method!r}: drop_last must be true or false, got {recipe['drop_last']!r}")


def declarations(method_cls: type) -> dict[str, Any]:
    """What a method class declares that shapes its resolved recipe (keyword arguments of
    `resolve_recipe`): every caller resolving a method's recipe passes these, so `run`, `bench`,
    the preflight and `validate` agree on the default recipe."""
    return {"epoch_settings": tuple(getattr(method_cls, "epoch_settings", ())),
            "image_input": getattr(method_cls, "image_input", "features")}


def resolve_recipe(method: str, method_recipe: dict[str, Any] | None, profile: dict[str, Any],
                   overrides: Overrides, *, epoch_settings: tuple[str, ...] = (),
                   image_input: str = "features") -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's recipe, and the entries a user override changed. Unqualified overrides skip methods
    that learn nothing (zero-shot), so `--set epochs=5` shortens every trained method only.
    `epoch_settings` and `image_input` come from the method's class (`Method`)."""
    from ..hookspecs import IMAGE_INPUTS

    base = {**HARNESS_DEFAULTS, "image_input": image_input, **(method_recipe or {})}
    recipe = apply_profile(base, profile, epoch_settings)
    changes = dict(overrides.get(None, {})) if trains(recipe) else {}
    if changes.get("epochs") and recipe.get("iterations") and "iterations" not in changes:
        changes["iterations"] = 0  # `--set epochs=N` for every method: an iteration budget becomes N epochs
    changes.update(overrides.get(method, {}))
    changed = {k: v for k, v in changes.items() if recipe.get(k, object()) != v}
    resolved = {**recipe, **changes}
    check_recipe(method, resolved, IMAGE_INPUTS)
    return resolved, changed


def config_hash(method: str, recipe: dict[str, Any]) -> str:
    blob = json.dumps({"method": method, "recipe": recipe}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
