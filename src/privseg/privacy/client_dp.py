"""Client-level (site-level) DP-FedAvg at the server: the *site* is the protected unit.

McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (DP-FedAvg), with optional private adaptive clipping (Andrew et al., NeurIPS 2021):
each round the server

1. clips every site's update ``Delta_k = w_k - w`` to L2 norm ``C`` (all floating-point
   entries of the state dict, normalisation layers included),
2. averages them *uniformly* over the expected number of sites ``m = fraction * n_sites`` and
   adds ``N(0, (z_delta C / m)^2)`` per coordinate,
3. (adaptive) moves ``C`` by the noisy fraction of *unclipped* updates,
   ``C <- C exp(-eta (b_bar - gamma))``, ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``,
4. books the round as a Poisson-subsampled Gaussian ``(q = fraction, z)`` in the ledger
   (site key ``"server"``), refusing a round that would cross the budget.

What is booked is what happens: every site joins a round independently with probability
``q = fraction`` (:meth:`ClientLevelDP.select`), drawn from the server's secret key -- not
Flower's fixed-size sample from a public seed -- and a round with fewer sites than usual (none
included) still aggregates what came and adds the noise. Noise and sampling come from
``<run>/server_noise.key`` (:mod:`privseg.privacy.noise`); the trusted party for client-level
DP is the server itself (it sees every update), the protection is for whoever holds the model.

Why not Flower's ``DifferentialPrivacyServerSideAdaptiveClipping`` (flwr 1.41)? Its
``adaptive_clip_inputs_inplace`` returns ``norm_bit = scaling_factor < 1`` -- True for a
*clipped* update -- and then applies ``C *= exp(-lr (clipped_fraction - target))``: too many
clipped updates *shrink* C further, so C collapses toward 0 (Andrew et al.'s rule run backwards;
``benchmarks/privacy.py`` reproduces it with
:func:`privseg.federated.dp_strategy.flower_adaptive_clip_trace`). Its fixed-clipping sibling is
correct but weights and noises with Flower's own conventions and has no ledger.

This module is the mechanism only, on plain arrays (``{name: numpy array}``): it knows nothing of
Flower. Flower's idiom -- a strategy that wraps any strategy -- is
:class:`privseg.federated.dp_strategy.ClientLevelDPStrategy`, which samples the sites with
:meth:`ClientLevelDP.select`, hands each round's updates to :meth:`ClientLevelDP.clip_round`
(the ledger is checked there, before anything of the round is released) and the wrapped
strategy's average to :meth:`ClientLevelDP.release` (noise, clip update, ledger commit).

**With few sites it is useless**: the noise on the average has norm about
``z C sqrt(d) / m`` against a signal of at most ``C``; with m = 3 sites, d = 1.3 M parameters and
z ~ 1 that is a signal-to-noise ratio of ~ 3/1140. Patient-level DP-SGD inside each site
(:mod:`privseg.privacy.site`) averages over patients*steps instead; see README numbers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from privseg.errors import ConfigError
from privseg.privacy.accountant import StepEvent, calibrate_sigma, check_delta, check_epsilon
from privseg.privacy.budget import BudgetLedger
from privseg.privacy.clipping import Normalising, clip_factors, make_clipper
from privseg.privacy.noise import NoiseSource
from privseg.privacy.spec import dp_default

SERVER = "server"
Arrays = Mapping[str, np.ndarray]  # a model's state as {entry name: array}


def _floating(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def update_digest(arrays: Arrays) -> bytes:
    """SHA-256 of one (clipped) site update: every entry's name and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode() + np.ascontiguousarray(arrays[k]).tobytes())
    return h.digest()


