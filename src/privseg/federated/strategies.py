"""Server strategies: Flower's FedAvg and FedProx, plus FedBN, with privseg's hooks.

* ``fedavg``  -> :class:`PrivsegFedAvg`, Flower's :class:`flwr.serverapp.strategy.FedAvg`.
* ``fedprox`` -> :class:`PrivsegFedProx`, Flower's ``FedProx``: the server sends
  ``proximal-mu``; the client adds mu/2 ||w - w_global||^2 to its local loss (see
  :func:`attach_proximal`).
* ``fedbn``   -> :class:`FedBN` (Li et al., ICLR 2021): Flower has no FedBN, so it extends
  FedAvg: clients keep every normalisation layer (affine weights and running statistics)
  local and send only the other weights; the server averages those and leaves the norm
  entries of the global model at their initial values (a site that joins late starts from
  them).

Hooks: every strategy calls ``self.update_hooks`` -- callables ``(server_round, replies,
global_arrays) -> replies`` -- on the valid training replies before averaging
(:meth:`PrivsegStrategy.screen_updates`: the poisoning guard, an erasure's calibration), and the
averaged arrays go through ``self.aggregate_hooks`` ``(server_round, arrays) -> arrays``
(:meth:`PrivsegStrategy.finish_aggregate`). Client-level DP does not hook in: it wraps the
strategy (:class:`privseg.federated.dp_strategy.ClientLevelDPStrategy`, as Flower's DP wrappers
do) and clips between the screening and the averaging (:meth:`PrivsegStrategy.average_updates`).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx
from torch import nn

from privseg.errors import ConfigError
from privseg.utils import registrar

UpdateHook = Callable[[int, list[Message], ArrayRecord], list[Message]]
AggregateHook = Callable[[int, ArrayRecord], ArrayRecord]

_NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


# -- weights <-> records ---------------------------------------------------------

def norm_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every normalisation layer (BatchNorm, InstanceNorm, GroupNorm,
    LayerNorm): affine parameters and running statistics. FedBN keeps these site-local."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            for k in module.state_dict().keys():
                keys.add(f"{name}.{k}" if name else k)
    return keys


def state_to_arrays(state: dict[str, torch.Tensor], exclude: Iterable[str] = ()) -> ArrayRecord:
    skip = set(exclude)
    return ArrayRecord(OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state.items() if k not in skip))


def arrays_to_state(arrays: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def load_arrays(model: nn.Module, arrays: ArrayRecord, skip: Iterable[str] = ()) -> None:
    """Load ``arrays`` into ``model`` (cast to each entry's dtype); every model key except
    ``skip`` must be present."""
    state = arrays_to_state(arrays)
    skip = set(skip)
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in skip]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ConfigError(f"global weights do not fit the local model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            if k not in skip:
                own[k].copy_(v.to(own[k].dtype))


# -- FedProx ---------------------------------------------------------------------

def global_params(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters: the w_global of the proximal term."""
    skip = set(skip)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and n not in skip}


