// Progressive enhancement only: every page works without this script.
(function () {
  "use strict";
  // Live deadline: "in 1 h 59 min" next to the absolute time, refreshed every second.
  function fmt(ms) {
    var past = ms < 0, s = Math.floor(Math.abs(ms) / 1000);
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    var text = (h ? h + " h " : "") + (h || m ? m + " min " : "") + (h ? "" : sec + " s");
    return past ? "passed " + text.trim() + " ago" : "in " + text.trim();
  }
  function tick() {
    document.querySelectorAll("[data-deadline]").forEach(function (el) {
      var out = el.parentElement.querySelector(".countdown");
      var at = Date.parse(el.getAttribute("data-deadline"));
      if (out && !isNaN(at)) { out.textContent = "(" + fmt(at - Date.now()) + ")"; }
    });
  }
  // An opened action form puts the cursor in its Reason field.
  document.addEventListener("toggle", function (event) {
    var d = event.target;
    if (d.classList && d.classList.contains("action") && d.open) {
      var field = d.querySelector("textarea, select, input:not([type=hidden])");
      if (field) { field.focus(); }
    }
  }, true);
  document.addEventListener("DOMContentLoaded", function () {
    tick();
    if (document.querySelector("[data-deadline]")) { setInterval(tick, 1000); }
  });
})();
