"""Simulation: every site a virtual SuperNode, ClientApps run by Ray actors, in this process.

Uses :func:`flwr.simulation.run_simulation` (Ray backend). One virtual SuperNode per site;
partition ID ``k`` is site ``k`` of the run's site list.

Resources: each ClientApp gets ``cpus_per_client`` CPUs (default: all of this machine's, so
sites train one after another with every core, which is fastest for conv nets on CPU and
keeps memory flat however many sites there are -- at most ``ray_cpus / cpus_per_client``
actors exist at once). Lower it to train several sites in parallel.

**An existing Ray cluster.** Pass ``ray_address`` (CLI: ``--ray-address``): ``"auto"`` joins
the cluster this machine belongs to (started with ``ray start --head`` / ``ray start
--address=HEAD:6379``), ``"ray://HEAD:10001"`` goes through Ray Client. It is handed to
``ray.init(address=...)`` through the backend's ``init_args``; the local CPU count is then
not set (the cluster decides). Every Ray worker must be able to import ``privseg`` and read
the cohort paths (a shared filesystem, or the same paths on each node). Alternatively call
``ray.init(...)`` yourself before :func:`simulate`: the backend only initialises Ray when it
is not initialised already.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from privseg.errors import ConfigError
from privseg.federated.client_app import make_client_app
from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState
from privseg.federated.server_app import RoundCallback, make_server_app, run_server


def prepare_run(cfg: FLConfig, run_dir: str | Path, fresh: bool = False) -> Path:
    """Create ``run_dir`` with the config, or check the existing run there can be resumed
    with it (same strategy and model). ``fresh`` refuses to reuse an existing run."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "fl_config.json"
    if cfg_path.exists():
        if fresh:
            raise ConfigError(f"{run_dir}: a run already exists there; choose another --name or delete it")
        old = FLConfig.load(run_dir)
        diffs = cfg.compatible_with(old)
        if diffs:
            raise ConfigError(f"{run_dir}: the existing run was made with a different setup ({'; '.join(diffs)}); "
                              "choose another --name to start a new run")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir)
    return run_dir


def backend_config(cpus_per_client: float | None = None, ray_address: str | None = None,
                   ray_cpus: int | None = None) -> dict:
    total = ray_cpus or os.cpu_count() or 1
    per = float(cpus_per_client or total)
    if per <= 0:
        raise ConfigError("--cpus-per-client must be positive")
    init: dict = {"logging_level": logging.ERROR, "log_to_driver": False}
    if ray_address:
        init["address"] = ray_address
    else:
        init["num_cpus"] = int(total)
        init["num_gpus"] = 0
        if per > total:
            raise ConfigError(f"--cpus-per-client {per} is more than the {total} CPUs Ray may use")
    return {"client_resources": {"num_cpus": per, "num_gpus": 0.0}, "init_args": init}


def simulate(cfg: FLConfig, run_dir: str | Path, *, on_round: RoundCallback | None = None,
             cpus_per_client: float | None = None, ray_address: str | None = None, ray_cpus: int | None = None,
             client_app=None, verbose: bool = False, rounds: int | None = None, strategy=None) -> RunState:
    """Run (or resume) ``cfg`` in simulation; returns the final run state.

    ``client_app`` replaces the default ClientApp (tests inject faults this way); ``rounds``
    extends a run past its configured rounds; ``strategy`` replaces the configured one."""
    run_dir = prepare_run(cfg, run_dir)
    from flwr.simulation import run_simulation  # why: it imports Ray, which only this backend needs

    if not verbose:  # privseg reports rounds itself; keep Flower's per-round INFO lines out of the progress bar
        logging.getLogger("flwr").setLevel(logging.WARNING)
    server = make_server_app(run_dir, on_round=on_round, rounds=rounds, strategy=strategy)
    client = client_app or make_client_app(sites=cfg.sites, state_root=run_dir)
    run_simulation(server_app=server, client_app=client, num_supernodes=len(cfg.sites),
                   backend_config=backend_config(cpus_per_client, ray_address, ray_cpus), verbose_logging=verbose)
    return RunState.load(run_dir)


class InProcessGrid:
    """A Flower :class:`~flwr.serverapp.Grid` that runs each site's ClientApp in this process,
    one message after another: the same ServerApp/ClientApp code as a simulation, without Ray
    (tests, debugging, profiling). A ClientApp exception becomes an error reply, as in Flower."""

    def __init__(self, client_app, num_sites: int, run_id: int = 1):
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.client_app = client_app
        self._node_ids = [1000 + k for k in range(num_sites)]
        self.contexts = {nid: Context(run_id=run_id, node_id=nid,
                                      node_config={"partition-id": k, "num-partitions": num_sites},
                                      state=RecordDict(), run_config={}) for k, nid in enumerate(self._node_ids)}
        self.down: set[int] = set()  # node IDs that do not answer (a "killed SuperNode")
        self._run = None
        self._pending: dict[str, object] = {}

    # Grid interface ------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self._node_ids)

    def push_messages(self, messages):
        """Run the ClientApps now; their replies wait for :meth:`pull_messages`."""
        ids = []
        for k, msg in enumerate(messages):
            msg_id = msg.metadata.message_id or f"inproc-{len(self._pending)}-{k}"
            ids.append(msg_id)
            for reply in self.send_and_receive([msg]):
                self._pending[msg_id] = reply
        return ids

    def pull_messages(self, message_ids):
        """Replies to pushed messages (a site that is down never replies)."""
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            if nid in self.down:
                continue
            try:
                replies.append(self.client_app(msg, self.contexts[nid]))
            except Exception as exc:  # noqa: BLE001 - reported to the server, as Flower does
                reason = f"{type(exc)}:<'{exc}'>"
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg))
        return replies


def simulate_inprocess(cfg: FLConfig, run_dir: str | Path, *, on_round: RoundCallback | None = None,
                       client_app=None, grid: InProcessGrid | None = None, rounds: int | None = None,
                       strategy=None) -> RunState:
    """Run (or resume) ``cfg`` with every ClientApp in this process (no Ray)."""
    run_dir = prepare_run(cfg, run_dir)
    grid = grid or InProcessGrid(client_app or make_client_app(sites=cfg.sites, state_root=run_dir), len(cfg.sites))
    return run_server(grid, run_dir, on_round=on_round, rounds=rounds, strategy=strategy)


BACKENDS = ("in-process", "simulation")


def run_rounds(run_dir: str | Path, backend: str = "in-process", *, rounds: int | None = None, strategy=None,
               on_round: RoundCallback | None = None) -> RunState:
    """Run (or resume, or extend to ``rounds``) the existing run in ``run_dir`` with its own config."""
    cfg = FLConfig.load(run_dir)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # rounds are reported by the caller
    if backend == "in-process":
        return simulate_inprocess(cfg, run_dir, on_round=on_round, rounds=rounds, strategy=strategy)
    if backend == "simulation":
        return simulate(cfg, run_dir, on_round=on_round, rounds=rounds, strategy=strategy)
    raise ConfigError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
