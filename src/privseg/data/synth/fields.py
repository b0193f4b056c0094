"""Smooth random fields and per-subject random streams for the embedded cohort.

A field is control-point noise interpolated by cubic splines; on a product grid (the whole
volume, or one axial slice of it) it is a cheap tensor product, so a slice gets exactly the
values the full volume has there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.special import ndtri


def _axis_weights(coords: np.ndarray, size: int, n_ctrl: int) -> np.ndarray:
    """Cubic-spline weights (len(coords), n_ctrl) mapping control points spread over [0, size-1]
    to the given coordinates. A field is then a tensor product: cheap on any product grid."""
    u = np.asarray(coords, np.float64) / max(size - 1, 1) * (n_ctrl - 1)
    if n_ctrl < 4:
        return np.stack([np.interp(u, np.arange(n_ctrl), row) for row in np.eye(n_ctrl)], axis=1)
    return CubicSpline(np.arange(n_ctrl), np.eye(n_ctrl), bc_type="natural")(u)


def control_points(size: int, spacing_vox: float) -> int:
    """Control points along an axis of ``size`` voxels, about ``spacing_vox`` apart (at least 4)."""
    return max(4, int(math.ceil((size - 1) / spacing_vox)) + 1)


class Grid:
    """A product grid of output voxel coordinates: the full volume, or one axial slice of it."""

    def __init__(self, size: int, axes: Sequence[np.ndarray]):
        self.size = size
        self.axes = [np.asarray(a, np.float64) for a in axes]
        self.shape = tuple(len(a) for a in self.axes)
        self._weights: dict[tuple[int, int], np.ndarray] = {}

    def field(self, ctrl: np.ndarray) -> np.ndarray:
        """Evaluate control-point noise (..., gx, gy, gz) on the grid as a tensor product of spline weights."""
        gs = ctrl.shape[-3:]
        wx, wy, wz = (self._weight(k, g) for k, g in enumerate(gs))
        lead = ctrl.shape[:-3]
        flat = ctrl.reshape((-1,) + gs).astype(np.float64)
        out = np.einsum("nabc,ia->nibc", flat, wx)
        out = np.einsum("nibc,jb->nijc", out, wy)
        out = out @ wz.T  # the one large contraction; float64 keeps it reproducible to float32 precision
        return out.reshape(lead + self.shape).astype(np.float32)

    def _weight(self, axis: int, n_ctrl: int) -> np.ndarray:
        if (axis, n_ctrl) not in self._weights:
            self._weights[(axis, n_ctrl)] = _axis_weights(self.axes[axis], self.size, n_ctrl)
        return self._weights[(axis, n_ctrl)]

    def mesh(self) -> list[np.ndarray]:
        return [a.reshape([-1 if k == j else 1 for k in range(3)]) for j, a in enumerate(self.axes)]


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """The 3x3 rotation Rz @ Ry @ Rx for angles (x, y, z) in degrees."""
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def subject_rng(seed: int, site: int, subject: int, stream: int = 0) -> np.random.Generator:
    """The random stream ``stream`` of one subject: independent of every other subject's and stream's."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, site, subject, stream]))


def normal_quantile(q: float) -> float:
    """The standard normal quantile of ``q`` (clipped away from 0 and 1)."""
    return float(ndtri(min(max(q, 1e-9), 1 - 1e-9)))
