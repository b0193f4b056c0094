"""Audits: membership inference for segmentation (patient level)."""

from privseg.audit.mia import (
    MIAResult,
    auc,
    audit_checkpoint,
    audit_items,
    bootstrap_auc,
    calibrate,
    subject_statistics,
)

__all__ = ["MIAResult", "audit_checkpoint", "audit_items", "auc", "bootstrap_auc", "calibrate", "subject_statistics"]
