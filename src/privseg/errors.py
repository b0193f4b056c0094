"""Error types. Every bad input raises a :class:`PrivsegError` subclass whose
message names the file or argument and what is wrong; the CLI prints it on one
line and exits with code 2."""

from __future__ import annotations


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


class BudgetExceededError(PrivsegError):
    """Training would spend more privacy budget than a site allows."""


class SiteFailure(PrivsegError):
    """A site's ClientApp failed. Flower's error reply carries only a reason text, so the site's ID
    goes into it: the server's round record then names the hospital, not its Flower node."""

    PREFIX = "site "

    def __init__(self, site: str, exc: BaseException):
        super().__init__(f"{self.PREFIX}{site}: {type(exc).__name__}: {exc}")
        self.site = site
