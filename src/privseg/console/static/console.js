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
        var marks = {done: " \u2713", skipped: " (no repair round run)"};
        document.querySelectorAll("#stages li").forEach(function (li) {
          var how = (s.stages || {})[li.dataset.stage];
          if (marks[how] && li.className !== how) {
            li.className = how;
            li.textContent = li.dataset.stage.replace("_", " ") + marks[how];
          }
        });
        if (s.final) { window.location.reload(); } else { window.setTimeout(poll, 1500); }
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  window.setTimeout(poll, 1000);
})();
