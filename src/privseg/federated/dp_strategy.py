"""Client-level DP (``--dp site``) in Flower's idiom: a strategy that wraps any privseg strategy.

As Flower's ``DifferentialPrivacyServerSideFixedClipping`` wraps a strategy (flwr 1.41,
``flwr.serverapp.strategy``), :class:`ClientLevelDPStrategy` wraps any registered FL strategy
(:data:`privseg.federated.strategies.FL_STRATEGIES`) and leaves it as it was built: the wrapped
strategy still says what the sites are told and how their updates are averaged; the wrapper adds
what DP-FedAvg needs around it, with the mechanism of :class:`privseg.privacy.client_dp.ClientLevelDP`
(McMahan et al., ICLR 2018; Andrew et al., NeurIPS 2021 for the adaptive clip):

* ``configure_train``: the wrapped strategy's train message goes to the sites the mechanism
  samples by Poisson with the server's secret coins (:meth:`ClientLevelDP.select`), not to
  Flower's fixed-size sample from the public ``random`` seed (what the accountant books is what
  happens);
* ``aggregate_train``: the wrapped strategy's update hooks see the sites' own updates first
  (the poisoning guard, an erasure's calibration: :meth:`~privseg.federated.strategies.PrivsegStrategy.screen_updates`);
  then every update is clipped and weighs 1, the ledger checks the round (before anything of it
  is released), the wrapped strategy averages (:meth:`~privseg.federated.strategies.PrivsegStrategy.average_updates`;
  a round nobody joined releases the global model), and the mechanism re-weights the average to
  the expected number of sites, adds the noise, moves the clip and books the round in the ledger.

Evaluation is the wrapped strategy's. Why not Flower's own wrappers: their adaptive clip counts
*clipped* updates (the rule run backwards: :func:`flower_adaptive_clip_trace`), they sample
sites with a fixed size from a public seed and have no ledger (:mod:`privseg.privacy.client_dp`).
No clipping mod goes with it at the sites: the server is the trusted party of client-level DP
and clips itself, as with Flower's server-side wrapper. (Patient-level DP is the sites' own
DP-SGD step, :func:`privseg.federated.private.site_step_fn`; the ClientApp's DP mod,
:mod:`privseg.federated.dp_mod`, keeps a DP site's error texts at the site.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import adaptive_clip_inputs_inplace

from privseg.errors import ConfigError
from privseg.privacy.client_dp import ClientLevelDP

WEIGHT_KEY = "num-examples"  # what FedAvg weighs a reply by; every clipped update weighs 1


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: arrays[k].numpy() for k in arrays.keys()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class ClientLevelDPStrategy(Strategy):
    """DP-FedAvg around ``strategy`` (a privseg strategy: ``screen_updates``, ``average_updates``,
    ``finish_aggregate``), with the run's mechanism ``client_dp``. The poisoning guard reads
    :attr:`client_dp` (only its per-site rules run before clipping) and goes into the wrapped
    strategy's update hooks (:attr:`update_hooks`)."""

    def __init__(self, strategy, client_dp: ClientLevelDP):
        super().__init__()
        if getattr(strategy, "server_opt", False):  # FedAvgM with a server learning rate or momentum
            raise ConfigError(f"client-level DP noises the average of the clipped updates; strategy "
                              f"{getattr(strategy, 'name', strategy)!r} moves the model by a server learning rate "
                              "or momentum on top of it, which the noise does not cover: use its defaults "
                              "(server_learning_rate 1, server_momentum 0) or another strategy")
        self.strategy = strategy
        self.client_dp = client_dp
        self.current_arrays: ArrayRecord | None = None  # the global model of the round being trained

    def __repr__(self) -> str:
        return f"ClientLevelDPStrategy({self.strategy!r})"

    @property
    def update_hooks(self) -> list:
        """The wrapped strategy's update hooks: they run on the sites' updates before the clipping."""
        return self.strategy.update_hooks

    @property
    def aggregate_hooks(self) -> list:
        """The wrapped strategy's aggregate hooks: they run on the average before the noise."""
        return self.strategy.aggregate_hooks

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's train message, sent to the sites :meth:`ClientLevelDP.select` draws."""
        self.current_arrays = arrays
        public = random.getstate()  # the wrapped strategy's own draw of sites is discarded: it must not
        try:                        # move the `random` stream the round's evaluation samples from
            messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        finally:
            random.setstate(public)
        if not messages:
            return []
        content = messages[0].content  # every message of a round carries the same record
        nodes = self.client_dp.select(server_round, list(grid.get_node_ids()))
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, clip, check the ledger, average, noise, book (module docstring). Any number of
        updates -- none included -- is a round to release: the sites were sampled by Poisson."""
        if self.current_arrays is None:
            raise ConfigError(f"round {server_round}: aggregate_train before configure_train")
        valid = self.strategy.screen_updates(server_round, replies)
        updates = [_numpy(next(iter(m.content.array_records.values()))) for m in valid]
        clipped = self.client_dp.clip_round(server_round, _numpy(self.current_arrays), updates)
        for msg, arrays in zip(valid, clipped, strict=True):
            msg.content[next(iter(msg.content.array_records))] = _record(arrays)
            for rec in msg.content.metric_records.values():  # uniform average: every site weighs 1
                if WEIGHT_KEY in rec:
                    rec[WEIGHT_KEY] = 1
        averaged, metrics = self.strategy.average_updates(server_round, valid)
        if averaged is None:  # nobody sampled (or no update left): the round still releases its noise
            averaged = self.strategy.finish_aggregate(server_round, self.current_arrays)
        return _record(self.client_dp.release(server_round, _numpy(averaged))), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def flower_adaptive_clip_trace(norms: np.ndarray, rounds: int, clip: float = 1.0, lr: float = 0.2,
                               target: float = 0.5, seed: int = 0) -> list[float]:
    """Flower 1.41's adaptive-clipping *update rule* (``norm_bit = clipped``, then
    ``C *= exp(-lr (clipped_fraction - target))``) on i.i.d. draws from ``norms``, noise-free.
    For the benchmark/test showing the clipped-count rule diverges."""
    rng = np.random.default_rng(seed)
    trace = []
    for _ in range(rounds):
        sample = rng.choice(norms, size=min(len(norms), 10))
        bits = [adaptive_clip_inputs_inplace([np.array([n], dtype=np.float64)], clip) for n in sample]
        frac = float(np.mean(bits))
        clip *= math.exp(-lr * (frac - target))
        trace.append(clip)
    return trace