def proximal_term(model: nn.Module, reference: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's mu/2 * sum ||w - w_global||^2 over the parameters in ``reference``."""
    dev = next(model.parameters()).device
    total = torch.zeros((), device=dev)
    for n, p in model.named_parameters():
        if n in reference:
            total = total + (p - reference[n].to(p.device)).pow(2).sum()
    return 0.5 * mu * total


def attach_proximal(optimizer: torch.optim.Optimizer, model: nn.Module, reference: dict[str, torch.Tensor],
                    mu: float):
    """Add the proximal term to the local loss through its gradient mu (w - w_global), applied
    just before each ``optimizer.step()``. Identical to adding :func:`proximal_term` to the loss,
    but it composes with any ``step_fn`` of :func:`privseg.train.loop.train_steps` -- with
    patient-level DP-SGD the term is data-independent, so adding it after clipping and noise
    costs no privacy. Returns the hook handle (``.remove()`` detaches it)."""
    pairs = [(p, reference[n].to(p.device)) for n, p in model.named_parameters() if n in reference]

    def hook(_opt: Any, _args: Any, _kwargs: Any) -> None:
        with torch.no_grad():
            for p, ref in pairs:
                if p.grad is not None:
                    p.grad.add_(p - ref, alpha=mu)

    return optimizer.register_step_pre_hook(hook)


# -- strategies ------------------------------------------------------------------

class PrivsegStrategy:
    """Shared by every privseg strategy (a mixin before the Flower strategy): hooks, site-local
    keys, dtype-faithful averaging, and evaluation averaging that tolerates sites without
    evaluation subjects. ``aggregate_train`` is :meth:`screen_updates` then :meth:`average_updates`,
    so that a wrapper (client-level DP) can act between the two."""

    name = "fedavg"
    local_norm = False

    def _init_privseg(self, reference_dtypes: dict[str, np.dtype] | None = None) -> None:
        self.update_hooks: list[UpdateHook] = []
        self.aggregate_hooks: list[AggregateHook] = []
        self.reference_dtypes = reference_dtypes or {}
        self._global: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        config["local-norm"] = bool(self.local_norm)
        config["strategy"] = self.name
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        config["local-norm"] = bool(self.local_norm)
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.average_updates(server_round, self.screen_updates(server_round, replies))

    def screen_updates(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies the average may take: those without error, through every update hook in turn."""
        valid = [m for m in replies if not m.has_error()]
        for hook in self.update_hooks:
            valid = hook(server_round, valid, self._global)
        return valid

    def average_updates(self, server_round: int,
                        replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The Flower strategy's own aggregation of screened ``replies``, finished
        (:meth:`finish_aggregate`); no arrays when there is nothing to average."""
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        return (self.finish_aggregate(server_round, arrays) if arrays is not None else None), metrics

    def finish_aggregate(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` completed (site-local entries, reference dtypes) and through every aggregate hook."""
        arrays = self._complete(arrays)
        for hook in self.aggregate_hooks:
            arrays = hook(server_round, arrays)
        return arrays

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        useful = [m for m in replies if not m.has_error() and self._weight(m) > 0]
        return super().aggregate_evaluate(server_round, useful) if useful else None  # type: ignore[misc]

    def _weight(self, msg: Message) -> float:
        try:
            rec = next(iter(msg.content.metric_records.values()))
            return float(rec.get(self.weighted_by_key, 0))  # type: ignore[attr-defined]
        except (StopIteration, TypeError, ValueError):
            return 0.0

    def _complete(self, arrays: ArrayRecord) -> ArrayRecord:
        """Entries the sites kept local come from the current global model; every entry gets
        the dtype of the reference model (averaging turns int64 counters into floats)."""
        out = OrderedDict()
        ref = self._global
        keys = list(ref.keys()) if ref is not None else list(arrays.keys())
        for k in keys:
            if k in arrays:
                a = arrays[k].numpy()
            elif ref is not None:
                a = ref[k].numpy()
            else:  # pragma: no cover - no global to fill from
                continue
            want = self.reference_dtypes.get(k)
            if want is None and ref is not None and k in ref:
                want = ref[k].numpy().dtype
            if want is not None and a.dtype != want:
                a = np.round(a).astype(want) if np.issubdtype(want, np.integer) else a.astype(want)
            out[k] = Array(np.ascontiguousarray(a))
        return ArrayRecord(out)


# -- the registry: a strategy is one decorated factory ``(common, **params) -> strategy`` ------------
#
# ``common`` holds the sampling settings every strategy takes (Flower's fraction_* / min_*_nodes);
# ``params`` are the strategy's own (``FLConfig.strategy_params``), checked against the factory's
# signature. A new strategy with its own parameter is one class or function in one file.

StrategyFactory = Callable[..., "PrivsegStrategy"]
FL_STRATEGIES: dict[str, StrategyFactory] = {}


def fl_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    return registrar(FL_STRATEGIES, name.lower(), kind="FL strategy")


def strategy_param_names(name: str) -> set[str]:
    """The parameters strategy ``name`` takes besides the common sampling settings."""
    factory = _factory(name)
    return {p for p in inspect.signature(factory).parameters if p != "common"}


def _factory(name: str) -> StrategyFactory:
    try:
        return FL_STRATEGIES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}: choose {', '.join(FL_STRATEGIES)}") from None


class PrivsegFedAvg(PrivsegStrategy, FedAvg):
    """Flower's FedAvg (weighted by each site's number of training subjects)."""

    name = "fedavg"

    def __init__(self, **kwargs: Any) -> None:
        FedAvg.__init__(self, **kwargs)
        self._init_privseg()


class PrivsegFedProx(PrivsegStrategy, FedProx):
    """Flower's FedProx; the client applies the proximal term (``proximal-mu`` in the config)."""

    name = "fedprox"

    def __init__(self, proximal_mu: float = 0.01, **kwargs: Any) -> None:
        FedProx.__init__(self, proximal_mu=proximal_mu, **kwargs)
        self._init_privseg()


class PrivsegFedAvgM(PrivsegStrategy, FedAvgM):
    """Flower's FedAvgM (Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", 2019): the averaged update is applied with
    a server learning rate and momentum (``strategy_params``: ``server_learning_rate``,
    ``server_momentum``)."""

    name = "fedavgm"

    def __init__(self, server_learning_rate: float = 1.0, server_momentum: float = 0.0, **kwargs: Any) -> None:
        FedAvgM.__init__(self, server_learning_rate=server_learning_rate, server_momentum=server_momentum, **kwargs)
        self._init_privseg()


class FedBN(PrivsegFedAvg):
    """FedAvg of everything but the normalisation layers, which stay at each site."""

    name = "fedbn"
    local_norm = True


@fl_strategy("fedavg")
def _fedavg(common: dict) -> PrivsegFedAvg:
    return PrivsegFedAvg(**common)


@fl_strategy("fedprox")
def _fedprox(common: dict, proximal_mu: float = 0.01) -> PrivsegFedProx:
    return PrivsegFedProx(proximal_mu=float(proximal_mu), **common)


@fl_strategy("fedavgm")
def _fedavgm(common: dict, server_learning_rate: float = 1.0, server_momentum: float = 0.0) -> PrivsegFedAvgM:
    if server_learning_rate <= 0 or not 0 <= server_momentum < 1:
        raise ConfigError(f"fedavgm: server_learning_rate must be > 0 and server_momentum in [0, 1) (got "
                          f"{server_learning_rate}, {server_momentum})")
    return PrivsegFedAvgM(server_learning_rate=float(server_learning_rate), server_momentum=float(server_momentum),
                          **common)


@fl_strategy("fedbn")
def _fedbn(common: dict) -> FedBN:
    return FedBN(**common)


def build_strategy(name: str, *, min_sites: int = 1, fraction: float = 1.0, evaluate: bool = True,
                   proximal_mu: float | None = None, params: dict | None = None) -> PrivsegStrategy:
    """A strategy by name from :data:`FL_STRATEGIES`. ``min_sites`` is both the minimum sampled and the
    minimum connected; ``params`` the strategy's own settings (``proximal_mu`` is passed on to the
    strategies that take it)."""
    common = dict(fraction_train=fraction, fraction_evaluate=fraction if evaluate else 0.0,
                  min_train_nodes=min_sites, min_evaluate_nodes=min_sites if evaluate else 0,
                  min_available_nodes=min_sites)
    accepted = strategy_param_names(name)
    params = dict(params or {})
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(f"strategy {name!r} has no parameter(s) {', '.join(unknown)} "
                          f"(it takes: {', '.join(sorted(accepted)) or 'none'})")
    if proximal_mu is not None and "proximal_mu" in accepted:
        params.setdefault("proximal_mu", proximal_mu)
    return _factory(name)(common, **params)
