"""Is a result file acceptable for the leaderboard? Schema first, then its frozen protocol.

A result that passes the schema can still be incomparable: produced under an edited protocol,
for a seed or shot count the protocol does not run, or with accuracies that do not follow from
the recorded counts. Each message says which field is wrong and why it matters.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from ..engine.recipe import config_hash, declarations, resolve_recipe
from ..errors import ProtocolError
from ..protocols import Protocol, load_protocol
from .schema import json_path, validate_schema
from .store import read_json

ACCURACY_TOLERANCE = 1e-6


@lru_cache(maxsize=None)
def _shipped(pid: str) -> Protocol | str:
    """The shipped protocol, or the reason it cannot be loaded (protocols are frozen: cache)."""
    try:
        return load_protocol(pid)
    except ProtocolError as exc:
        return str(exc)


def _names(items: Iterable[str]) -> str:
    return ", ".join(repr(i) for i in sorted(items))


def _metric_problems(result: dict[str, Any]) -> list[str]:
    problems = []
    for key in sorted(result["metrics"]):
        metric = result["metrics"][key]
        where = json_path(["metrics", key])
        correct, total, accuracy = metric["correct"], metric["total"], metric["accuracy"]
        if correct > total:
            problems.append(f"{where}: correct {correct} > total {total}")
        expected = 100.0 * correct / total
        if not math.isclose(accuracy, expected, rel_tol=0.0, abs_tol=ACCURACY_TOLERANCE):
            problems.append(
                f"{json_path(['metrics', key, 'accuracy'])}: {accuracy!r} != 100*correct/total = {expected!r}"
            )
        evals = result["data"]["evals"]
        if key in evals and evals[key]["n_images"] != total:
            problems.append(
                f"{json_path(['metrics', key, 'total'])}: {total} images evaluated, but "
                f"data.evals.{key}.n_images is {evals[key]['n_images']} (the eval did not cover its test set)"
            )
    return problems


def _protocol_problems(result: dict[str, Any]) -> list[str]:
    job = result["job"]
    ref = job["protocol"]
    shipped = _shipped(ref["id"])
    if isinstance(shipped, str):
        return [f"$.job.protocol.id: {shipped}"]
    p: Protocol = shipped
    problems = []
    if ref["version"] != p.version:
        problems.append(
            f"$.job.protocol.version: result was produced under {p.id} v{ref['version']}, but the shipped "
            f"protocol is v{p.version}; the result is incomparable"
        )
    if ref["hash"] != p.hash:
        problems.append(
            f"$.job.protocol.hash: {ref['hash'][:12]} differs from the shipped {p.id} v{p.version} hash "
            f"{p.hash[:12]}; the result was produced under a different protocol definition and is incomparable"
        )
    if job["dataset"] not in p.train_datasets:
        problems.append(
            f"$.job.dataset: {job['dataset']!r} is not a training dataset of {p.id} "
            f"(expected one of {_names(p.train_datasets)})"
        )
    if job["seed"] not in p.seeds:
        problems.append(f"$.job.seed: {job['seed']} is not a seed of {p.id} (seeds {p.seeds})")
    if job["shots"] not in p.shots:
        problems.append(f"$.job.shots: {job['shots']} is not a shot count of {p.id} (shots {p.shots})")
    selection = result.get("method", {}).get("recipe", {}).get("model_selection", p.spec["model_selection"])
    if selection != p.spec["model_selection"]:
        problems.append(f"$.method.recipe.model_selection: {selection!r} is off-protocol ({p.id} evaluates the "
                        f"{p.spec['model_selection']} model); such results are not comparable")
    return problems


def _consistency_problems(result: dict[str, Any]) -> list[str]:
    job, problems = result["job"], []
    if result["method"]["name"] != job["method"]:
        problems.append(f"$.method.name: {result['method']['name']!r} differs from job.method {job['method']!r}")
    if result["data"]["train"]["dataset"] != job["dataset"]:
        problems.append(
            f"$.data.train.dataset: {result['data']['train']['dataset']!r} differs from job.dataset {job['dataset']!r}"
        )
    return problems


def _key_problems(result: dict[str, Any]) -> list[str]:
    shipped = _shipped(result["job"]["protocol"]["id"])
    problems = []
    if isinstance(shipped, str):
        return problems
    p: Protocol = shipped
    expected, got = set(p.eval_names), set(result["metrics"])
    if expected != got:
        parts = []
        if expected - got:
            parts.append(f"missing {_names(expected - got)}")
        if got - expected:
            parts.append(f"unexpected {_names(got - expected)}")
        problems.append(f"$.metrics: keys must be exactly {_names(expected)} for {p.id}: " + "; ".join(parts))
    evals = set(result["data"]["evals"])
    if evals != got:
        problems.append(f"$.data.evals: keys {_names(evals)} must equal the metrics keys {_names(got)}")
    return problems


@lru_cache(maxsize=256)
def _installed_default(method: str, pid: str, dataset: str, shots: int) -> str | None:
    """The installed method's default recipe for this job as canonical JSON; None when the method
    is not installed here (then only the hash can be checked). Raises on a broken method, and on a
    name an installed plugin provides but discovery skipped (a name claimed by two plugins): the
    recipe cannot be vouched for, so such a result is refused with that reason, not accepted unchecked."""
    from ..methods import discover, get_method, job_manager, skipped_method  # lazy: discovery imports plugins

    entry = discover().get(method)
    shipped = _shipped(pid)
    if entry is None and skipped_method(method) is not None:
        get_method(method)  # raises, naming the plugins and the fix
    if entry is None or isinstance(shipped, str):
        return None
    pm, _ = job_manager(entry)
    default = pm.hook.recipe(protocol=shipped, dataset=dataset, shots=shots)
    recipe, _ = resolve_recipe(method, default, shipped.profile, {}, **declarations(entry.cls))
    return json.dumps(recipe, sort_keys=True, default=str)


def _recipe_problems(result: dict[str, Any]) -> list[str]:
    """The recorded recipe must hash to `config_hash`, and be the installed default recipe plus the
    recorded overrides: a forged hash or a relabelled recipe would merge incomparable runs."""
    job, m = result["job"], result["method"]
    problems = []
    recomputed = config_hash(job["method"], m["recipe"])
    if recomputed != m["config_hash"]:
        problems.append(f"$.method.config_hash: {m['config_hash'][:12]} does not match the recorded recipe (its hash "
                        f"is {recomputed[:12]}); the recipe or the hash was edited")
    if m["default_recipe"] and m["overrides"]:
        problems.append("$.method.default_recipe: true, but $.method.overrides is not empty")
    try:
        default = _installed_default(job["method"], job["protocol"]["id"], job["dataset"], job["shots"])
    except Exception as exc:  # a broken installed method cannot vouch for anything
        return problems + [f"$.method.recipe: cannot compute the installed default recipe of {job['method']!r} "
                           f"to compare with: {type(exc).__name__}: {exc}"]
    if default is None:
        return problems
    expected = {**json.loads(default), **m["overrides"]}
    recorded = json.loads(json.dumps(m["recipe"], sort_keys=True, default=str))
    wrong = sorted(k for k in set(expected) | set(recorded) if expected.get(k, _MISSING) != recorded.get(k, _MISSING))
    if wrong:
        shown = "; ".join(f"{k}: recorded {json.dumps(recorded.get(k))}, expected {json.dumps(expected.get(k))}"
                          for k in wrong[:5])
        claim = "the default recipe" if m["default_recipe"] else "the default recipe plus the recorded overrides"
        problems.append(f"$.method.recipe: claims {claim} of the installed {job['method']!r}, but {shown}")
    return problems


_MISSING = object()
_CHECKS = (_protocol_problems, _consistency_problems, _key_problems, _metric_problems, _recipe_problems)


def validate_result(result: Any) -> list[str]:
    """Every reason `result` cannot be merged: schema problems, then protocol problems; [] if fine."""
    try:
        problems = validate_schema(result)
    except RecursionError:
        return ["$: nested too deeply to validate"]
    schema_ok = not problems
    for check in _CHECKS:
        try:
            problems += check(result)
        except (KeyError, TypeError, AttributeError, ValueError, ZeroDivisionError):
            if schema_ok:  # a valid result must pass every check without tripping over its structure
                raise
            # best effort on a malformed result: the schema messages already explain the structure
    return problems


#: (keys a file must all have, what it is) for the JSON files benchsuite writes that are not results
_NOT_RESULTS = (
    ({"dataset", "shots", "seed", "train", "sha256"}, "a few-shot manifest (RESULTS/_manifests/)"),
    ({"protocol", "jobs"}, "a grid record of `benchsuite run`, read by `benchsuite status` (RESULTS/_grids/)"),
    ({"label", "protocol", "host", "pid"}, "a job claim, present while the job runs (RESULTS/.locks/)"),
    ({"format", "key", "features"}, "a feature-cache entry's metadata"),
    ({"method", "paper", "entries"}, "a reference file of published numbers (leaderboard/reference/)"),
    ({"id", "version", "task", "evals"}, "a protocol definition"),
)
#: folders of a results tree that never hold results (`ResultStore.iter_results` skips them too)
_NON_RESULT_FOLDERS = {"_manifests", "_grids", ".locks", "_checkpoints", "_trained", "_slurm", "_logs"}


def non_result_kind(path: Path, data: dict[str, Any]) -> str | None:
    """What a JSON file is when it is one benchsuite writes beside results and not a result (so
    `validate` can say so instead of listing schema errors); None when it may be a result.

    Anything with a `job` or `metrics` key is treated as a result, however broken: a damaged
    result must never be waved through as "not a result"."""
    if "job" in data or "metrics" in data:
        return None
    for keys, what in _NOT_RESULTS:
        if keys <= set(data):
            return what
    folder = next((part for part in Path(path).parent.parts if part in _NON_RESULT_FOLDERS), None)
    if folder is not None:
        return f"a file of the {folder}/ folder of a results tree, where benchsuite keeps what is not a result"
    return None


def validate_files(paths: Iterable[Path | str]) -> dict[Path, list[str]]:
    """Problems per file (empty list: acceptable); unparseable JSON names the error position."""
    report: dict[Path, list[str]] = {}
    for raw in paths:
        path = Path(raw)
        data, why = read_json(path)
        report[path] = [f"file {why}"] if data is None else validate_result(data)
    return report


def skipped_files(paths: Iterable[Path | str]) -> dict[Path, str]:
    """The files among `paths` that are readable JSON but not results, with what each one is."""
    out: dict[Path, str] = {}
    for raw in paths:
        path = Path(raw)
        data, _ = read_json(path)
        kind = None if data is None else non_result_kind(path, data)
        if kind is not None:
            out[path] = kind
    return out


__all__ = ["ACCURACY_TOLERANCE", "non_result_kind", "skipped_files", "validate_files", "validate_result"]
