"""Empirical privacy audit of patient-level DP-SGD on the real site path: a lower bound on ε
from white-box gradient canaries, to set against the accounted ε.

Design (Nasr, Hayes, Steinke, Balle, Tramèr, Jagielski, Carlini & Terzis, "Tight Auditing of
Differentially Private Machine Learning", USENIX Security 2023):

* **Dirac canary.** A canary patient whose gradient is ``a e_j`` -- all of it on one
  coordinate ``j``, chosen where the site's other patients' gradients are smallest -- joins the
  site in the "in" world. Everything else is the site's real step:
  :func:`privseg.privacy.make_private` (plan, ledger, noise bound to the release's inputs,
  per-patient clipping) and AdamW. The attacker observes the privatised gradient as it enters
  the optimiser (the model is post-processing of it) and scores a trial by its coordinate ``j``
  in units of ``C / B``: ``N(b, σ²)`` out, ``N(b + 1, σ²)`` in.
* **Scoring.** The trials' scores go to :mod:`privseg.audit.epsilon` (Gaussian-DP and
  Clopper--Pearson lower bounds on ε, and the mechanism's exact ε by privacy loss distributions).

The arms (secret key, noise from the public seed, noise reused by a resume on the old code path,
an identical replay) are in ``benchmarks/dp_audit.py``; this module holds the canary site, with
unit tests in ``tests/audit/test_dp.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from privseg.errors import ConfigError
from privseg.privacy.engine import patient_groups

# -- the canary site ------------------------------------------------------------------------------

@dataclass
class DiracCanary:
    """A canary patient whose per-patient gradient is ``magnitude * e_j`` (before clipping) on
    flat coordinate ``coordinate`` of the model's trainable parameters."""

    patient: str
    coordinate: int
    magnitude: float

    def install(self, engine, items: Sequence[dict]) -> None:
        """Make ``engine`` (a :class:`~privseg.privacy.PatientDPSGD`) give the canary patient's
        contribution as the Dirac gradient, clipped like any patient's; the other patients' clipped
        sum is the engine's own."""
        if getattr(engine, "_canary", None) is not None:
            raise ConfigError("this engine already has a canary")
        engine._canary = self
        groups = patient_groups(items)
        ids = [str(items[g[0]].get("patient")) for g in groups]
        if self.patient not in ids:
            raise ConfigError(f"canary patient {self.patient} is not among the site's patients")
        original = engine._clipped_sum

        def clipped_sum(model, loss_fn, images, labels, owner, clip):
            chosen = _chosen_patients(engine, items, groups)
            canary_at = chosen.index(self.patient) if self.patient in chosen else None
            keep = owner != canary_at if canary_at is not None else torch.ones_like(owner, dtype=torch.bool)
            if bool(keep.any()):
                acc, norms, loss = original(model, loss_fn, images[keep], labels[keep], _renumber(owner[keep]), clip)
            else:
                params = [p for p in model.parameters() if p.requires_grad]
                acc, norms, loss = [torch.zeros_like(p) for p in params], torch.zeros(0, dtype=torch.float64), 0.0
            if canary_at is not None:
                scale = min(1.0, float(clip) / self.magnitude)
                _add_at(acc, self.coordinate, self.magnitude * scale)
                norms = torch.cat([norms.to(torch.float64), torch.tensor([self.magnitude], dtype=torch.float64)])
            return acc, norms, loss

        engine._clipped_sum = clipped_sum


def _chosen_patients(engine, items, groups) -> list[str]:
    """The patients the engine's Poisson sample holds at its current step (its own coins)."""
    coins = engine.noise.uniform("sample", engine.step_no, len(groups))
    return [str(items[g[0]].get("patient")) for g, c in zip(groups, coins, strict=True) if c < engine.q]


def _renumber(owner: torch.Tensor) -> torch.Tensor:
    _, inverse = torch.unique(owner, sorted=True, return_inverse=True)
    return inverse


def _add_at(tensors: Sequence[torch.Tensor], flat_index: int, value: float) -> None:
    offset = 0
    for t in tensors:
        if flat_index < offset + t.numel():
            t.view(-1)[flat_index - offset] += value
            return
        offset += t.numel()
    raise ConfigError(f"coordinate {flat_index} is past the model's {offset} parameters")


def quiet_coordinate(model: torch.nn.Module, grads: Sequence[torch.Tensor]) -> int:
    """The flat coordinate where the summed |gradient| of the other patients is smallest (where a
    Dirac canary stands out most), among the trainable parameters."""
    flat = torch.cat([g.detach().abs().reshape(-1) for g in grads])
    return int(torch.argmin(flat))


def observe_gradient(optimizer: torch.optim.Optimizer, coordinate: int) -> Callable[[], list[float]]:
    """Record coordinate ``coordinate`` of the gradient each time ``optimizer`` steps (the
    privatised gradient, before the optimiser's post-processing); returns a reader."""
    seen: list[float] = []

    def hook(opt, args, kwargs):
        params = [p for group in opt.param_groups for p in group["params"]]
        offset = 0
        for p in params:
            if coordinate < offset + p.numel():
                seen.append(float(p.grad.reshape(-1)[coordinate - offset]) if p.grad is not None else 0.0)
                return
            offset += p.numel()

    optimizer.register_step_pre_hook(hook)
    return lambda: list(seen)
