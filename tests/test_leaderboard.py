"""Leaderboard arithmetic (methods.md 2.4), incompleteness, refusals and the --check gate."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

try:
    from results_factory import default_recipe, make_result, sha
except ImportError:  # tests/ imported as a package
    from tests.results_factory import default_recipe, make_result, sha

from benchsuite.leaderboard import _title, build_leaderboard, write_leaderboard
from benchsuite.protocols import load_protocol
from benchsuite.results.store import ResultStore

B2N = load_protocol("base2new")
XD = load_protocol("cross_dataset")
DG = load_protocol("domain_generalization")
FS = load_protocol("few_shot")
BACKBONE = "### ViT-B-16 · openai · fp16"


def heading(p: Any) -> str:
    return f"## {p.spec['title']} ({p.id} v{p.version}, hash {p.hash[:12]})"


def section(md: str, head: str) -> str:
    """Text from `head` up to the next heading of the same or a higher level."""
    level = head.split(" ")[0]
    lines = md.splitlines()
    start = lines.index(head)
    out = []
    for line in lines[start + 1:]:
        marks = line.split(" ")[0]
        if line.startswith("#") and set(marks) == {"#"} and len(marks) <= len(level):
            break
        out.append(line)
    return "\n".join(out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table(text: str) -> dict[str, dict[str, str]]:
    """The first markdown table in `text`, as row label -> column -> cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = _cells(lines[0])
    first_table = []
    for line in text.splitlines()[text.splitlines().index(lines[0]):]:
        if not line.startswith("|"):
            break
        first_table.append(line)
    return {_cells(r)[0]: dict(zip(header, _cells(r))) for r in first_table[2:]}


def b2n_rows(method: str, values: dict[str, tuple[list[float], list[float]]], **kw: Any) -> list[tuple[Path, dict]]:
    """Results of `method` on base2new: dataset -> (base per seed, new per seed), seeds 1, 2, 3, ..."""
    out = []
    for dataset, (base, new) in values.items():
        for seed, (b, n) in enumerate(zip(base, new), start=1):
            r = make_result("base2new", method, dataset, seed, metrics={"base": b, "new": n}, **kw)
            out.append((Path(f"/results/base2new/{method}/{dataset}/{r['job']['id'][:16]}.json"), r))
    return out


def test_base2new_cells_and_average_use_hm_of_the_means() -> None:
    values = {d: ([70.0] * 3, [70.0] * 3) for d in B2N.train_datasets}
    values["dtd"] = ([80.0, 82.0, 84.0], [60.0, 62.0, 64.0])  # means 82 / 62, HM 2*82*62/144 = 70.61
    values["caltech101"] = ([90.0, 92.0, 94.0], [40.0, 42.0, 44.0])  # means 92 / 42, HM 7728/134 = 57.67
    md = build_leaderboard(b2n_rows("coop", values))
    row = table(section(section(md, heading(B2N)), BACKBONE))["coop"]
    assert row[_title("dtd")] == "82.00 / 62.00 / 70.61"
    assert row[_title("caltech101")] == "92.00 / 42.00 / 57.67"
    assert row[_title("eurosat")] == "70.00 / 70.00 / 70.00"
    # mean base = (82 + 92 + 9*70)/11 = 804/11 = 73.09; mean new = (62 + 42 + 630)/11 = 734/11 = 66.73;
    # HM(804/11, 734/11) = 2*804*734 / (11*1538) = 69.76, whereas the mean of per-dataset HMs would be
    # (70.611 + 57.672 + 9*70)/11 = 68.93.
    assert row["Average"] == "73.09 / 66.73 / 69.76"
    assert "68.93" not in md
    assert (row["Seeds"], row["Status"]) == ("3", "complete")


