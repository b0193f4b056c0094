"""Does the CT window suit the task? A check made before training on CT.

CT intensities are mapped to [0, 1] through the task's window (:func:`privseg.data.transforms.ct_window`,
default -200..300 HU, soft tissue) with clipping. A window that misses the structures to segment
leaves the model nothing to see: voxels outside it are clipped to one value, and classes whose
intensities differ by a few HU inside a wide window differ by a few hundredths after scaling (head
CT under the soft-tissue window: test Dice 0.03 where the brain window 0,80 gave 0.92 in the same
60 steps, issue 27). :func:`window_fit` measures the foreground voxels of the training labels
against the window; :func:`window_warning` says what is wrong and which window would hold them.

Under differential privacy the window is a public setting, like the architecture: a window read off
the training patients' intensities is a data-dependent choice that the privacy guarantee does not
cover. The warning then says so and suggests no data-derived window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privseg.data.transforms import ct_window, load_subject

SAMPLE_SUBJECTS = 16  # subjects read for the check (evenly spread): enough for the statistics, cheap on big cohorts
SAMPLE_VOXELS = 200_000  # foreground voxels kept per subject
NARROW = 0.05  # half the foreground voxels within this share of the window's width: little contrast left
MARGIN_HU = 50.0  # a suggested window reaches at least this far past the middle half of the foreground
PUBLIC_WINDOWS = "0,80 for brain, -1000,1000 for the whole head, -1000,400 for lung, -200,300 for soft tissue"


@dataclass(frozen=True)
class WindowFit:
    """Where the foreground voxels of the training labels lie against a CT window (HU)."""

    window: tuple[float, float]
    inside: float  # share of the foreground voxels inside the window
    middle: tuple[float, float]  # 25th and 75th percentile of the foreground voxels: where half of them lie
    suggested: tuple[float, float]  # a window around that middle half, with a margin, in steps of 10 HU
    subjects: int  # CT subjects read

    @property
    def outside(self) -> bool:
        """Most foreground voxels fall outside the window (clipped to 0 or 1)."""
        return self.inside < 0.5

    @property
    def squeezed(self) -> bool:
        """Half the foreground voxels take up less than :data:`NARROW` of the window's width, and the
        window is more than twice as wide as the suggested one (which is therefore never squeezed:
        a tissue a few HU wide is not narrower than any sensible window)."""
        width = self.window[1] - self.window[0]
        return (self.middle[1] - self.middle[0] < NARROW * width
                and width > 2 * (self.suggested[1] - self.suggested[0]))


def window_fit(cohort, subjects: Sequence | None = None) -> WindowFit | None:
    """Measure the CT subjects among ``subjects`` (default: the cohort's training subjects) that
    have a label against the cohort's CT window; None when there is none."""
    chosen = [s for s in (cohort.select("train") if subjects is None else subjects)
              if s.modality.upper() == "CT" and s.label]
    if not chosen:
        return None
    if len(chosen) > SAMPLE_SUBJECTS:
        chosen = [chosen[k] for k in np.linspace(0, len(chosen) - 1, SAMPLE_SUBJECTS).round().astype(int)]
    rng = np.random.default_rng(0)
    parts = []
    for s in chosen:
        data = load_subject(s, cohort)
        v = data.image.numpy()[:, data.label[0].numpy() > 0].ravel()
        parts.append(rng.choice(v, SAMPLE_VOXELS, replace=False) if v.size > SAMPLE_VOXELS else v)
    values = np.concatenate(parts)
    lo, hi = ct_window(cohort)
    # the middle half, not the extremes: a label's edge voxels mix with air or bone (partial volume)
    q25, q75 = (float(x) for x in np.percentile(values, [25, 75]))
    margin = max(MARGIN_HU, q75 - q25)
    return WindowFit(window=(lo, hi), inside=float(np.mean((values >= lo) & (values <= hi))), middle=(q25, q75),
                     suggested=(10 * math.floor((q25 - margin) / 10), 10 * math.ceil((q75 + margin) / 10)),
                     subjects=len(chosen))


def window_warning(fit: WindowFit | None, *, private: bool, how: str) -> str | None:
    """The warning for a window that does not suit the foreground (None when it does). ``how``
    says how this command sets the window, with ``{lo}`` and ``{hi}`` for a suggested one
    (e.g. ``"--ct-window {lo},{hi}"``); ``private``: a DP run, where the window is a public setting."""
    if fit is None or not (fit.outside or fit.squeezed):
        return None
    lo, hi = fit.window
    where = f"the foreground voxels of the training labels ({fit.subjects} CT subject(s))"
    if fit.outside:
        problem = (f"{1 - fit.inside:.0%} of {where} lie outside the CT window {lo:g},{hi:g} HU, where intensities "
                   "are clipped: the model cannot see them")
    else:
        a, b = fit.middle
        problem = (f"half of {where} lie within {a:.0f}..{b:.0f} HU, {(b - a) / (hi - lo):.0%} of the {hi - lo:g} "
                   f"HU wide CT window {lo:g},{hi:g}: scaled to [0, 1], they differ by hundredths and the model "
                   "sees almost no contrast")
    if private:
        return (f"{problem}. Under differential privacy the window is a public setting: choose it from what is "
                f"known of the task (e.g. {PUBLIC_WINDOWS}), not from these patients' intensities (a window read "
                "off the training data is not covered by the privacy guarantee), and set it with "
                + how.format(lo="LO", hi="HI"))
    a, b = fit.suggested
    return f"{problem}. The window {a:g},{b:g} would hold them: " + how.format(lo=f"{a:g}", hi=f"{b:g}")


def check_window(cohort, subjects: Sequence | None = None, *, private: bool, how: str) -> str | None:
    """:func:`window_warning` of :func:`window_fit`: the warning for ``cohort``'s CT window, or None."""
    return window_warning(window_fit(cohort, subjects), private=private, how=how)
