"""The static page in a real headless Chromium: it loads without console errors, a click on a
column header reorders the rows, the filters hide rows, and a screenshot is taken."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    from results_factory import make_result
except ImportError:  # tests/ imported as a package
    from tests.results_factory import make_result

from benchsuite.leaderboard import write_leaderboard
from benchsuite.results.store import ResultStore

REFERENCE = Path(__file__).resolve().parents[1] / "leaderboard" / "reference"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=180)


HARNESS = """<!DOCTYPE html><html><body><iframe id="f" src="index.html" style="width:1200px;height:900px"></iframe>
<script>
document.getElementById("f").addEventListener("load", function () {
  var d = this.contentDocument;
  var table = d.querySelector("#toy_cross_dataset ~ div table.sortable");
  function names() { return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[0].textContent; }); }
  var before = names();
  var avg = Array.prototype.findIndex.call(table.tHead.rows[0].cells, function (c) { return c.textContent === "Average"; });
  table.tHead.rows[0].cells[avg].click();
  var afterOne = names();
  table.tHead.rows[0].cells[avg].click();
  var afterTwo = names();
  var select = d.getElementById("filter-family");
  select.value = "zero-shot";
  select.dispatchEvent(new Event("change"));
  var visible = Array.prototype.filter.call(d.querySelectorAll("tr[data-family]"), function (r) { return !r.hidden; })
    .map(function (r) { return r.getAttribute("data-family"); });
  var out = document.createElement("pre");
  out.id = "result";
  out.textContent = JSON.stringify({before: before, desc: afterOne, asc: afterTwo, visible: visible});
  document.body.appendChild(out);
});
</script></body></html>
"""


@pytest.fixture
def site(tmp_path):
    store = ResultStore(tmp_path / "results")
    # three rows whose order by average differs from their name order
    for method, base in (("alpha", 40.0), ("beta", 70.0), ("gamma", 55.0)):
        for seed in (1, 2, 3):
            store.write(make_result("toy_cross_dataset", method, "toy_objects", seed,
                                    metrics={n: base + seed for n in ("toy_objects", "toy_shapes", "toy_colors",
                                                                      "toy_textures", "toy_counts")}))
    write_leaderboard(tmp_path / "results", tmp_path / "board" / "README.md", reference_dir=REFERENCE, plots=True,
                      site=tmp_path / "site")
    return tmp_path / "site"


def test_page_is_self_contained(site):
    page = (site / "index.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from a network
    assert 'src="data:image/png;base64,' in page
    assert "CoOp (CoCoOp&#x27;s run) (reported)" in page


def test_page_in_headless_chromium(site, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium found (Debian: apt-get install -y chromium); the page was not tested in a browser")
    profile = tmp_path / "profile"
    load = _run(browser, profile, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", "--dump-dom",
                (site / "index.html").as_uri())
    assert load.returncode == 0, load.stderr[-2000:]
    console = [line for line in load.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    assert "<h1>benchsuite leaderboard</h1>" in load.stdout

    (site / "harness.html").write_text(HARNESS)
    run = _run(browser, profile, "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom",
               (site / "harness.html").as_uri())
    match = re.search(r'<pre id="result">(.*?)</pre>', run.stdout, re.S)
    assert match, run.stderr[-2000:]
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["before"] == ["alpha", "beta", "gamma"]
    assert result["desc"] == ["beta", "gamma", "alpha"]  # first click: highest average first
    assert result["asc"] == ["alpha", "gamma", "beta"]
    assert result["visible"] and set(result["visible"]) == {"zero-shot"}

    shot = tmp_path / "page.png"
    snap = _run(browser, profile, "--window-size=1400,1600", f"--screenshot={shot}", (site / "index.html").as_uri())
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", snap.stderr[-2000:]