class ClientLevelDP:
    """The DP-FedAvg mechanism of one run. Give ``noise_multiplier`` or a budget (``epsilon``,
    ``delta``, ``rounds``) to calibrate it. Per round: :meth:`select` the sites, :meth:`clip_round`
    their updates, average them (uniformly), :meth:`release` the average."""

    def __init__(self, *, n_sites: int, fraction: float = 1.0, clip: str = dp_default("clip"),
                 clip_norm: float = dp_default("clip_norm"), noise_multiplier: float | None = None,
                 epsilon: float | None = None, delta: float = dp_default("delta"), rounds: int | None = None,
                 target_quantile: float = dp_default("target_quantile"), clip_lr: float = dp_default("clip_lr"),
                 sigma_b: float | None = None, ledger: BudgetLedger | None = None, noise: NoiseSource | None = None,
                 allow_large_delta: bool = dp_default("allow_large_delta")):
        if n_sites < 1:
            raise ConfigError("client-level DP needs at least one site")
        self.n_sites = n_sites
        self.q = float(fraction)
        self.m = max(self.q * n_sites, 1e-9)
        check_delta(delta, n_sites, allow_large_delta)
        self.delta = float(delta)
        if noise_multiplier is None:
            if epsilon is None or rounds is None:
                raise ConfigError("client-level DP: give noise_multiplier, or epsilon and rounds to calibrate it")
            noise_multiplier = calibrate_sigma(check_epsilon(epsilon), delta, self.q, int(rounds), what="server")
        self.z = float(noise_multiplier)
        self.epsilon_budget = float(epsilon) if epsilon is not None else math.inf
        self.clipper = make_clipper(clip, clip_norm, self.m, self.z,
                                    {"target_quantile": target_quantile, "clip_lr": clip_lr, "sigma_b": sigma_b})
        self.z_update = self.clipper.update_noise_multiplier(self.z)
        self.clip_norm = float(clip_norm)
        self.ledger = ledger
        if ledger is not None:
            wanted = self.epsilon_budget if math.isfinite(self.epsilon_budget) else 1e9
            if not ledger.has_budget(SERVER):
                ledger.set_budget(SERVER, wanted, self.delta)
            else:  # the ledger's budget stands: it changes only through `privseg privacy budget` (recorded)
                self.epsilon_budget, booked_delta = ledger.budget(SERVER)
                if booked_delta != self.delta:
                    raise ConfigError(f"{ledger.path}: the run's delta is {booked_delta:g}, not {self.delta:g}; "
                                      "a resume keeps the privacy spec it was started with")
        self.noise = noise if noise is not None else NoiseSource.ephemeral()
        self.norms: list[float] = []
        self.history: list[dict] = []
        self.release_fingerprint: str | None = None  # the fingerprint of the round being released
        self._glob: dict[str, np.ndarray] = {}  # the round's global model (what the updates are taken against)
        self._k = 0  # the round's number of clipped updates
        self._round_noise: NoiseSource | None = None

    @property
    def clip(self) -> float:
        return float(self.clipper.clip)

    @property
    def scale(self) -> float | Normalising:
        """What scales a site's update: the clip (``min(1, C/||u||)``), or the normalising rule's
        ``C u / (||u|| + gamma)`` (Bu et al. 2023); either way the update's norm stays below C."""
        return getattr(self.clipper, "scale", self.clip)

    def select(self, server_round: int, node_ids: Sequence[int]) -> list[int]:
        """Poisson sampling of sites: each joins independently with probability ``q`` (secret coins)."""
        nodes = sorted(node_ids)
        coins = self.noise.uniform("sites", server_round, len(nodes))
        return [n for n, c in zip(nodes, coins, strict=True) if c < self.q]

    def check(self, server_round: int, release: str | None = None) -> float:
        """The ledger's check of the round (raises :class:`~privseg.errors.BudgetExceededError`
        when it would cross the budget); NaN without a ledger."""
        if self.ledger is None:
            return math.nan
        return self.ledger.check_round(SERVER, server_round, [StepEvent(self.q, self.z, 1)], release=release)

    def clip_round(self, server_round: int, glob: Arrays, updates: Sequence[Arrays]) -> list[dict[str, np.ndarray]]:
        """The round's site models ``updates`` (each a full model, as the site returned it) with
        every update ``w_k - glob`` scaled to norm <= C over the floating-point entries (the others
        are kept as sent). Then, before anything of the round is released, the ledger checks it,
        and the round's noise is bound to every input of its release (the global model, the clipped
        updates, the clip): a round re-run with anything else draws fresh noise."""
        self._glob = {k: np.asarray(v) for k, v in glob.items()}
        self.norms, self._k = [], len(updates)
        clip = self.clip
        clipped = []
        for arrays in updates:
            keys = [k for k in arrays if _floating(arrays[k])]
            deltas = {k: arrays[k].astype(np.float64) - self._glob[k] for k in keys}
            norm = math.sqrt(sum(float((d ** 2).sum()) for d in deltas.values()))
            self.norms.append(norm)
            factor = float(clip_factors(torch.tensor([norm], dtype=torch.float64), self.scale)[0])
            out = {k: np.ascontiguousarray(arrays[k]) for k in arrays}
            for k in keys:
                out[k] = np.ascontiguousarray((self._glob[k] + factor * deltas[k]).astype(arrays[k].dtype))
            clipped.append(out)
        self._open(server_round, clipped, clip)
        return clipped

    def _open(self, server_round: int, clipped: Sequence[Arrays], clip: float) -> None:
        self.release_fingerprint = self.release_id(server_round, self._glob, clipped, clip)
        self.check(server_round, self.release_fingerprint)  # before anything of this round is released
        self._round_noise = self.noise.bound(self.release_fingerprint)

    @staticmethod
    def release_id(server_round: int, glob: Arrays, clipped: Sequence[Arrays], clip: float) -> str:
        """SHA-256 (hex) of every input of a round's release; the order the updates came in does not matter."""
        h = hashlib.sha256(f"privseg-server-release-v1|{server_round}|{clip!r}".encode())
        for k in sorted(glob):
            h.update(k.encode() + np.ascontiguousarray(glob[k]).tobytes())
        for digest in sorted(update_digest(u) for u in clipped):
            h.update(digest)
        return h.hexdigest()

    def release(self, server_round: int, averaged: Arrays) -> dict[str, np.ndarray]:
        """The round's model to release: ``averaged`` (the uniform average of the clipped updates,
        or the global model when none came) re-weighted from the ``k`` updates that came to the
        expected ``m`` (DP-FedAvg divides the clipped sum by m) plus ``N(0, (z_delta C / m)^2)`` per
        floating-point coordinate; then the clip moves (adaptive) and the ledger books the round."""
        names = list(averaged)
        sizes = [averaged[k].size for k in names if _floating(averaged[k])]
        if self._round_noise is None:  # no clip_round: the release's only input is the global model
            self._glob, self._k, self.norms = {k: np.asarray(averaged[k]) for k in names}, 0, []
            self._open(server_round, [], self.clip)
        source, self._round_noise = self._round_noise, None
        draws = source.gaussian("update", server_round, sum(sizes)).numpy()
        offset = 0
        clip = self.clip
        out = {}
        for k in names:
            a = averaged[k]
            if _floating(a):
                g = self._glob.get(k)
                if g is not None and self._k:  # FedAvg divided the clipped sum by k; DP-FedAvg divides by m
                    a = g + (self._k / self.m) * (a.astype(np.float64) - g)
                noise = draws[offset:offset + a.size].reshape(a.shape) * (self.z_update * clip / self.m)
                offset += a.size
                a = (a + noise).astype(a.dtype)
            out[k] = np.ascontiguousarray(a)
        self.clipper.update(self.norms, draw=float(source.gaussian("count", server_round, 1)[0]))
        eps = math.nan
        if self.ledger is not None:
            eps = self.ledger.commit_round(SERVER, server_round, [StepEvent(self.q, self.z, 1)],
                                           info={"clip": self.clip, "noise": self.noise.kind},
                                           release=self.release_fingerprint)
        self.history.append({"round": server_round, "clip": clip, "norms": list(self.norms), "epsilon": eps})
        return out


__all__ = ["SERVER", "ClientLevelDP", "update_digest"]