def test_transfer_average_excludes_the_source() -> None:
    results = []
    for seed in (1, 2, 3):
        xd = {"imagenet": 10.0 * seed}  # source mean 20: counting it would give (20 + 545)/11 = 51.36
        xd.update({t: 50.0 + i + (seed - 2) for i, t in enumerate(XD.spec["targets"])})  # means 50..59
        dg = {"imagenet": 70.0, **dict(zip(DG.spec["targets"], [60.0, 50.0, 40.0, 30.0]))}
        for pid, metrics in (("cross_dataset", xd), ("domain_generalization", dg)):
            r = make_result(pid, "coop", "imagenet", seed, metrics=metrics)
            results.append((Path(f"/r/{pid}/{seed}.json"), r))
    md = build_leaderboard(results)
    xd_row = table(section(md, heading(XD)))["coop"]
    assert xd_row[_title("imagenet")] == "20.00"
    assert xd_row[_title("caltech101")] == "50.00" and xd_row[_title("ucf101")] == "59.00"
    assert xd_row["Average"] == "54.50" and "51.36" not in md
    dg_row = table(section(md, heading(DG)))["coop"]
    assert [dg_row[_title(t)] for t in DG.eval_names] == ["70.00", "60.00", "50.00", "40.00", "30.00"]
    assert dg_row["Average"] == "45.00"  # (60+50+40+30)/4; with the source it would be 50.00
    assert (dg_row["Seeds"], dg_row["Status"]) == ("3", "complete")
    assert md.index(heading(XD)) < md.index(heading(DG))


def test_few_shot_has_one_table_per_shot_count() -> None:
    results = []
    for k, base in ((16, 70.0), (1, 40.0)):
        for i, d in enumerate(FS.train_datasets):
            for seed in (1, 2, 3):
                r = make_result("few_shot", "coop", d, seed, shots=k, metrics={"test": base + i + (seed - 2) * 0.5})
                results.append((Path(f"/r/{k}/{d}/{seed}.json"), r))
    body = section(md := build_leaderboard(results), heading(FS))
    assert body.index("#### 1 shots") < body.index("#### 16 shots")
    one, sixteen = table(section(body, "#### 1 shots"))["coop"], table(section(body, "#### 16 shots"))["coop"]
    assert one[_title("imagenet")] == "40.00" and one[_title("ucf101")] == "50.00"
    assert one["Average"] == "45.00" and sixteen["Average"] == "75.00"
    assert "#### 2 shots" not in md


def test_incomplete_rows_are_marked_not_averaged_away() -> None:
    full = {d: ([80.0] * 3, [60.0] * 3) for d in B2N.train_datasets}
    partial = dict(full, dtd=([80.0, 90.0], [60.0, 70.0]))  # seed 3 missing on dtd
    missing = {d: v for d, v in full.items() if d != "eurosat"}
    md = build_leaderboard(b2n_rows("partial", partial) + b2n_rows("missing", missing) + b2n_rows("full", full))
    rows = table(section(md, heading(B2N)))
    assert rows["partial"][_title("dtd")] == "85.00 / 65.00 / 73.67†"
    assert rows["partial"][_title("eurosat")] == "80.00 / 60.00 / 68.57"
    assert rows["partial"]["Seeds"] == "2–3"
    assert rows["partial"]["Status"] == f"incomplete: missing seed 3 of {_title('dtd')}"
    assert rows["partial"]["Average"].endswith("†")
    assert rows["missing"][_title("eurosat")] == "–" and rows["missing"]["Average"] == "–"
    assert rows["missing"]["Status"] == f"incomplete: missing {_title('eurosat')}"
    assert rows["missing"]["Seeds"] == "3"
    assert rows["full"]["Status"] == "complete" and rows["full"]["Average"] == "80.00 / 60.00 / 68.57"
    assert list(rows) == ["full", "missing", "partial"]


def _write_all(store: ResultStore, results: list[tuple[Path, dict]]) -> None:
    for _, r in results:
        store.write(r)


