"""FedRecover for site erasure (Cao, Jia, Zhang, Gong, "FedRecover: Recovering from Poisoning
Attacks in Federated Learning using Historical Information", IEEE S&P 2023).

The server replays the rounds the erased site took part in without it, from the global model
before it joined. In most rounds it *estimates* each remaining site's update from the stored one
instead of asking for it: by the Cauchy mean value theorem,
``g~_i,t = g_i,t + H_i,t (w~_{t-1} - w_{t-1})`` with ``w`` the original global models, ``w~`` the
recovered ones and ``H_i,t`` an L-BFGS approximation of the site's (integrated) Hessian built
from the last few pairs ``(w~ - w, g~ - g)`` of the rounds where the site really trained. Those
*exact* rounds are the warm-up rounds, one in every ``correction`` rounds after them, the last
``final`` rounds, and a round whose estimate looks abnormal. Only exact rounds cost the sites
anything; the estimated ones are server arithmetic.

This module holds the math and the hook that drives a derived run through the exact rounds; the
registered method is :class:`privseg.erasure.site.FedRecoverSite`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch

from privseg.federated.runstate import RunState
from privseg.federated.strategies import arrays_to_state, state_to_arrays
from privseg.train.checkpoint import load_checkpoint, load_weights_only, training_weights

# pairs with s.y below this x |s||y| carry no usable (positive) curvature; L-BFGS skips them
CURVATURE_EPS = 1e-8


def lbfgs_hvp(s: Sequence[torch.Tensor], y: Sequence[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """``B v`` for the L-BFGS approximation ``B`` of a Hessian ``H`` from pairs ``y_k = H s_k``
    (oldest first), in the compact representation of Byrd, Nocedal and Schnabel ("Representations
    of quasi-Newton matrices and their use in limited memory methods", Math. Programming 63,
    1994, Theorem 2.2), as FedRecover's Algorithm 1 uses it:

        B = sigma I - [sigma S  Y] [[sigma S^T S, L], [L^T, -D]]^-1 [sigma S^T; Y^T]

    with ``S``, ``Y`` the pairs as columns, ``D = diag(s_k^T y_k)``, ``L`` the strictly lower
    triangle of ``S^T Y`` and ``sigma = y^T s / s^T s`` of the newest pair. ``B`` is what ``m``
    BFGS updates of ``sigma I`` give, so it satisfies the newest secant equation ``B s = y``
    exactly and equals ``H`` on a quadratic probed along ``H``-conjugate directions. Each pair
    needs ``s_k^T y_k > 0`` (the caller keeps only such pairs). Costs O(m d), never a d x d matrix."""
    if not s or len(s) != len(y):
        raise ValueError("lbfgs_hvp needs at least one (s, y) pair, as many s as y")
    S = torch.stack([a.double() for a in s], 1)  # d x m
    Y = torch.stack([b.double() for b in y], 1)
    x = v.double()
    sy, ss = S.T @ Y, S.T @ S
    sigma = sy[-1, -1] / ss[-1, -1]
    low = torch.tril(sy, -1)
    middle = torch.cat([torch.cat([sigma * ss, low], 1), torch.cat([low.T, -torch.diag(torch.diagonal(sy))], 1)], 0)
    q = torch.linalg.solve(middle, torch.cat([sigma * (S.T @ x), Y.T @ x]))
    m = S.shape[1]
    return (sigma * x - sigma * (S @ q[:m]) - Y @ q[m:]).to(v.dtype)


def fedrecover_schedule(n: int, warmup: int, correction: int, final: int) -> list[bool]:
    """Which of ``n`` replayed rounds are exact: the first ``warmup``, then every ``correction``-th
    (periodic correction), and the last ``final`` (final tuning)."""
    return [p < warmup or p >= n - final or (p - warmup + 1) % correction == 0 for p in range(n)]


def _flat(state: dict, keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().reshape(-1).double() for k in keys])


def _unflat(vec: torch.Tensor, like: dict, keys: Sequence[str]) -> dict:
    out, at = dict(like), 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[at:at + n].reshape(like[k].shape).to(like[k].dtype)
        at += n
    return out


class FedRecoverHook:
    """Drives a derived run whose rounds are FedRecover's exact rounds. As an update hook it turns
    each exact round's replies into L-BFGS pairs (one buffer per site); as an aggregate hook it
    takes the averaged exact round and runs the estimated rounds that follow it (server
    arithmetic, inside the round's timing), stopping early at an abnormal estimate: that round
    becomes the next exact one (at most ``max_extra`` such rounds).

    Updates are model deltas ``W_i - w``; local SGD makes them minus a multiple of the gradient, so
    the pairs take ``y = -(g~ - g)`` to give L-BFGS the positive curvature it assumes. privseg's
    sites take AdamW steps, for which that holds only loosely; the abnormality check is what keeps
    a bad estimate out (falling back to the stored update once ``max_extra`` is spent)."""

    def __init__(self, run_dir: Path, state: RunState, rounds: Sequence[int], exact: Sequence[bool],
                 sites: Sequence[str], params: dict):
        self.run_dir = Path(run_dir)
        self.state = state
        self.entries = {int(e["round"]): e for e in self.state.rounds}
        self.rounds, self.planned, self.sites = list(rounds), list(exact), set(sites)
        self.p = params
        self.pos = 0  # index in ``rounds`` of the next round to replay
        self.extra: list[int] = []  # rounds made exact by the abnormality check
        self.pairs: dict[str, deque] = {s: deque(maxlen=int(params["buffer"])) for s in sites}
        self.keys: list[str] | None = None
        self.counts = {"exact": 0, "estimated": 0, "abnormal": 0, "abnormal_kept_stored": 0, "uncorrected": 0,
                       "pairs": 0, "pairs_skipped": 0}
        self.estimate_cpu_s = 0.0
        self._cache: dict[tuple, torch.Tensor] = {}

    def is_exact(self, pos: int) -> bool:
        return self.planned[pos] or self.rounds[pos] in self.extra

    def exact_left(self) -> int:
        return sum(self.is_exact(p) for p in range(self.pos, len(self.rounds)))

    # -- the stored history ---------------------------------------------------------------------
    def _load(self, path: Path) -> dict:
        if path.name.startswith("global_r"):
            return training_weights(load_checkpoint(path))  # the iterate the sites trained from, not a served EMA
        return load_weights_only(path, "stored update")

    def _global(self, t: int) -> torch.Tensor:
        """The original global model after round ``t``, flat (the last two kept in memory)."""
        key = ("global", t)
        if key not in self._cache:
            state = self._load(self.state.checkpoint_path(t))
            if self.keys is None:
                self.keys = [k for k, v in state.items() if v.is_floating_point()]
            self._cache = {k: v for k, v in self._cache.items() if k[0] == "global" and k[1] >= t - 1}
            self._cache[key] = _flat(state, self.keys)
        return self._cache[key]

    def _stored(self, t: int, site: str) -> torch.Tensor | None:
        """Site's stored update of original round ``t`` (its model minus the global it started from)."""
        rel = (self.entries.get(t, {}).get("updates") or {}).get(site)
        if not rel:
            return None
        base = self._global(t - 1)
        return _flat(self._load(self.run_dir / rel), self.keys) - base

    # -- the hooks ------------------------------------------------------------------------------
    def as_original_round(self, configure_train):
        """Wraps a strategy's ``configure_train``: the sites train an exact round as the original
        round it replays (its seeds and patch draws), so the difference of a pair's updates is the
        model's doing, not the sampling's, and matches the draws the stored updates of the
        estimated rounds saw."""
        def configure(server_round: int, arrays, config, grid):
            return configure_train(self.rounds[self.pos], arrays, config, grid)
        return configure

    def on_updates(self, server_round: int, replies: list, global_arrays) -> list:
        """Exact round: an L-BFGS pair per site that also trained in the original round."""
        t = self.rounds[self.pos]
        base = self._global(t - 1)
        w = _flat(arrays_to_state(global_arrays), self.keys)
        s = w - base
        for m in replies:
            site = str(m.content["site"]["site"])
            old = self._stored(t, site)
            if old is None or site not in self.pairs or not float(s.norm()):
                continue  # nothing to compare with, or the same start (warm-up round 1): no pair
            y = old - (_flat(arrays_to_state(m.content["arrays"]), self.keys) - w)
            if float(s @ y) > CURVATURE_EPS * float(s.norm() * y.norm()):
                self.pairs[site].append((s, y))
                self.counts["pairs"] += 1
            else:
                self.counts["pairs_skipped"] += 1
        return replies

    def on_model(self, server_round: int, arrays):
        """After an exact round: the estimated rounds up to the next exact one."""
        c0 = time.process_time()
        self.counts["exact"] += 1
        self.pos += 1
        like = arrays_to_state(arrays)
        w = _flat(like, self.keys)
        while self.pos < len(self.rounds) and not self.is_exact(self.pos):
            nxt = self._estimate(self.rounds[self.pos], w)
            if nxt is None:
                break  # abnormal: the round is replayed exactly, as the next round of the derived run
            w = nxt
            self.counts["estimated"] += 1
            self.pos += 1
        self.estimate_cpu_s += time.process_time() - c0
        return state_to_arrays(_unflat(w, like, self.keys))

    def _estimate(self, t: int, w: torch.Tensor) -> torch.Tensor | None:
        """``w~_t`` from ``w~_{t-1} = w``: FedAvg of the estimated updates (weights as recorded)."""
        entry = self.entries.get(t, {})
        shift = w - self._global(t - 1)
        rejected = {x.get("site") for x in entry.get("rejected", [])}
        total, weight = torch.zeros_like(w), 0.0
        for site in sorted(set(entry.get("participants", [])) & (self.sites - rejected)):
            old = self._stored(t, site)
            if old is None:
                continue
            if self.pairs[site]:
                pairs = self.pairs[site]
                est = old + lbfgs_hvp([a for a, _ in pairs], [b for _, b in pairs], -shift)
            else:
                est = old
                self.counts["uncorrected"] += 1
            if self.p["abnormal"] and float(est.norm()) > self.p["abnormal"] * float(old.norm()):
                self.counts["abnormal"] += 1
                if len(self.extra) < int(self.p["max_extra"]):
                    self.extra.append(t)
                    return None
                est = old  # out of extra exact rounds: the stored update, uncorrected
                self.counts["abnormal_kept_stored"] += 1
            n = float(((entry.get("train") or {}).get(site) or {}).get("num-examples", 1))
            total += n * est
            weight += n
        return w + total / weight if weight else w
