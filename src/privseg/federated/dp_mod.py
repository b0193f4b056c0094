"""The ClientApp's DP mod: under DP a failed site tells the server its error's class, nothing more.

A mod in Flower's idiom (flwr 1.41's ``fixedclipping_mod``, ``LocalDpMod``): a function
``(msg, context, call_next) -> reply`` that Flower wraps around the ClientApp's train handler
(:func:`privseg.federated.client_app.make_client_app` installs it). The handler's errors leave the
site as :class:`~privseg.errors.SiteFailure` (``[site H1] DataError: <text>``); the text of an
error may quote a patient's data or figures (a value, a path, a shape), so when the run
configuration carries a privacy spec (:func:`privseg.federated.private.under_dp`, patient- or
site-level) the mod keeps the whole error in the site's ``site_errors.log`` (for its own
operators) and lets only ``[site H1] DataError (details withheld under DP ...)`` go. A budget
refusal (:class:`~privseg.errors.BudgetExceededError`) holds only ledger figures and leaves whole:
the server stops the run on it (docs/privacy.md, "What leaves a site").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from privseg.errors import BudgetExceededError, SiteFailure
from privseg.federated.private import under_dp

SITE_ERROR_LOG = "site_errors.log"
StateDirOf = Callable[[Message, Context], Path]  # the state folder of the site a message is for


def log_site_error(state_dir: Path, server_round: int, exc: BaseException) -> None:
    """The whole error, for the site's own operators (the server gets its class and the site ID)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / SITE_ERROR_LOG, "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} round {server_round}: {type(exc).__name__}: {exc}\n")


def withhold_errors_mod(state_dir_of: StateDirOf) -> Mod:
    """The mod (module docstring); ``state_dir_of`` finds the site's state folder, where the log goes."""

    def withhold_errors(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            return call_next(msg, context)
        except SiteFailure as failure:
            cause = failure.__cause__
            config = msg.content["config"]
            if cause is None or not under_dp(config) or isinstance(cause, BudgetExceededError):
                raise
            log_site_error(state_dir_of(msg, context), int(config.get("server-round", 0)), cause)
            raise SiteFailure(failure.site, cause, withhold=True) from cause

    return withhold_errors
