"""Error types. Every bad input raises a :class:`PrivsegError` subclass whose
message names the file or argument and what is wrong; the CLI prints it on one
line and exits with code 2."""

from __future__ import annotations

import re


class PrivsegError(Exception):
    """Base class for every error privseg raises on purpose."""


class DataError(PrivsegError):
    """A data file or folder is missing, unreadable or inconsistent."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(PrivsegError):
    """An argument or configuration value is invalid."""


class CheckpointError(PrivsegError):
    """A checkpoint is missing, corrupt or does not fit the model asked for."""


class StorageError(PrivsegError):
    """A file could not be written because its disk is full (nothing was replaced)."""


class BudgetExceededError(PrivsegError):
    """Training would spend more privacy budget than a site allows."""


class SiteFailure(PrivsegError):
    """A site's ClientApp failed. Flower's error reply carries only a reason text, so the site's ID
    goes into it as ``[site ID]``: the server's round record then names the hospital, not its
    Flower node. The tag is in the message itself because Ray's simulation wraps the exception in
    its own (``ClientAppException``) and keeps only the message."""

    TAG = re.compile(r"\[site ([^\]\s]+)\] ")

    def __init__(self, site: str, exc: BaseException, withhold: bool = False):
        # under DP the text of an error may quote a patient's data or figures: only its class leaves
        detail = " (details withheld under DP: see the site's site_errors.log)" if withhold else f": {exc}"
        super().__init__(f"[site {site}] {type(exc).__name__}{detail}")
        self.site = site

    @classmethod
    def site_in(cls, reason: str) -> str | None:
        """The site an error reply's ``reason`` names, or None."""
        m = cls.TAG.search(reason)
        return m.group(1) if m else None
