"""Cohorts, readers for published layouts, validation, the embedded cohort, transforms."""

from privseg.data.cohort import Cohort, Subject, apply_splits, assign_splits, read_splits, write_splits
from privseg.data.transforms import PatchSampler, load_preprocessed, load_subject, preprocess

__all__ = ["Cohort", "PatchSampler", "Subject", "apply_splits", "assign_splits", "load_preprocessed", "load_subject",
           "preprocess", "read_splits", "write_splits"]
