"""`benchsuite compare A B --protocol P`: a paired comparison of two leaderboard rows.

Pairs are (dataset, seed): both methods trained on the same few-shot sample and evaluated on the
same test set, so the per-seed difference removes the sample's share of the noise. Reported: the
paired differences per dataset and seed, the number of datasets where A beats B (on the
protocol's per-dataset number: HM of the seed means for base-to-new, mean accuracy otherwise),
and the difference of the protocol's headline number (average HM, or average accuracy) with a
95% interval from the joint seed bootstrap of `report.stats`, resampling the same seeds for A
and B.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ..errors import BenchsuiteError
from .model import Row, build_rows
from .stats import bootstrap, hm


def _headline_key(row: Row) -> str:
    return "hm" if row.protocol.task == "base2new" else "accuracy"


def _per_seed(row: Row, name: str, seed: int) -> float:
    m = row.seed_cells(name)[seed]
    return hm(m["base"], m["new"]) if row.protocol.task == "base2new" else m["test"]


def compare_rows(a: Row, b: Row) -> dict[str, Any]:
    """The paired comparison of rows `a` and `b` (same protocol, backbone and shots) as plain data."""
    key = _headline_key(a)
    datasets = []
    for name in a.names:
        seeds = sorted(set(a.seed_cells(name)) & set(b.seed_cells(name)))
        if not seeds:
            continue
        diffs = {s: _per_seed(a, name, s) - _per_seed(b, name, s) for s in seeds}
        ca, cb = a.cell_stat(name, seeds), b.cell_stat(name, seeds)
        entry = {"dataset": name, "seeds": seeds, "paired": diffs, "a": ca[key], "b": cb[key],
                 "difference": ca[key] - cb[key], "in_average": name in a.average_names}
        if a.protocol.task == "base2new":
            entry["difference_base"] = ca["base"] - cb["base"]
            entry["difference_new"] = ca["new"] - cb["new"]
        datasets.append(entry)
    counted = [d for d in datasets if d["in_average"]]
    out: dict[str, Any] = {
        "protocol": a.protocol.id, "backbone": list(a.backbone), "shots": a.shots, "a": a.label, "b": b.label,
        "metric": key, "datasets": datasets,
        "a_wins": sum(d["difference"] > 0 for d in counted), "b_wins": sum(d["difference"] < 0 for d in counted),
        "ties": sum(d["difference"] == 0 for d in counted), "datasets_compared": len(counted),
        "headline": None,
    }
    seeds = sorted(set(a.seeds()) & set(b.seeds()))
    if a.complete and b.complete and seeds:
        diff = lambda s: {"d": a.average_stat(list(s))[key] - b.average_stat(list(s))[key]}  # noqa: E731
        low, high = bootstrap(diff, seeds)["d"]
        out["headline"] = {"a": a.average_stat(seeds)[key], "b": b.average_stat(seeds)[key],
                           "difference": diff(seeds)["d"], "interval95": [low, high], "seeds": seeds}
    return out


def _text(c: dict[str, Any]) -> str:
    from .markdown import _title

    seeds = sorted({s for d in c["datasets"] for s in d["seeds"]})
    metric = "HM" if c["metric"] == "hm" else "accuracy"
    headers = ["Dataset", *(f"Δ seed {s}" for s in seeds), f"Δ {metric}", f"{c['a']}", f"{c['b']}"]
    b2n = any("difference_base" in d for d in c["datasets"])
    if b2n:
        headers[len(seeds) + 2:len(seeds) + 2] = ["Δ Base", "Δ New"]
    body = []
    for d in c["datasets"]:
        row = [_title(d["dataset"]) + ("" if d["in_average"] else " (source)"),
               *(f"{d['paired'][s]:+.2f}" if s in d["paired"] else "–" for s in seeds), f"{d['difference']:+.2f}"]
        if b2n:
            row += [f"{d['difference_base']:+.2f}", f"{d['difference_new']:+.2f}"]
        body.append(row + [f"{d['a']:.2f}", f"{d['b']:.2f}"])
    lines = [f"{c['a']} vs {c['b']} on {c['protocol']} · {' · '.join(c['backbone'])}, {c['shots']} shots "
             f"(Δ = A − B; per seed: {metric} of that seed)", "",
             tabulate(body, headers=headers, tablefmt="github", disable_numparse=True), "",
             f"{c['a']} beats {c['b']} on {c['a_wins']} of {c['datasets_compared']} datasets "
             f"({c['b_wins']} the other way, {c['ties']} ties)."]
    h = c["headline"]
    if h is None:
        lines.append(f"Headline {metric}: not computed (a row is missing seeds or datasets).")
    else:
        lines.append(f"Headline {metric}: {h['a']:.2f} vs {h['b']:.2f}, difference {h['difference']:+.2f} "
                     f"(95% joint seed-bootstrap interval [{h['interval95'][0]:+.2f}, {h['interval95'][1]:+.2f}] "
                     f"over seeds {', '.join(map(str, h['seeds']))}).")
    return "\n".join(lines)


def comparisons(results: list[dict[str, Any]], a: str, b: str, protocol: str, where: str) -> list[dict[str, Any]]:
    rows = build_rows(results).get(protocol, [])
    labels = sorted({r.label for r in rows})
    for name in (a, b):
        if name not in labels:
            have = ", ".join(labels) or "none"
            raise BenchsuiteError(f"no results of {name!r} for protocol {protocol!r} in {where} "
                                  f"(rows there: {have}); run it first or check the name")
    out = []
    for ra in rows:
        for rb in rows:
            if ra.label == a and rb.label == b and (ra.backbone, ra.shots) == (rb.backbone, rb.shots):
                out.append(compare_rows(ra, rb))
    if not out:
        raise BenchsuiteError(f"{a!r} and {b!r} share no backbone and shot count under {protocol!r} in {where}; "
                              "compare rows run on the same backbone")
    return out


def compare_command(a: str, b: str, protocol: str, results_dir: Path, as_json: bool = False) -> int:
    """Print the comparison (text tables, or JSON with `as_json`); 0 on success."""
    from ..leaderboard import _merge, load_results
    from ..protocols import load_protocol

    load_protocol(protocol)  # an unknown id ends in its one-line ProtocolError
    results, _ = load_results(results_dir, protocols=[protocol])
    merged, _ = _merge(results, results_dir)
    found = comparisons([i.result for i in merged], a, b, protocol, str(results_dir))
    if as_json:
        print(json.dumps(found, indent=1, sort_keys=True, default=lambda o: o))
    else:
        print("\n\n".join(_text(c) for c in found))
    return 0


__all__ = ["compare_command", "compare_rows", "comparisons"]
