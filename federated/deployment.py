"""Deployment engine: a SuperLink and one SuperNode per hospital, as OS processes, over TLS.

`deploy` starts `flower-superlink` with the federation's server certificate, one
`flower-supernode` per client file (each trusting only the federation CA and
reading only its own `local-data`), submits the run with `flwr run` through the
TLS-protected Control API, waits for it, and stops every process it started
(SuperExec, ServerApp and ClientApp processes included) whatever happens.

Flower 1.42's SuperNodes do not present TLS client certificates; instead, with
`authenticate_nodes` (the default), the SuperLink runs with
`--enable-supernode-auth` and only SuperNodes whose EC P-256 public key was
registered (`flwr supernode register`) may join; each request is signed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tomli_w

import federated
from federated.baseline import train_centralized
from federated.datasets import count_training_rows, load_local_data
from federated.errors import DeploymentFailed, InvalidCertificates, InvalidFederatedConfig
from federated.processes import MARKER_ENV, new_marker, stop_process, terminate_marked
from federated.report import FederatedReport, ServerRunResult, assemble_report, write_report
from federated.settings import RunSettings

CONNECTION_NAME = "cogov"
APP_NAME = "cogov-claim-risk"


@dataclass(frozen=True)
class DeployCertificates:
    """PEM files issued by the federation CA: the CA itself and the SuperLink's pair."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def validate(self) -> None:
        """Refuse unreadable files or a server certificate the CA did not sign."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            ca = x509.load_pem_x509_certificate(Path(self.ca_cert).read_bytes())
            cert = x509.load_pem_x509_certificate(Path(self.server_cert).read_bytes())
            load_pem_private_key(Path(self.server_key).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise InvalidCertificates(f"cannot load TLS material: {exc}") from exc
        try:
            cert.verify_directly_issued_by(ca)
        except Exception as exc:  # signature, issuer or algorithm mismatch
            raise InvalidCertificates(f"server certificate not issued by the CA: {exc}") from exc


@dataclass
class _Federation:
    """Processes and files of one running federation."""

    root: Path
    marker: str
    superlink_port: int
    cli_home: Path
    processes: list[tuple[str, subprocess.Popen, Path]]

    def env(self, flwr_home: Path) -> dict[str, str]:
        repo_root = str(Path(federated.__file__).resolve().parents[1])
        pythonpath = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)
        return {
            **os.environ,
            MARKER_ENV: self.marker,
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONPATH": pythonpath,
            # Flower starts its helpers (flower-superexec, flwr-serverapp...) by name.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        }

    def start(self, name: str, command: list[str], flwr_home: Path) -> subprocess.Popen:
        flwr_home.mkdir(parents=True, exist_ok=True)
        log_path = self.root / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env(flwr_home),
                cwd=self.root, start_new_session=True,
            )
        self.processes.append((name, proc, log_path))
        return proc

    def check_alive(self) -> None:
        for name, proc, _ in self.processes:
            if proc.poll() is not None:
                raise DeploymentFailed(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def logs(self, limit: int = 1500) -> str:
        parts = []
        for name, _, path in self.processes:
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name} ---\n{text[-limit:]}")
        return "\n".join(parts)


def deploy(
    certs: DeployCertificates,
    clients: list[Path],
    rounds: int = 3,
    *,
    eval_data: Path,
    strategy: str = "fedavg",
    secagg: bool = False,
    dp: bool = False,
    out: Path = Path("report.json"),
    model: str = "logreg",
    local_epochs: int = 1,
    learning_rate: float = 0.1,
    batch_size: int = 32,
    proximal_mu: float = 0.1,
    noise_multiplier: float = 1.0,
    clipping_norm: float = 1.0,
    delta: float = 1e-5,
    seed: int = 0,
    task: str = "custom",
    audit_dir: Path | None = None,
    authenticate_nodes: bool = True,
    startup_timeout: float = 120.0,
    timeout: float = 1800.0,
    **extra_settings: object,
) -> FederatedReport:
    """Run `rounds` over one SuperNode per file in `clients`; write `out` and its plot.

    `eval_data` is the held-out Parquet file the ServerApp scores each round on.
    """
    started = time.monotonic()
    certs.validate()
    clients = [Path(c).resolve() for c in clients]
    if len(clients) < 2:
        raise InvalidFederatedConfig("a deployment needs at least two SuperNodes")
    for path in [*clients, Path(eval_data)]:
        load_local_data(path)  # refuse bad files before any process starts
    out = Path(out).resolve()
    values: dict[str, object] = dict(
        rounds=rounds, strategy=strategy, model=model, local_epochs=local_epochs,
        learning_rate=learning_rate, batch_size=batch_size, proximal_mu=proximal_mu,
        min_nodes=len(clients), seed=seed, secagg=secagg,
        secagg_max_weight=float(max(count_training_rows(c) for c in clients)),
        dp=dp, dp_noise_multiplier=noise_multiplier, dp_clipping_norm=clipping_norm,
        dp_delta=delta, eval_data=str(Path(eval_data).resolve()),
        report_path=str(out.with_name(out.stem + ".server.json")),
        node_wait_timeout=startup_timeout,
    )
    settings = RunSettings.build(**{**values, **extra_settings})
    report_path = Path(settings.report_path)
    report_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="cogov-deploy-") as scratch, _federation(
        Path(scratch), certs, clients, audit_dir, authenticate_nodes, startup_timeout
    ) as fed:
        app_dir = _write_flower_app(fed.root / "app", settings)
        run_id = _submit_run(fed, app_dir)
        _wait_for_run(fed, run_id, timeout)
        if not report_path.is_file():
            raise DeploymentFailed(f"run {run_id} finished without a report\n{fed.logs()}")
        server = ServerRunResult.model_validate_json(report_path.read_text())
    centralized = train_centralized(clients, Path(eval_data), settings,
                                    Path(server.model_file))
    report = assemble_report(
        engine="deployment", task=task, server=server, centralized=centralized,
        wall_seconds=time.monotonic() - started,
    )
    return write_report(report, out)


@contextmanager
def _federation(
    root: Path,
    certs: DeployCertificates,
    clients: list[Path],
    audit_dir: Path | None,
    authenticate_nodes: bool,
    startup_timeout: float,
) -> Iterator[_Federation]:
    fed = _Federation(root, new_marker(), _free_port(), root / "cli-home", [])
    try:
        fed.start("superlink", [
            _tool("flower-superlink"),
            "--ssl-ca-certfile", str(Path(certs.ca_cert).resolve()),
            "--ssl-certfile", str(Path(certs.server_cert).resolve()),
            "--ssl-keyfile", str(Path(certs.server_key).resolve()),
            "--host", "127.0.0.1", "--port", str(fed.superlink_port),
            "--disable-runtime-dependency-installation",
            *(["--enable-supernode-auth"] if authenticate_nodes else []),
        ], root / "superlink-home")
        _wait_for_port(fed, fed.superlink_port, startup_timeout)
        _write_cli_config(fed.cli_home, fed.superlink_port, Path(certs.ca_cert).resolve())
        for index, data in enumerate(clients):
            auth: list[str] = []
            if authenticate_nodes:
                key_file = _register_node_key(fed, root / "node-keys" / f"supernode-{index}")
                auth = ["--auth-supernode-private-key", str(key_file)]
            node_config = f"local-data={json.dumps(str(data))} partition-id={index}"
            if audit_dir is not None:
                node_config += f" audit-dir={json.dumps(str(Path(audit_dir).resolve()))}"
            fed.start(f"supernode-{index}", [
                _tool("flower-supernode"),
                "--root-certificates", str(Path(certs.ca_cert).resolve()),
                "--superlink", f"127.0.0.1:{fed.superlink_port}",
                "--host", "127.0.0.1", "--port", str(_free_port()),
                "--node-config", node_config,
                "--max-wait-time", str(int(startup_timeout)),
                *auth,
            ], root / f"supernode-{index}-home")
        yield fed
    finally:
        for _, proc, _ in reversed(fed.processes):
            stop_process(proc)
        terminate_marked(fed.marker)


def _register_node_key(fed: _Federation, stem: Path) -> Path:
    """Make a SuperNode's EC P-256 key pair and register its public half with the link."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    stem.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private = stem.with_suffix(".key")
    public = stem.with_suffix(".pub")
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    result = _flwr(fed, ["supernode", "register", str(public), CONNECTION_NAME,
                         "--name", stem.name, "--format", "json"], 60)
    if result.returncode != 0 or '"success": true' not in result.stdout:
        raise DeploymentFailed(f"cannot register {stem.name}: {result.stdout}{result.stderr}")
    return private


