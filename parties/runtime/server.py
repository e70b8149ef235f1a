"""Run one node: open its store, mount its role behaviour, serve it over mutual TLS."""

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from parties.runtime.app import build_node_app
from parties.runtime.context import NodeContext
from parties.runtime.mtls_server import mutual_tls_protocol
from parties.runtime.node_log import NodeLog
from parties.runtime.secrets import COMPONENT as SECRETS
from parties.runtime.secrets import MIGRATIONS as SECRETS_MIGRATIONS
from parties.runtime.secrets import check_private_modes
from parties.runtime.service import Service
from parties.runtime.state import StateDir
from parties.runtime.store import NodeStore
from parties.runtime.tls import ReloadingServerContext
from parties.runtime.topology import Topology


def open_node(
    state: StateDir, topology: Topology, name: str, services: Sequence[Service]
) -> NodeContext:
    """The context of node `name`: its store migrated for `services`, its log open, its
    directory and secret files private (tightened and logged if they were not)."""
    paths = state.node(name)
    if not paths.cert.exists():
        raise FileNotFoundError(
            f"{paths.cert} is missing: run `cogov pki init` (or `cogov pki issue {name}`)"
        )
    components = [(SECRETS, SECRETS_MIGRATIONS)]
    for service in services:
        components.extend(service.components)
    tightened = check_private_modes(paths.root)  # before a looser file is opened
    store = NodeStore(paths.db, components)
    ctx = NodeContext(name, topology, state, store, NodeLog(paths.log, name))
    ctx.secrets  # noqa: B018  (creates kek.key and admin.key now, not on a first request)
    if tightened:
        ctx.log.event("state_modes_tightened", files=tightened)
    return ctx


def serve_node(
    state: StateDir, topology: Topology, name: str, services: Sequence[Service]
) -> None:
    """Serve node `name` until SIGTERM/SIGINT; the PID file lives as long as the process."""
    ctx = open_node(state, topology, name, services)
    spec = ctx.spec
    app = build_node_app(ctx, [r for s in services for r in s.routers(ctx)])
    tls = ReloadingServerContext(state, name)

    def on_refused(peer: str, reason: str) -> None:
        ctx.log.event("tls_refused", peer=peer, reason=reason)

    def on_dropped(peer: str, reason: str) -> None:
        ctx.log.event("connection_dropped", peer=peer, reason=reason)

    config = uvicorn.Config(
        app,
        host=spec.host,
        port=spec.port,
        http=mutual_tls_protocol(tls.current, on_refused, on_dropped),  # type: ignore[arg-type]
        loop="asyncio",  # see parties.runtime.mtls_server
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        limit_concurrency=512,
    )
    pid_file: Path = ctx.paths.pid
    pid_file.write_text(str(os.getpid()))
    ctx.log.event("node_started", role=spec.role.value, trust_domain=spec.trust_domain,
                  url=spec.url, services=[s.name for s in services])
    for service in services:
        if service.background is not None:
            threading.Thread(
                target=service.background, args=(ctx,), name=service.name, daemon=True
            ).start()
    try:
        uvicorn.Server(config).run()
    finally:
        ctx.log.event("node_stopped")
        if pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
        ctx.close()
