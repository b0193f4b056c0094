// privseg console: live stages of an erasure job. Polls the job's status while it is open and
// reloads the page once it has finished (verification and certificate then appear).
(function () {
  "use strict";
  var job = document.getElementById("job");
  if (!job || !job.dataset.statusUrl) { return; }
  var url = job.dataset.statusUrl;
  function text(id, value) {
    var el = document.getElementById(id);
    if (el) { el.textContent = value == null ? "-" : String(value); }
  }
  function poll() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { if (!r.ok) { throw new Error(String(r.status)); } return r.json(); })
      .then(function (s) {
        text("job-state", s.state);
        text("job-stage", s.stage);
        text("job-message", s.message);
        var done = {};
        s.events.forEach(function (e) { done[e.event] = true; });
        document.querySelectorAll("#stages li").forEach(function (li) {
          if (done[li.dataset.stage] && li.className !== "done") {
            li.className = "done";
            li.textContent = li.dataset.stage.replace("_", " ") + " \u2713";
          }
        });
        if (s.final) { window.location.reload(); } else { window.setTimeout(poll, 1500); }
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  window.setTimeout(poll, 1000);
})();
