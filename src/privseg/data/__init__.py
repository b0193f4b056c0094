"""Cohorts, readers for published layouts, validation, the embedded cohort, transforms."""

from privseg.data.cohort import Cohort, Subject, assign_splits
from privseg.data.transforms import PatchSampler, load_preprocessed, load_subject, preprocess

__all__ = ["Cohort", "PatchSampler", "Subject", "assign_splits", "load_preprocessed", "load_subject", "preprocess"]