def test_refused_results_are_listed_with_reasons(tmp_path: Path) -> None:
    root, store = tmp_path / "results", ResultStore(tmp_path / "results")
    good = {"dtd": ([80.0], [60.0])}
    _write_all(store, b2n_rows("coop", good) + b2n_rows("kgcoop", good))
    test_data = b2n_rows("maple", good, data__evals__new__fingerprint=sha("other test split"))
    train_data = b2n_rows("cocoop", good, data__train__fingerprint=sha("other shots"))
    bad_hash = b2n_rows("prograd", good, job__protocol__hash=sha("edited protocol"))
    _write_all(store, test_data + train_data + bad_hash)
    (root / "base2new" / "junk.json").write_text("{ nope", encoding="utf-8")
    out = tmp_path / "README.md"
    assert write_leaderboard(root, out) == []
    md = out.read_text(encoding="utf-8")
    assert set(table(section(md, heading(B2N)))) == {"coop", "kgcoop"}
    refused = table(section(md, "## Refused results"))

    def reason(method: str, results: list[tuple[Path, dict]]) -> str:
        return refused[f"`base2new/{method}/dtd/{results[0][1]['job']['id'][:16]}.json`"]["Reason"]

    assert reason("maple", test_data).startswith("incomparable: different test data for dtd/new")
    assert reason("cocoop", train_data).startswith("incomparable: different training data for dtd 16-shot seed 1")
    assert "$.job.protocol.hash" in reason("prograd", bad_hash) and "incomparable" in reason("prograd", bad_hash)
    assert "not valid JSON" in refused["`base2new/junk.json`"]["Reason"]
    assert len(refused) == 4


def test_duplicate_job_ids_keep_one_chosen_by_content_not_by_created_at() -> None:
    def board(first_stamp: str, second_stamp: str) -> tuple[str, dict]:
        one = make_result("base2new", "coop", "dtd", 1, metrics={"base": 80.0, "new": 60.0}, created_at=first_stamp)
        two = make_result("base2new", "coop", "dtd", 1, metrics={"base": 90.0, "new": 70.0}, created_at=second_stamp)
        assert one["job"]["id"] == two["job"]["id"]
        other_key = make_result("base2new", "coop", "dtd", 1, metrics={"base": 10.0, "new": 10.0},
                                job__id=sha("another id scheme"))
        files = [(Path("/r/one.json"), one), (Path("/r/two.json"), two), (Path("/r/other.json"), other_key)]
        md = build_leaderboard(files, root=Path("/r"))
        return table(section(md, heading(B2N)))["coop"][_title("dtd")], table(section(md, "## Refused results"))

    early_first, refused = board("2024-01-01T00:00:00+00:00", "2024-03-01T00:00:00Z")
    late_first, _ = board("2099-01-01T00:00:00+00:00", "2024-03-01T00:00:00Z")
    # a submitter cannot win by post-dating: the same result is chosen either way
    assert early_first == late_first
    assert len(refused) == 2
    assert any(r["Reason"].startswith("duplicate of job") for r in refused.values())
    assert any(r["Reason"].startswith("duplicate: ") and "content sha256" in r["Reason"] for r in refused.values())


def test_recipes_and_backbones_make_separate_rows_and_tables() -> None:
    values = {"dtd": ([80.0], [60.0])}
    longer = {**default_recipe("base2new", "coop", "dtd", 16), "epochs": 50}
    rows = (
        b2n_rows("coop", values)
        + b2n_rows("coop", {"dtd": ([85.0], [65.0])}, method__default_recipe=False,
                   method__recipe=longer, method__overrides={"epochs": 50})
        + b2n_rows("coop", {"dtd": ([50.0], [40.0])}, backbone__model="RN50")
    )
    md = build_leaderboard(rows)
    body = section(md, heading(B2N))
    assert body.index("### RN50 · openai · fp16") < body.index(BACKBONE)
    vit = table(section(body, BACKBONE))
    assert list(vit) == ["coop", "coop \\[epochs=50\\]"]  # brackets escaped: user text never makes a link
    assert vit["coop \\[epochs=50\\]"][_title("dtd")].startswith("85.00 / 65.00")
    assert table(section(body, "### RN50 · openai · fp16"))["coop"][_title("dtd")].startswith("50.00 / 40.00")