def _submit_run(fed: _Federation, app_dir: Path) -> int:
    result = _flwr(fed, ["run", str(app_dir), CONNECTION_NAME, "--format", "json"], 120)
    try:
        answer = json.loads(result.stdout[result.stdout.index("{"):])
        if answer.get("success"):
            return int(answer["run-id"])
    except (ValueError, KeyError) as exc:
        raise DeploymentFailed(f"flwr run gave no run id: {result.stdout}\n{fed.logs()}") from exc
    raise DeploymentFailed(f"flwr run failed: {result.stdout}\n{result.stderr}\n{fed.logs()}")


def _wait_for_run(fed: _Federation, run_id: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        fed.check_alive()
        result = _flwr(fed, ["ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"],
                       60)
        try:
            runs = json.loads(result.stdout[result.stdout.index("{"):]).get("runs", [])
            status = str(runs[0]["status"]) if runs else "unknown"
        except (ValueError, KeyError):
            status = "unknown"
        if status.startswith("finished"):
            if status != "finished:completed":
                raise DeploymentFailed(f"run {run_id} ended as {status}\n{fed.logs()}")
            return
        time.sleep(1.0)
    _flwr(fed, ["stop", str(run_id), CONNECTION_NAME], 60)
    raise DeploymentFailed(f"run {run_id} still {status} after {timeout:.0f}s\n{fed.logs()}")


def _flwr(fed: _Federation, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [_tool("flwr"), *args], capture_output=True, text=True,
            env=fed.env(fed.cli_home), cwd=fed.root, timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise DeploymentFailed(f"flwr {args[0]} timed out\n{fed.logs()}") from exc


def _write_flower_app(app_dir: Path, settings: RunSettings) -> Path:
    """A minimal Flower App whose components are this package's ServerApp and ClientApp."""
    app_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "project": {
            "name": APP_NAME,
            "version": federated.__version__,
            "description": "cogov claim-risk model trained across hospitals",
            "license": "Apache-2.0",
            "dependencies": ["flwr>=1.42,<2"],
        },
        "tool": {"flwr": {"app": {
            "publisher": "cogov",
            "components": {
                "serverapp": "federated.server_app:app",
                "clientapp": "federated.client_app:app",
            },
            "config": settings.to_run_config(),
        }}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(config))
    (app_dir / "README.md").write_text("Generated by federated.deployment; do not edit.\n")
    return app_dir


def _write_cli_config(cli_home: Path, port: int, ca_cert: Path) -> None:
    cli_home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {
        "default": CONNECTION_NAME,
        CONNECTION_NAME: {"address": f"127.0.0.1:{port}", "root-certificates": str(ca_cert)},
    }}
    (cli_home / "config.toml").write_text(tomli_w.dumps(config))


def _wait_for_port(fed: _Federation, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fed.check_alive()
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentFailed(f"SuperLink did not listen on {port} in {timeout:.0f}s\n{fed.logs()}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str:
    """A Flower console script from the interpreter's own environment."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
