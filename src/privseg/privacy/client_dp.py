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
``benchmarks/privacy.py`` reproduces it). Its fixed-clipping sibling is correct but weights
and noises with Flower's own conventions and has no ledger; this module implements both modes
on privseg's strategy hooks (``update_hooks`` / ``aggregate_hooks``), so it composes with
FedAvg, FedProx and FedBN.

**With few sites it is useless**: the noise on the average has norm about
``z C sqrt(d) / m`` against a signal of at most ``C``; with m = 3 sites, d = 1.3 M parameters and
z ~ 1 that is a signal-to-noise ratio of ~ 3/1140. Patient-level DP-SGD inside each site
(:mod:`privseg.privacy.dpsgd`) averages over patients*steps instead; see README numbers.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from privseg.errors import BudgetExceededError, ConfigError
from privseg.privacy.accountant import StepEvent, calibrate_sigma, check_delta, check_epsilon
from privseg.privacy.clipping import Normalising, clip_factors, make_clipper
from privseg.privacy.noise import NoiseSource
from privseg.privacy.spec import CLIP

SERVER = "server"


def flower_adaptive_clip_trace(norms: np.ndarray, rounds: int, clip: float = 1.0, lr: float = 0.2,
                               target: float = 0.5, seed: int = 0) -> list[float]:
    """Flower 1.41's adaptive-clipping *update rule* (``norm_bit = clipped``, then
    ``C *= exp(-lr (clipped_fraction - target))``) on i.i.d. draws from ``norms``, noise-free.
    For the benchmark/test showing the clipped-count rule diverges."""
    from flwr.supercore.differential_privacy import adaptive_clip_inputs_inplace

    rng = np.random.default_rng(seed)
    trace = []
    for _ in range(rounds):
        sample = rng.choice(norms, size=min(len(norms), 10))
        bits = [adaptive_clip_inputs_inplace([np.array([n], dtype=np.float64)], clip) for n in sample]
        frac = float(np.mean(bits))
        clip *= math.exp(-lr * (frac - target))
        trace.append(clip)
    return trace


