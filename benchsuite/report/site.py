"""`benchsuite leaderboard --site DIR`: one self-contained static page (DIR/index.html).

Everything is inline (CSS, the small sorting/filtering script, plots as data URIs), so the page
opens from disk with no server and no network. Measured and reported rows live in separate
tables; every row carries its backbone and method family for the filters (a measured method's
family comes from its reference file, else "other").
"""

from __future__ import annotations

import base64
import html
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from ..protocols import Protocol, load_protocol
from ..results.store import atomic_write_text
from .markdown import FLAG, UNCONFIRMED, declaration_suffix, primary_reference
from .model import Row, build_rows
from .plots import Plot
from .reference import Reference

DASH = "–"
ORDER = ("base2new", "cross_dataset", "domain_generalization", "few_shot")


def _asset(name: str) -> str:
    return (resources.files("benchsuite.report") / name).read_text(encoding="utf-8")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _title(name: str) -> str:
    from .markdown import _title as title

    return title(name)


def _fmt(p: Protocol, values: dict[str, float] | None) -> tuple[str, str]:
    """(text, sort key) of one cell: base/new/hm sorted by HM, or the accuracy."""
    if values is None:
        return DASH, ""
    if p.task == "base2new":
        return " / ".join(f"{values[k]:.2f}" for k in ("base", "new", "hm")), f"{values['hm']:.4f}"
    return f"{values['accuracy']:.2f}", f"{values['accuracy']:.4f}"


