// mfv report: facet highlighting and map tooltips. No dependencies; all text set via textContent.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("mfv-data").textContent);

  // Toggle facet `f` of a target section: its map points, card and legend entry stand out.
  function select(section, f) {
    var next = section.dataset.sel === f ? "" : f;
    section.dataset.sel = next;
    var svg = section.querySelector("svg.map");
    if (svg) {
      svg.classList.toggle("has-sel", next !== "");
      svg.querySelectorAll(".pt").forEach(function (c) {
        c.classList.toggle("on", next !== "" && c.dataset.f === next);
      });
    }
    var facets = section.querySelector(".facets");
    if (facets) facets.classList.toggle("has-sel", next !== "");
    section.querySelectorAll("[data-facet]").forEach(function (el) {
      var on = el.dataset.facet === next;
      el.classList.toggle("selected", on);
      if (el.tagName === "BUTTON") el.setAttribute("aria-pressed", on ? "true" : "false");
    });
  }

  document.addEventListener("click", function (ev) {
    if (ev.target.closest("a")) return;
    var el = ev.target.closest("[data-facet], .pt");
    var section = el && el.closest("section.target");
    if (!section) return;
    var f = el.classList.contains("pt") ? el.dataset.f : el.dataset.facet;
    if (f !== undefined && f !== "-1") select(section, f);
  });

  function fmt(v) {
    if (v === null || v === undefined) return "–";
    return Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : String(+v.toPrecision(4));
  }

  document.querySelectorAll(".mapbox").forEach(function (box) {
    var target = data.targets[box.dataset.target];
    var points = (target && target.points) || [];
    var svg = box.querySelector("svg.map");
    var tip = document.createElement("div");
    tip.className = "tip";
    tip.hidden = true;
    box.appendChild(tip);

    function place(ev) {
      var r = box.getBoundingClientRect();
      var x = ev.clientX - r.left + 14, y = ev.clientY - r.top + 14;
      if (x + 190 > r.width) x = ev.clientX - r.left - 194;
      if (y + 240 > r.height) y = Math.max(0, ev.clientY - r.top - 250);
      tip.style.left = x + "px";
      tip.style.top = y + "px";
    }

    svg.addEventListener("mouseover", function (ev) {
      var c = ev.target.closest(".pt");
      var p = c && points[+c.dataset.i];
      if (!p) return;
      tip.textContent = "";
      var pic;
      if (p.t) {
        pic = document.createElement("img");
        pic.src = p.t;
        pic.alt = p.p;
      } else {
        pic = document.createElement("div");
        pic.className = "ph";
        pic.textContent = "image not shown: " + (p.r || "unreadable");
      }
      tip.appendChild(pic);
      var path = document.createElement("div");
      path.className = "path";
      path.textContent = p.p;
      tip.appendChild(path);
      var meta = document.createElement("div");
      meta.className = "muted";
      meta.textContent = "activation " + fmt(p.a) + (p.f >= 0 ? " · facet " + p.f : "") +
        (p.l ? " · " + p.l : "");
      tip.appendChild(meta);
      tip.hidden = false;
      place(ev);
    });
    svg.addEventListener("mousemove", function (ev) { if (!tip.hidden) place(ev); });
    svg.addEventListener("mouseout", function (ev) {
      if (ev.target.closest(".pt") && !(ev.relatedTarget && ev.relatedTarget.closest && ev.relatedTarget.closest(".pt"))) {
        tip.hidden = true;
      }
    });
  });
})();