def test_output_is_deterministic_and_marked_generated() -> None:
    values = {d: ([80.0, 81.0, 82.0], [60.0, 61.0, 62.0]) for d in B2N.train_datasets[:4]}
    results = b2n_rows("coop", values, created_at="2031-05-06T07:08:09+00:00") + b2n_rows("kgcoop", values)
    results.append((Path("/results/x.json"), make_result("few_shot", "coop", "dtd", 1, shots=2)))
    first = build_leaderboard(results)
    shuffled = list(results)
    random.Random(0).shuffle(shuffled)
    assert build_leaderboard(shuffled) == first
    assert "generated by `benchsuite leaderboard`" in first and "must not be edited by hand" in first
    assert "2031" not in first
    assert first.index(heading(B2N)) < first.index(heading(FS)) < first.index("## Refused results")


def test_check_detects_stale_or_edited_leaderboards(tmp_path: Path) -> None:
    root, store, out = tmp_path / "results", ResultStore(tmp_path / "results"), tmp_path / "board" / "README.md"
    _write_all(store, b2n_rows("coop", {"dtd": ([80.0, 82.0], [60.0, 62.0])}))
    assert write_leaderboard(root, out, check=True) == [f"{out} does not exist"]  # not written yet
    assert not out.exists()
    assert write_leaderboard(root, out) == []
    assert write_leaderboard(root, out, check=True) == []
    edited = out.read_text(encoding="utf-8").replace("81.00", "99.00")
    assert edited != out.read_text(encoding="utf-8")
    out.write_text(edited, encoding="utf-8")
    assert write_leaderboard(root, out, check=True)
    assert out.read_text(encoding="utf-8") == edited  # check never writes
    write_leaderboard(root, out)
    assert write_leaderboard(root, out, check=True) == []
    store.write(make_result("base2new", "coop", "dtd", 3, metrics={"base": 84.0, "new": 64.0}))
    assert write_leaderboard(root, out, check=True)  # a new result makes it stale


def test_check_with_tolerance_accepts_small_numeric_drift_only(tmp_path: Path) -> None:
    root, store, out = tmp_path / "results", ResultStore(tmp_path / "results"), tmp_path / "README.md"
    _write_all(store, b2n_rows("coop", {"dtd": ([80.0, 82.0], [60.0, 62.0])}))
    write_leaderboard(root, out)
    committed = out.read_text(encoding="utf-8")
    out.write_text(committed.replace("81.00", "81.30"), encoding="utf-8")
    assert write_leaderboard(root, out, check=True)  # exact check: stale
    assert write_leaderboard(root, out, check=True, tolerance=0.5) == []
    out.write_text(committed.replace("81.00", "82.00"), encoding="utf-8")
    problems = write_leaderboard(root, out, check=True, tolerance=0.5)
    assert len(problems) >= 1 and "82.00 committed, 81.00 regenerated" in problems[0]
    out.write_text(committed.replace("coop", "cocoop"), encoding="utf-8")  # structure differs, not numbers
    assert "beyond their numbers" in write_leaderboard(root, out, check=True, tolerance=0.5)[0]


@pytest.mark.parametrize("bad", ["[]", ""])
def test_empty_or_broken_roots_still_render(tmp_path: Path, bad: str) -> None:
    (tmp_path / "x.json").write_text(bad, encoding="utf-8")
    assert "_No results yet._" in build_leaderboard([])
    out = tmp_path / "README.md"
    write_leaderboard(tmp_path, out)
    assert "`x.json`" in out.read_text(encoding="utf-8")
