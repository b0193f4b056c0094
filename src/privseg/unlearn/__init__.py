"""Subject-level machine unlearning: strategies (one registry, one signature) and the engine
(forget set -> unlearned checkpoint + report). A forget request recorded in a ledger, federated
or central, is :mod:`privseg.erasure`'s."""

from privseg.unlearn.engine import TARGETS, UnlearnResult, parse_ids, report_rows, unlearn
from privseg.unlearn.strategies import STRATEGIES, Strategy, UnlearnContext, get_strategy, register, run_loop

__all__ = ["STRATEGIES", "TARGETS", "Strategy", "UnlearnContext", "UnlearnResult", "get_strategy", "parse_ids",
           "register", "report_rows", "run_loop", "unlearn"]