class ClientLevelDP:
    """DP-FedAvg hooks for a privseg strategy. Give ``noise_multiplier`` or a budget
    (``epsilon``, ``delta``, ``rounds``) to calibrate it."""

    def __init__(self, *, n_sites: int, fraction: float = 1.0, clip: str = CLIP, clip_norm: float = 1.0,
                 noise_multiplier: float | None = None, epsilon: float | None = None, delta: float = 1e-5,
                 rounds: int | None = None, target_quantile: float = 0.5, clip_lr: float = 0.2,
                 sigma_b: float | None = None, ledger=None, noise: NoiseSource | None = None,
                 allow_large_delta: bool = False):
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
        self._k = 0
        self.release: str | None = None  # the fingerprint of the round being released
        self._round_noise: NoiseSource | None = None

    @property
    def clip(self) -> float:
        return float(self.clipper.clip)

    @property
    def _scale(self) -> float | Normalising:
        """What scales a site's update: the clip (``min(1, C/||u||)``), or the normalising rule's
        ``C u / (||u|| + gamma)`` (Bu et al. 2023); either way the update's norm stays below C."""
        return getattr(self.clipper, "scale", self.clip)

    def attach(self, strategy) -> None:
        strategy.update_hooks.append(self.clip_updates)
        strategy.aggregate_hooks.append(self.add_noise)
        strategy.node_selector = self.select

    def select(self, server_round: int, node_ids: list[int]) -> list[int]:
        """Poisson sampling of sites: each joins independently with probability ``q`` (secret coins)."""
        nodes = sorted(node_ids)
        coins = self.noise.uniform("sites", server_round, len(nodes))
        return [n for n, c in zip(nodes, coins, strict=True) if c < self.q]

    def check(self, server_round: int, release: str | None = None) -> float:
        if self.ledger is None:
            return math.nan
        return self.ledger.check_round(SERVER, server_round, [StepEvent(self.q, self.z, 1)], release=release)

    # update hook: (round, replies, global) -> replies
    def clip_updates(self, server_round: int, replies, global_arrays: ArrayRecord):
        glob = {k: global_arrays[k].numpy() for k in global_arrays.keys()}
        self._glob = glob
        self.norms, self._k = [], len(replies)
        clip = self.clip
        for msg in replies:
            name = next(iter(msg.content.array_records))
            arrays = msg.content[name]
            keys = [k for k in arrays.keys() if np.issubdtype(arrays[k].numpy().dtype, np.floating)]
            deltas = {k: arrays[k].numpy().astype(np.float64) - glob[k] for k in keys}
            norm = math.sqrt(sum(float((d ** 2).sum()) for d in deltas.values()))
            self.norms.append(norm)
            factor = float(clip_factors(torch.tensor([norm], dtype=torch.float64), self._scale)[0])
            out = {k: Array(np.ascontiguousarray(arrays[k].numpy())) for k in arrays.keys()}
            for k in keys:
                out[k] = Array(np.ascontiguousarray((glob[k] + factor * deltas[k]).astype(arrays[k].numpy().dtype)))
            msg.content[name] = ArrayRecord(out)
            for rec in msg.content.metric_records.values():  # uniform average: every site weighs 1
                if "num-examples" in rec:
                    rec["num-examples"] = 1
        # the round's noise is bound to every input of its release (the global model, the clipped
        # updates, the clip): a round re-run with anything else draws fresh noise
        self.release = self._release_id(server_round, glob, replies, clip)
        self.check(server_round, self.release)  # before anything of this round is released
        self._round_noise = self.noise.bound(self.release)
        return replies

    @staticmethod
    def _release_id(server_round: int, glob: dict, replies, clip: float) -> str:
        h = hashlib.sha256(f"privseg-server-release-v1|{server_round}|{clip!r}".encode())
        for k in sorted(glob):
            h.update(k.encode() + np.ascontiguousarray(glob[k]).tobytes())
        for digest in sorted(_update_digest(msg) for msg in replies):  # order of arrival does not matter
            h.update(digest)
        return h.hexdigest()

    # aggregate hook: (round, averaged arrays) -> arrays
    def add_noise(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        glob_keys = list(arrays.keys())
        sizes = [arrays[k].numpy().size for k in glob_keys if np.issubdtype(arrays[k].numpy().dtype, np.floating)]
        source = self._round_noise
        if source is None:  # nobody sampled: the release's only input is the global model (``arrays``)
            self._glob, self._k = {k: arrays[k].numpy() for k in glob_keys}, 0
            self.release = self._release_id(server_round, self._glob, [], self.clip)
            self.check(server_round, self.release)
            source = self.noise.bound(self.release)
        self._round_noise = None
        draws = source.gaussian("update", server_round, sum(sizes)).numpy()
        offset = 0
        clip = self.clip
        out = {}
        for k in glob_keys:
            a = arrays[k].numpy()
            if np.issubdtype(a.dtype, np.floating):
                g = getattr(self, "_glob", {}).get(k)
                if g is not None and self._k:  # FedAvg divided the clipped sum by k; DP-FedAvg divides by m
                    a = g + (self._k / self.m) * (a.astype(np.float64) - g)
                noise = draws[offset:offset + a.size].reshape(a.shape) * (self.z_update * clip / self.m)
                offset += a.size
                a = (a + noise).astype(a.dtype)
            out[k] = Array(np.ascontiguousarray(a))
        self.clipper.update(self.norms, draw=float(source.gaussian("count", server_round, 1)[0]))
        eps = math.nan
        if self.ledger is not None:
            eps = self.ledger.commit_round(SERVER, server_round, [StepEvent(self.q, self.z, 1)],
                                           info={"clip": self.clip, "noise": self.noise.kind}, release=self.release)
        self.history.append({"round": server_round, "clip": clip, "norms": list(self.norms), "epsilon": eps})
        return ArrayRecord(out)


def _update_digest(msg) -> bytes:
    h = hashlib.sha256()
    for name in sorted(msg.content.array_records):
        arrays = msg.content[name]
        for k in sorted(arrays.keys()):
            h.update(k.encode() + np.ascontiguousarray(arrays[k].numpy()).tobytes())
    return h.digest()


def ledger_for_run(run_dir: str | Path):
    from privseg.privacy.budget import BudgetLedger

    return BudgetLedger(Path(run_dir) / "privacy.sqlite")


__all__ = ["SERVER", "ClientLevelDP", "BudgetExceededError", "flower_adaptive_clip_trace", "ledger_for_run"]
