"""Build schema-valid result dicts consistent with the shipped protocols (test helper, not tests).

`make_result(pid, method, dataset, seed, metrics={"base": 80.0, "new": 60.0})` gives a result whose
protocol reference, metric keys, evals and fingerprints agree with the frozen protocol, so a test
changes exactly the one thing it is about via keyword overrides. Nested fields are overridden with
double underscores: `job__protocol__hash="0" * 64`, `method__default_recipe=False`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Mapping


def _ensure_protocols_package() -> None:
    """Run from a plain checkout (PYTHONPATH=repo, not installed): map protocols/ to its wheel name."""
    try:
        import benchsuite_protocols  # noqa: F401
    except ImportError:
        folder = Path(__file__).resolve().parents[1] / "protocols"
        spec = importlib.util.spec_from_file_location(
            "benchsuite_protocols", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchsuite_protocols"] = module
        spec.loader.exec_module(module)


_ensure_protocols_package()

from benchsuite.engine.recipe import config_hash, declarations, resolve_recipe  # noqa: E402
from benchsuite.methods import discover, job_manager  # noqa: E402
from benchsuite.protocols import load_protocol  # noqa: E402

_DELETE = object()
DELETE = _DELETE  # pass as an override value to remove a field


def sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def metric(accuracy: float, total: int = 10_000) -> dict[str, Any]:
    """Counts that reproduce `accuracy` exactly (to 1/total), with accuracy = 100*correct/total."""
    correct = round(accuracy * total / 100.0)
    return {"accuracy": 100.0 * correct / total, "correct": correct, "total": total}


def eval_fingerprint(protocol_id: str, dataset: str, name: str) -> str:
    return sha("eval", protocol_id, dataset, name)


def train_fingerprint(protocol_id: str, dataset: str, shots: int, seed: int) -> str:
    return sha("train", protocol_id, dataset, shots, seed)


def job_id(result: Mapping[str, Any]) -> str:
    """sha256 of the fields that identify a job (what the engine is expected to hash)."""
    job, b = result["job"], result["backbone"]
    return sha(job["protocol"], job["method"], job["dataset"], job["shots"], job["seed"],
               result["method"]["config_hash"], b["model"], b["pretrained"], b["precision"])


def default_recipe(protocol_id: str, method: str, dataset: str, shots: int) -> dict[str, Any]:
    """The installed method's resolved default recipe (as `validate` checks it), else a stand-in."""
    entry = discover().get(method)
    if entry is None:
        return {"epochs": 5, "lr": 0.002}
    p = load_protocol(protocol_id)
    pm, _ = job_manager(entry)
    return json.loads(json.dumps(resolve_recipe(method, pm.hook.recipe(protocol=p, dataset=dataset, shots=shots),
                                                p.profile, {}, **declarations(entry.cls))[0], default=str))


def _set(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split("__")
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[leaf]
    else:
        target[leaf] = value


def make_result(protocol_id: str, method: str, dataset: str, seed: int, shots: int = 16,
                metrics: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """A result of job (protocol, method, dataset, shots, seed); see the module docstring."""
    p = load_protocol(protocol_id)
    names = p.eval_names
    given = dict(metrics) if metrics is not None else {n: 50.0 + i for i, n in enumerate(names)}
    built = {k: dict(v) if isinstance(v, Mapping) else metric(float(v)) for k, v in given.items()}
    recipe = default_recipe(protocol_id, method, dataset, shots)
    result: dict[str, Any] = {
        "schema_version": 1,
        "job": {"id": "0" * 64, "protocol": p.ref(), "method": method, "dataset": dataset,
                "shots": shots, "seed": seed},
        "method": {"name": method, "source": "builtin", "recipe": recipe,
                   "config_hash": config_hash(method, recipe), "default_recipe": True, "overrides": {},
                   "trainable_params": 2048},
        "backbone": {"model": "ViT-B-16", "pretrained": "openai", "weights_sha256": sha("weights"),
                     "precision": "fp16", "device": "cpu"},
        "data": {
            "train": {"dataset": dataset, "fingerprint": train_fingerprint(protocol_id, dataset, shots, seed),
                      "n_images": 16 * 10, "n_classes": 10, "manifest_sha256": sha("manifest", dataset, shots, seed)},
            "evals": {k: {"dataset": dataset if p.task == "base2new" or k == "test" else k,
                          "fingerprint": eval_fingerprint(protocol_id, dataset, k),
                          "n_images": built[k]["total"], "n_classes": 10} for k in built},
        },
        "metrics": built,
        "timing": {"train_seconds": 1.0, "train_images": 160, "train_ms_per_image": 6.25, "eval_seconds": 2.0,
                   "eval_images": 1000, "eval_images_per_second": 500.0, "peak_memory_bytes": 1 << 20,
                   "peak_memory_kind": "process_max_rss", "train_shared_from": None,
                   "eval_feature_cache": "off"},
        "environment": {"benchsuite": "0.1.0", "python": "3.11", "torch": "2.3", "open_clip": "2.24",
                        "platform": "linux", "git_commit": None},
        "created_at": "2024-01-01T00:00:00+00:00",
    }
    explicit_id = "job__id" in overrides or "job" in overrides
    for key, value in overrides.items():
        _set(result, key, value if value is _DELETE else copy.deepcopy(value))
    m = result["method"]
    if "method__config_hash" not in overrides and isinstance(m, dict) and isinstance(m.get("recipe"), dict):
        m["config_hash"] = config_hash(result["job"]["method"], m["recipe"])  # the hash follows the recipe
    if not explicit_id:
        result["job"]["id"] = job_id(result)
    return result


__all__ = ["DELETE", "default_recipe", "eval_fingerprint", "job_id", "make_result", "metric", "sha", "train_fingerprint"]
