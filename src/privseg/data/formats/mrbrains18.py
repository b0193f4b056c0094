"""MRBrainS18: ``<root>/<id>/pre/{reg_T1,reg_IR,FLAIR}.nii.gz`` + ``<root>/<id>/segm.nii.gz``."""

from __future__ import annotations

from pathlib import Path

from privseg.data.cohort import Cohort, Subject
from privseg.data.formats.common import DEFAULT_SITE, checked_id, finish_cohort, note_problem, require_dir, visible
from privseg.data.validate import read_volume
from privseg.errors import ConfigError, DataError

MRBRAINS18_CHANNELS = {"T1": "pre/reg_T1.nii.gz", "IR": "pre/reg_IR.nii.gz", "FLAIR": "pre/FLAIR.nii.gz"}
MRBRAINS18_LABEL = "segm.nii.gz"
MRBRAINS18_CLASSES = [
    "background",
    "cortical_gray_matter",
    "basal_ganglia",
    "white_matter",
    "white_matter_lesions",
    "cerebrospinal_fluid",
    "ventricles",
    "cerebellum",
    "brainstem",
    "infarction",
    "other",
]
TISSUE_CLASSES = ["background", "CSF", "GM", "WM"]
# The MRBrainS13-style 3-tissue scheme, which MRBrainS18 also evaluates:
#   GM  = cortical GM (1) + basal ganglia (2)
#   WM  = white matter (3) + white-matter lesions (4) — lesions lie inside WM and were WM in MRBrainS13
#   CSF = extracerebral CSF (5) + ventricles (6)
# Cerebellum (7) and brainstem (8) are excluded from the 3-tissue evaluation, as in MRBrainS13
# (their GM and WM are not delineated separately, so they cannot be split into tissues), and
# infarction (9) and "other" lesions (10) are pathology, not a tissue class; all four become
# background. The loss then trains them as "not one of the three tissues", which is what the
# 3-class task scores (privseg's losses have no ignore label); merge_tissues=False keeps all 11.
MRBRAINS18_TISSUE_MAP = {0: 0, 1: 2, 2: 2, 3: 3, 4: 3, 5: 1, 6: 1, 7: 0, 8: 0, 9: 0, 10: 0}


def _has_mrbrains18(root: Path) -> bool:
    return any(d.is_dir() and any((d / rel).is_file() for rel in MRBRAINS18_CHANNELS.values()) for d in visible(root))


def is_mrbrains18_subject(folder: Path) -> bool:
    """Whether ``folder`` is one MRBrainS18 subject (it holds a pre/ channel file)."""
    return any((folder / rel).is_file() for rel in MRBRAINS18_CHANNELS.values())


def is_mrbrains18(root: Path) -> bool:
    """Whether ``root`` holds MRBrainS18 subject folders, directly or in training/."""
    # the release archive unpacks to <root>/training/<id>/...: accept its root too
    return _has_mrbrains18(root) or _has_mrbrains18(root / "training")


def read_mrbrains18(
    root: str | Path,
    merge_tissues: bool = True,
    labels: str = "auto",
    site: str = DEFAULT_SITE,
    seed: int = 0,
    val_fraction: float = 0.0,
    test_fraction: float = 0.25,
) -> Cohort:
    """MRBrainS18 training data (7 subjects from one 3T scanner, hence one site by default).

    ``labels`` says what ``segm.nii.gz`` holds: ``"mrbrains18"`` (the 11 published labels),
    ``"tissues"`` (already background/CSF/GM/WM, as privseg's synthetic cohort writes it), or
    ``"auto"``: read the first subject's label and take it as tissues when its largest value
    is at most 3 — a real MRBrainS18 segmentation always contains cerebellum and brainstem
    (7, 8). With ``merge_tissues`` the 11 labels are mapped to tissues at load time
    (``info["label_map"]``, see ``MRBRAINS18_TISSUE_MAP`` for the mapping and why).
    Channels are T1, IR, FLAIR as present; every subject must have the same ones. ``root`` may
    also be the release's root, which holds the subject folders in ``training/``."""
    root = require_dir(root)
    if labels not in ("auto", "mrbrains18", "tissues"):
        raise ConfigError(f"labels={labels!r}: choose auto, mrbrains18 or tissues")
    site = checked_id(site, root, "site ID")
    given = root
    if not _has_mrbrains18(root) and _has_mrbrains18(root / "training"):
        root = root / "training"
    folders = [d for d in visible(root) if d.is_dir() and ((d / "pre").is_dir() or (d / MRBRAINS18_LABEL).exists())]
    if not folders:
        from privseg.data.formats import layout_hint  # why: the hint consults the registry, which imports this module

        hint = f" ({layout_hint(root)})" if layout_hint(root) else ""
        raise DataError(root, f"no MRBrainS18 subject folders (<id>/pre/ and <id>/segm.nii.gz) found{hint}")
    present = [c for c, rel in MRBRAINS18_CHANNELS.items() if any((d / rel).is_file() for d in folders)]
    if not present:
        raise DataError(root, f"no subject has any of {', '.join(MRBRAINS18_CHANNELS.values())}")
    subjects = []
    for d in folders:
        try:
            subjects.append(_mrbrains18_subject(d, present, site))
        except DataError as exc:
            note_problem(exc)
    if not subjects:
        raise DataError(root, "no MRBrainS18 subject could be read")
    scheme = labels
    if scheme == "auto":
        top = int(read_volume(subjects[0].label, is_label=True).array.max())
        scheme = "tissues" if top <= len(TISSUE_CLASSES) - 1 else "mrbrains18"
    info: dict = {"label_scheme": scheme}
    if scheme == "tissues":
        classes = list(TISSUE_CLASSES)
    elif merge_tissues:
        classes = list(TISSUE_CLASSES)
        info.update(label_scheme="mrbrains18->tissues", label_map=dict(MRBRAINS18_TISSUE_MAP))
    else:
        classes = list(MRBRAINS18_CLASSES)
    return finish_cohort(
        subjects,
        root,
        classes=classes,
        channels=present,
        fmt="mrbrains18",
        name=given.name,
        info=info,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )


def _mrbrains18_subject(d: Path, present: list[str], site: str) -> Subject:
    sid = checked_id(d.name, d)
    images = []
    for chan in present:
        path = d / MRBRAINS18_CHANNELS[chan]
        if not path.is_file():
            raise DataError(
                path,
                f"{chan} channel missing for subject {sid} (other subjects have it; all need the same channels)",
            )
        images.append(str(path))
    label = d / MRBRAINS18_LABEL
    if not label.is_file():
        raise DataError(label, f"label missing for subject {sid}")
    return Subject(id=sid, site=site, images=tuple(images), label=str(label), modality="MR")