def _td(text: str, sort: str = "", cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-sort="{_e(sort)}">{text}</td>'


def _th(text: str) -> str:
    return f'<th scope="col">{_e(text)}</th>'


def _measured_table(p: Protocol, rows: Sequence[Row], refs: Sequence[Reference], family: dict[str, str]) -> str:
    names = rows[0].names
    head = ["Method", "Backbone", "Family", *(_title(n) for n in names), "Average", "95% interval",
            "Δ average vs reported", "Seeds", "Declarations"]
    body = []
    for r in rows:
        backbone = " · ".join(r.backbone)
        cells = [_td(_e(r.label), r.label, "text"), _td(_e(backbone), backbone, "text"),
                 _td(_e(family.get(r.method, "other")), family.get(r.method, "other"), "text")]
        cells += [_td(*_fmt(p, r.cell(n))) for n in names]
        avg = r.average()
        cells.append(_td(*_fmt(p, avg)))
        ci = r.average_interval()
        key = "hm" if p.task == "base2new" else "accuracy"
        cells.append(_td(DASH if ci is None else f"[{ci[key][0]:.2f}, {ci[key][1]:.2f}]",
                         "" if ci is None else f"{ci[key][1] - ci[key][0]:.4f}"))
        ref = primary_reference(r, refs)
        if ref is None or avg is None or ci is None:
            cells.append(_td(DASH))
        else:
            d = avg[key] - ref.values["average"][key]
            flag = not ci[key][0] - 0.005 <= ref.values["average"][key] <= ci[key][1] + 0.005
            cells.append(_td(f"{d:+.2f}" + (f' <span class="flag" title="published number outside the seed interval">{FLAG}</span>' if flag else ""),
                             f"{d:.4f}"))
        seeds = sorted({s for n in r.average_names for s in r.seed_cells(n)})
        cells.append(_td(_e(len(seeds)), str(len(seeds))))
        decl = declaration_suffix(r.extra_knowledge, r.transductive, r.setting).strip(" []") or ("inductive" if r.declared else "not declared")
        cells.append(_td(_e(decl), decl, "text"))
        body.append(f'<tr data-backbone="{_e(backbone)}" data-family="{_e(family.get(r.method, "other"))}">{"".join(cells)}</tr>')
    return _table(head, body)


def _table(head: list[str], body: list[str]) -> str:
    return ('<div class="scroll"><table class="sortable"><thead><tr>' + "".join(_th(h) for h in head)
            + "</tr></thead><tbody>" + "\n".join(body) + "</tbody></table></div>")


def _reported_table(p: Protocol, refs: Sequence[Reference]) -> str:
    names = p.eval_names if p.task == "transfer" else p.train_datasets
    head = ["Method", "Backbone", "Family", *(_title(n) for n in names), "Average", "Seeds", "Source"]
    body = []
    for r in refs:
        backbone = f"{r.model} · {r.pretrained}"
        cells = [_td(_e(r.label + " (reported)"), r.label, "text"), _td(_e(backbone), backbone, "text"),
                 _td(_e(r.family), r.family, "text")]
        for n in [*names, "average"]:
            text, sort = _fmt(p, r.values.get(n))
            cells.append(_td(_e(text) + (f' <span title="unconfirmed">{UNCONFIRMED}</span>' if n in r.unconfirmed else ""), sort))
        cells += [_td(_e(r.seeds), r.seeds, "text"), _td(_e(r.source + (f" ({r.note})" if r.note else "")), r.source, "text")]
        body.append(f'<tr class="reported" data-backbone="{_e(backbone)}" data-family="{_e(r.family)}">{"".join(cells)}</tr>')
    return _table(head, body)


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_page(results: Sequence[dict[str, Any]], refs: Sequence[Reference], plots: Sequence[Plot],
                plot_folder: Path | None) -> str:
    """The whole page as one HTML string."""
    rows_by = build_rows(results)
    family = {r.method: r.family for r in refs}
    pids = sorted(set(rows_by) | {r.protocol for r in refs},
                  key=lambda pid: (ORDER.index(pid) if pid in ORDER else len(ORDER), pid))
    backbones = sorted({" · ".join(r.backbone) for rs in rows_by.values() for r in rs} |
                       {f"{r.model} · {r.pretrained}" for r in refs})
    families = sorted(set(family.values()) | {family.get(r.method, "other") for rs in rows_by.values() for r in rs})
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>benchsuite leaderboard</title>", f"<style>{_asset('site.css')}</style></head><body>",
             "<h1>benchsuite leaderboard</h1>",
             '<p class="note">Top-1 accuracy (%), means over seeds; base-to-new cells are Base / New / HM and sort by '
             f"HM. Click a column header to sort. {FLAG}: the published number lies outside the 95% seed-bootstrap "
             f"interval; {UNCONFIRMED}: a published value the sources could not confirm. Reported rows are "
             "published numbers, never mixed with measured rows.</p>",
             '<div class="filters"><label>Backbone <select id="filter-backbone"><option value="">all</option>'
             + "".join(f'<option value="{_e(b)}">{_e(b)}</option>' for b in backbones) + "</select></label> "
             '<label>Method family <select id="filter-family"><option value="">all</option>'
             + "".join(f'<option value="{_e(f)}">{_e(f)}</option>' for f in families) + "</select></label></div>"]
    for pid in pids:
        p = load_protocol(pid)
        parts.append(f'<h2 id="{_e(pid)}">{_e(p.spec.get("title", pid))} <small>({_e(p.id)} v{p.version})</small></h2>')
        rows = rows_by.get(pid, [])
        by_shots: dict[int, list[Row]] = {}
        for r in rows:
            by_shots.setdefault(r.shots, []).append(r)
        if not rows:
            parts.append('<p class="note">No measured results yet: the reported rows below are what the suite will '
                         "compare with.</p>")
        for shots, group in sorted(by_shots.items()):
            parts.append(f"<h3>Measured, {shots} shots</h3>")
            parts.append(_measured_table(p, group, refs, family))
        mine = [r for r in refs if r.protocol == pid]
        if mine:
            parts.append("<h3>Reported (published numbers, not measured by benchsuite)</h3>")
            parts.append(_reported_table(p, mine))
        for pl in plots:
            if pl.protocol == pid and plot_folder is not None and (plot_folder / f"{pl.name}.png").is_file():
                parts.append(f'<img class="plot" alt="{_e(pl.title)}" src="{_png(plot_folder / f"{pl.name}.png")}">')
    parts.append(f"<script>{_asset('site.js')}</script></body></html>")
    return "\n".join(parts) + "\n"


def write_site(folder: Path, results: Sequence[dict[str, Any]], refs: Sequence[Reference], plots: Sequence[Plot],
               plot_folder: Path | None) -> Path:
    """Write `folder/index.html`; returns its path."""
    out = folder / "index.html"
    atomic_write_text(out, render_page(results, refs, plots, plot_folder))  # creates the folder
    return out


__all__ = ["render_page", "write_site"]
