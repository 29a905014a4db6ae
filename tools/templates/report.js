// saev-tools report: sort the latent table by clicking a header, filter it with numeric min/max inputs.
// Rows carry their numbers in data-* attributes; empty values (NaN) sort last and fail any active bound.
(function () {
  "use strict";
  var table = document.getElementById("latents");
  if (!table) return;
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var shown = document.getElementById("n-shown");

  function num(row, key) {
    var v = row.getAttribute("data-" + key);
    return v === null || v === "" ? NaN : parseFloat(v);
  }

  var headers = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(headers, function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      var desc = !th.classList.contains("desc");
      Array.prototype.forEach.call(headers, function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(desc ? "desc" : "asc");
      rows.sort(function (a, b) {
        var x = num(a, key), y = num(b, key);
        if (isNaN(x) && isNaN(y)) return num(a, "latent") - num(b, "latent");
        if (isNaN(x)) return 1;
        if (isNaN(y)) return -1;
        if (x === y) return num(a, "latent") - num(b, "latent");
        return desc ? y - x : x - y;
      });
      var frag = document.createDocumentFragment();
      rows.forEach(function (r) { frag.appendChild(r); });
      tbody.appendChild(frag);
    });
  });

  var inputs = Array.prototype.slice.call(document.querySelectorAll("#filters input"));
  function applyFilters() {
    var bounds = [];
    inputs.forEach(function (inp) {
      if (inp.type === "number" && inp.value !== "") {
        bounds.push({ key: inp.getAttribute("data-key"), min: inp.getAttribute("data-bound") === "min", v: parseFloat(inp.value) });
      }
    });
    var pagesOnly = document.getElementById("pages-only");
    var n = 0;
    rows.forEach(function (r) {
      var ok = !(pagesOnly && pagesOnly.checked && r.getAttribute("data-page") !== "1");
      for (var i = 0; ok && i < bounds.length; i++) {
        var x = num(r, bounds[i].key);
        ok = !isNaN(x) && (bounds[i].min ? x >= bounds[i].v : x <= bounds[i].v);
      }
      r.style.display = ok ? "" : "none";
      if (ok) n++;
    });
    if (shown) shown.textContent = String(n);
  }
  inputs.forEach(function (inp) { inp.addEventListener("input", applyFilters); inp.addEventListener("change", applyFilters); });
  applyFilters();
})();
