"""A forget request: erasure of a patient or a whole site from a federated run (or of patients
from a centrally trained model), each stage recorded in the run's erasure ledger, verified, and
closed with the record a certificate is written from.

:func:`erase` is the entry point of a federated request (:mod:`privseg.erasure.federated`);
:func:`privseg.erasure.central.erase_central` the one of a central request. The unlearning itself
is :mod:`privseg.unlearn`'s. Importing the package registers the site erasure methods shipped
(:mod:`privseg.erasure.site`) in :data:`SITE_ERASERS`.
"""

from privseg.erasure.federated import erase
from privseg.erasure.request import (
    DEFAULT_THRESHOLDS,
    KINDS,
    LEDGER,
    SITE_ERASERS,
    ErasureRequest,
    ErasureResult,
    Thresholds,
    default_method,
    site_eraser,
    validate,
    whole_patients,
)
from privseg.erasure.verification import retry_advice

__all__ = ["DEFAULT_THRESHOLDS", "KINDS", "LEDGER", "SITE_ERASERS", "ErasureRequest", "ErasureResult", "Thresholds",
           "default_method", "erase", "retry_advice", "site_eraser", "validate", "whole_patients"]
