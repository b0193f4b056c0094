"""The privacy officer's console: a web app over the run folders, ledgers and certificates
that the command line writes (``privseg console --runs DIR``).

* :mod:`~privseg.console.app` -- the app (Starlette + Jinja2 templates; :func:`serve` runs it), built from
  :mod:`~privseg.console.web` (sessions, CSRF, roles: the guard every page goes through; the page
  registry) and the pages by concern, each module filing its own: :mod:`~privseg.console.login_pages`,
  :mod:`~privseg.console.home_page`, :mod:`~privseg.console.run_pages`, :mod:`~privseg.console.erasure_pages`;
* :mod:`~privseg.console.accounts` -- users (argon2 hashes), sessions, login throttling;
* :mod:`~privseg.console.store` -- requests filed, approved or rejected, and their jobs;
* :mod:`~privseg.console.jobs` / :mod:`~privseg.console.worker` -- approved erasures run in a
  worker process, one per run at a time, reconciled with the erasure ledger after a restart;
* :mod:`~privseg.console.erasure` -- the one place that calls :mod:`privseg.erasure.federated`;
* :mod:`~privseg.console.folders` -- which folders under the root are runs, and their sites;
* :mod:`~privseg.console.runs` -- read-only views of runs and budgets, cut to a user's site;
* :mod:`~privseg.console.cache` -- what the pages read, kept until its file changes;
* :mod:`~privseg.console.svg` -- server-rendered figures.
"""

from privseg.console.app import create_app, serve

__all__ = ["create_app", "serve"]
