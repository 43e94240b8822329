// benchsuite leaderboard page: sortable columns and filters. No network, no dependencies.
(function () {
  "use strict";
  function sortKey(cell) {
    var v = cell.getAttribute("data-sort");
    if (v === null || v === "") return null;
    var n = Number(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  function sortTable(table, col, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var desc = th.getAttribute("aria-sort") !== "descending";
    rows.sort(function (a, b) {
      var x = sortKey(a.cells[col]), y = sortKey(b.cells[col]);
      if (x === y) return 0;
      if (x === null) return 1;  // missing values last in both directions
      if (y === null) return -1;
      var r = x < y ? -1 : 1;
      return desc ? -r : r;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", desc ? "descending" : "ascending");
  }
  function applyFilters() {
    var backbone = document.getElementById("filter-backbone").value;
    var family = document.getElementById("filter-family").value;
    Array.prototype.forEach.call(document.querySelectorAll("tr[data-backbone]"), function (tr) {
      var ok = (!backbone || tr.getAttribute("data-backbone") === backbone) &&
               (!family || tr.getAttribute("data-family") === family);
      tr.hidden = !ok;
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
        th.addEventListener("click", function () { sortTable(table, col, th); });
        th.tabIndex = 0;
        th.addEventListener("keydown", function (e) { if (e.key === "Enter") sortTable(table, col, th); });
      });
    });
    document.getElementById("filter-backbone").addEventListener("change", applyFilters);
    document.getElementById("filter-family").addEventListener("change", applyFilters);
  });
})();
