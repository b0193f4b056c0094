"""Deployment as real processes on this machine: one ``flower-superlink``, one
``flower-supernode`` per site, and the app started with ``flwr run``, all over TLS on
loopback with certificates generated into the run folder.

What :func:`deploy` does, in order (files under ``runs/<name>/deploy/``):

1. ``certs/``: a private CA and a server certificate for 127.0.0.1 / ::1 / localhost
   (:func:`generate_certificates`; the CA key never leaves the folder).
2. ``flower-superlink --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem
   --ssl-keyfile certs/server.key --port P --disable-runtime-dependency-installation``
   (Fleet, Control and Runtime APIs share port P in Flower 1.41).
3. per site: ``flower-supernode --root-certificates certs/ca.crt --superlink 127.0.0.1:P
   --port Q --node-config 'site="H1" cohort="..." cohort-site="H1" state-dir="..."'``.
4. ``flwr run runs/<name>/app privseg --stream`` with ``FLWR_HOME=deploy/flwr_home`` whose
   ``config.toml`` names the SuperLink connection (address + CA), and the generated
   ``app/pyproject.toml`` pointing at ``privseg.federated.server_app:app`` /
   ``privseg.federated.client_app:app`` with ``run-dir`` in ``[tool.flwr.app.config]``.
5. Waits for the run, following ``state.json`` round by round, then stops the SuperNodes and
   the SuperLink (SIGTERM to each process group, SIGKILL after a grace period) -- also on
   Ctrl-C or any error.

**SuperNode authentication** (on by default with TLS when privseg starts the SuperLink):
each site gets an EC P-384 key pair in ``certs/nodes/<site>.key`` / ``.pub`` (OpenSSH format,
as Flower expects), the SuperLink runs with ``--enable-supernode-auth`` (which Flower allows
only with TLS), every public key is registered before the SuperNodes start (``flwr supernode
register certs/nodes/<site>.pub privseg``), and each SuperNode signs its requests with
``--auth-supernode-private-key``. A SuperNode whose key was not registered is refused.
With an external ``superlink=`` the operator registers the keys (``supernode_auth=True``
then only passes each site's private key).

**Insecure mode** (``insecure=True``, CLI ``--insecure``) turns TLS and SuperNode
authentication off; it must be asked for explicitly and logs a warning (the CLI prints it).

Each process runs in its own session, so stopping it also stops the SuperExec and
ClientApp/ServerApp processes it started. ``superlink=`` connects to an existing SuperLink
instead of starting one (its CA via ``root_certificates``); it must be reachable.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privseg.errors import ConfigError, PrivsegError
from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState
from privseg.federated.simulation import prepare_run
from privseg.utils import site_dir

APP_NAME = "privseg-fl"
INSECURE_WARNING = ("insecure mode: no TLS and no SuperNode authentication -- model weights and metrics travel "
                    "unencrypted and any process that reaches the SuperLink can join as a site; use it only for "
                    "debugging on a trusted machine")

log = logging.getLogger("privseg.federated.deploy")


class DeployError(PrivsegError):
    """A Flower process could not be started, or the deployed run failed."""


# -- certificates ------------------------------------------------------------------

def generate_certificates(out_dir: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost"),
                          days: int = 30) -> dict[str, Path]:
    """A private CA and a server certificate (SANs: ``hosts``) signed by it, as PEM files
    ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` in ``out_dir``; existing valid files
    are kept."""
    out = Path(out_dir)
    paths = {k: out / n for k, n in (("ca", "ca.crt"), ("ca_key", "ca.key"), ("cert", "server.pem"),
                                      ("key", "server.key"))}
    if all(p.is_file() for p in paths.values()):
        cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
        if cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(hours=1):
            return paths
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privseg federated CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    nokey = serialization.NoEncryption()
    fmt = serialization.PrivateFormat.PKCS8
    for path, data in ((paths["ca"], ca.public_bytes(pem)), (paths["cert"], cert.public_bytes(pem)),
                       (paths["ca_key"], ca_key.private_bytes(pem, fmt, nokey)),
                       (paths["key"], key.private_bytes(pem, fmt, nokey))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        if path.name.endswith(".key"):
            os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return paths


def generate_node_keys(out_dir: str | Path, site: str) -> tuple[Path, Path]:
    """An EC P-384 key pair for one SuperNode, OpenSSH-encoded as Flower reads it:
    ``<out_dir>/<site>.key`` (private, mode 600) and ``<site>.pub``; existing files are kept."""
    out = Path(out_dir)
    key_path, pub_path = out / f"{site}.key", out / f"{site}.pub"
    if key_path.is_file() and pub_path.is_file():
        return key_path, pub_path
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    for path, data in ((key_path, priv), (pub_path, pub + b"\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        if path.suffix == ".key":
            os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return key_path, pub_path


def superlink_command(port: int, dep_dir: Path, *, insecure: bool = False, supernode_auth: bool = True,
                      certs: dict[str, Path] | None = None) -> list[str]:
    """The ``flower-superlink`` command line: TLS with ``certs`` unless ``insecure``, and
    ``--enable-supernode-auth`` when ``supernode_auth`` (TLS only)."""
    cmd = [flower_binary("flower-superlink"), "--port", str(port), "--host", "127.0.0.1",
           "--disable-runtime-dependency-installation", "--database", str(dep_dir / "superlink.db")]
    if insecure:
        return cmd + ["--insecure"]
    if certs is None:
        raise ConfigError("a TLS SuperLink needs certificates (generate_certificates)")
    cmd += ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
            "--ssl-keyfile", str(certs["key"])]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def supernode_command(address: str, port: int, node_config: str, *, ca: Path | None, insecure: bool = False,
                      private_key: Path | None = None, max_wait: float = 120.0) -> list[str]:
    """The ``flower-supernode`` command line for one site."""
    cmd = [flower_binary("flower-supernode"), "--superlink", address, "--port", str(port),
           "--max-wait-time", str(int(max_wait)), "--node-config", node_config]
    if insecure or ca is None:
        return cmd + ["--insecure"]
    cmd += ["--root-certificates", str(ca)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    return cmd


def register_supernode(public_key: Path, env: dict, timeout: float = 120.0) -> None:
    """``flwr supernode register KEY privseg`` against the SuperLink named in ``FLWR_HOME``."""
    cmd = [flower_binary("flwr"), "supernode", "register", str(public_key), "privseg"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DeployError(f"registering SuperNode key {public_key} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0 or "registered successfully" not in proc.stdout:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise DeployError(f"could not register SuperNode key {public_key} (exit {proc.returncode}):\n{tail}")


# -- helpers -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Raise :class:`DeployError` when nothing accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port_n = int(port)
    except ValueError:
        raise ConfigError(f"--superlink {address!r}: expected HOST:PORT") from None
    try:
        with socket.create_connection((host, port_n), timeout=timeout):
            return
    except OSError as exc:
        raise DeployError(f"SuperLink at {address} is unreachable ({exc.strerror or exc}); start it or "
                          "check --superlink") from None


def flower_binary(name: str) -> str:
    """Path of a Flower CLI next to this interpreter (the venv's bin), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found next to {sys.executable} or on PATH; install flwr")
    return found


def write_app(run_dir: Path, rounds: int | None = None) -> Path:
    """The Flower app folder for ``flwr run``: a pyproject.toml naming privseg's apps and
    this run's folder. Nothing else is in the FAB; the code comes from the installed privseg."""
    app_dir = run_dir / "app"
    app_dir.mkdir(parents=True, exist_ok=True)
    run_dir_s = str(run_dir.resolve()).replace("\\", "\\\\").replace('"', '\\"')
    text = f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "privseg federated segmentation (generated for one run; code comes from the installed privseg)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "privseg"

[tool.flwr.app.components]
serverapp = "privseg.federated.server_app:app"
clientapp = "privseg.federated.client_app:app"

[tool.flwr.app.config]
run-dir = "{run_dir_s}"
rounds = {int(rounds or 0)}
'''
    (app_dir / "pyproject.toml").write_text(text)
    return app_dir


def write_flwr_home(home: Path, address: str, ca: Path | None) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    lines = ['[superlink]', 'default = "privseg"', '', '[superlink.privseg]', f'address = "{address}"']
    lines += [f'root-certificates = "{ca}"'] if ca else ['insecure = true']
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Deployment:
    """The processes of one deployment; :meth:`stop` ends them all (idempotent)."""

    run_dir: Path
    procs: list[Proc] = field(default_factory=list)
    address: str | None = None  # the SuperLink's HOST:PORT, once known
    ca: Path | None = None  # its CA certificate (None: insecure)
    env: dict | None = None  # the environment the Flower processes run with

    def proc(self, name: str) -> Proc | None:
        return next((p for p in self.procs if p.name == name), None)

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> Proc:
        log = self.run_dir / "deploy" / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "ab")
        try:
            p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=env)
        except OSError as exc:
            raise DeployError(f"could not start {name} ({exc})") from None
        finally:
            fh.close()
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def stop(self, grace: float = 10.0) -> None:
        # SuperNodes (and the flwr CLI) first, the SuperLink last, so nodes do not spin on reconnects.
        nodes = [p for p in self.procs if p.name != "superlink"]
        links = [p for p in self.procs if p.name == "superlink"]
        for group in (nodes, links):
            for p in group:
                _signal_group(p.popen, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in group:
                try:
                    p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                _signal_group(p.popen, signal.SIGKILL)  # whatever is left of the session (SuperExec, apps)
                try:
                    p.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    pass
        self.procs.clear()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_port(proc: Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise DeployError(f"{proc.name} exited with code {proc.popen.returncode}; last log lines "
                              f"({proc.log}):\n{proc.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"{proc.name} did not open port {port} within {timeout:.0f} s; see {proc.log}")


def _node_config(site, state_dir: Path) -> str:
    def q(v: str) -> str:
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return " ".join([f"site={q(site.id)}", f"cohort={q(site.cohort)}", f"cohort-site={q(site.cohort_site or '')}",
                     f"state-dir={q(state_dir)}", f"exclude={q(','.join(site.exclude))}",  # erased subjects
                     f"splits={q(site.splits or '')}"])


def deploy(cfg: FLConfig, run_dir: str | Path, *, on_round: Callable[[dict], None] | None = None,
           superlink: str | None = None, root_certificates: str | Path | None = None, insecure: bool = False,
           supernode_auth: bool | None = None, start_timeout: float = 120.0, poll: float = 1.0,
           deployment: Deployment | None = None,
           on_started: Callable[[Deployment], None] | None = None) -> RunState:
    """Run (or resume) ``cfg`` with real SuperLink/SuperNode processes on this machine.

    ``supernode_auth`` (default: on when privseg starts the SuperLink with TLS, off with an
    external ``superlink``) authenticates every SuperNode with its own key pair.
    ``deployment`` (an empty :class:`Deployment`) lets the caller watch the processes while
    the run goes on (fault-injection tests); ``on_started`` is called once the SuperNodes are
    started, before the app is submitted."""
    if insecure:
        if supernode_auth:
            raise ConfigError("SuperNode authentication needs TLS: drop --insecure")
        log.warning(INSECURE_WARNING)
    auth = (not insecure and not superlink) if supernode_auth is None else bool(supernode_auth)
    run_dir = prepare_run(cfg, run_dir).resolve()
    dep_dir = run_dir / "deploy"
    if superlink:
        check_reachable(superlink)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # Flower keeps installed apps and CLI config under FLWR_HOME: keep them in the run folder, not ~/.flwr
    env["FLWR_HOME"] = str(dep_dir / "flwr_home")
    # the venv's bin first, so SuperLink/SuperNode find flower-superexec / flwr-serverapp / flwr-clientapp
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    d = deployment if deployment is not None else Deployment(run_dir)
    d.run_dir = run_dir
    state_before = RunState.load_or_new(run_dir).rounds_done
    try:
        ca: Path | None = None
        keys: dict[str, Path] = {}
        if auth:
            for site in cfg.sites:
                keys[site.id], _ = generate_node_keys(dep_dir / "certs" / "nodes", site.id)
        if superlink:
            address = superlink
            ca = Path(root_certificates).resolve() if root_certificates else None
            if ca is None and not insecure:
                raise ConfigError("--superlink needs --root-certificates (its CA) or --insecure")
            env_run = dict(env, FLWR_HOME=str(write_flwr_home(dep_dir / "flwr_home", address,
                                                               None if insecure else ca)))
        else:
            port = free_port()
            address = f"127.0.0.1:{port}"
            certs = None if insecure else generate_certificates(dep_dir / "certs")
            ca = certs["ca"] if certs else None
            cmd = superlink_command(port, dep_dir, insecure=insecure, supernode_auth=auth, certs=certs)
            (dep_dir / "superlink.db").unlink(missing_ok=True)
            env_run = dict(env, FLWR_HOME=str(write_flwr_home(dep_dir / "flwr_home", address, ca)))
            link = d.start("superlink", cmd, env)
            _wait_port(link, port, start_timeout)
            for site in cfg.sites if auth else ():  # a fresh SuperLink database: register every site's key
                register_supernode(keys[site.id].with_suffix(".pub"), env_run, start_timeout)
        for site in cfg.sites:
            cmd = supernode_command(address, free_port(), _node_config(site, site_dir(run_dir, site.id)), ca=ca,
                                    insecure=insecure, private_key=keys.get(site.id), max_wait=start_timeout)
            d.start(f"supernode-{site.id}", cmd, env)
        d.address, d.ca, d.env = address, ca, env
        if on_started is not None:
            on_started(d)
        app_dir = write_app(run_dir)
        runner = d.start("flwr-run", [flower_binary("flwr"), "run", str(app_dir), "privseg", "--stream"], env_run)
        seen = state_before
        while runner.alive():
            time.sleep(poll)
            seen = _report_new_rounds(run_dir, seen, on_round)
            for p in d.procs:
                if p.name == "superlink" and not p.alive():
                    raise DeployError(f"the SuperLink exited (code {p.popen.returncode}); see {p.log}:\n{p.tail()}")
        seen = _report_new_rounds(run_dir, seen, on_round)
        state = RunState.load_or_new(run_dir)
        if state.status != "finished" or state.rounds_done < cfg.rounds:
            raise DeployError(f"the deployed run stopped after {state.rounds_done} of {cfg.rounds} rounds "
                              f"(status {state.status}); see the logs in {dep_dir / 'logs'}:\n"
                              f"{runner.tail()}")
        return state
    finally:
        d.stop()


def _report_new_rounds(run_dir: Path, seen: int, on_round: Callable[[dict], None] | None) -> int:
    try:
        state = RunState.load(run_dir)
    except PrivsegError:
        return seen
    for e in state.rounds:
        if int(e["round"]) > seen:
            if on_round is not None:
                on_round(e)
            seen = int(e["round"])
    return seen
