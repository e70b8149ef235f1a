"""Simulation engine: many virtual hospitals on Ray, in a child process we fully own.

`simulate` prepares the data, runs Flower's simulation runtime in a separate
Python process (so Ray's daemons live in one session we can always tear down),
trains the centralized baseline, and writes the report JSON and plot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from federated.audit import AUDIT_DIR_KEY
from federated.baseline import train_centralized
from federated.client_app import LOCAL_DATA_KEY
from federated.datasets import FederatedTask, count_training_rows, write_breast_cancer_task
from federated.errors import InvalidFederatedConfig, SimulationFailed
from federated.processes import MARKER_ENV, new_marker, stop_process, terminate_marked
from federated.report import FederatedReport, ServerRunResult, assemble_report, write_report
from federated.settings import SIMULATION_LOCAL_EPOCHS, RunSettings

BUILTIN_TASKS = ("breast-cancer-iid", "breast-cancer-dirichlet")


@dataclass
class SimulationJob:
    """What the child process needs (pickled with cloudpickle, so mods may be closures)."""

    settings: RunSettings
    client_files: list[str]
    audit_dir: str = ""
    extra_mods: list[Mod] = field(default_factory=list)
    num_cpus: int = 2
    cpus_per_client: float = 1.0
    object_store_mb: int = 128
    ray_temp_dir: str = ""


def simulate(
    clients: int = 100,
    rounds: int = 10,
    task: str | FederatedTask = "breast-cancer-iid",
    strategy: str = "fedavg",
    secagg: bool = False,
    dp: bool = False,
    out: Path = Path("report.json"),
    *,
    model: str = "logreg",
    local_epochs: int = SIMULATION_LOCAL_EPOCHS,
    learning_rate: float = 0.1,
    batch_size: int = 32,
    proximal_mu: float = 0.1,
    fraction_fit: float = 1.0,
    noise_multiplier: float = 1.0,
    clipping_norm: float = 1.0,
    delta: float = 1e-5,
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
    num_cpus: int = 2,
    cpus_per_client: float = 1.0,
    audit_dir: Path | None = None,
    client_mods: Sequence[Mod] = (),
    timeout: float = 1800.0,
    **extra_settings: object,
) -> FederatedReport:
    """Run `rounds` of federated training over `clients` simulated hospitals.

    `task` is a built-in name (`breast-cancer-iid`, `breast-cancer-dirichlet`) or a
    `FederatedTask` naming one Parquet file per client plus a held-out file (then
    `clients` must equal its number of files). Writes `out` (JSON) and its `.png`.
    `client_mods` are extra ClientApp mods (run outermost), e.g. for fault injection.
    """
    started = time.monotonic()
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="cogov-fl-") as scratch_name:
        scratch = Path(scratch_name)
        fed_task = _resolve_task(task, clients, dirichlet_alpha, seed, scratch / "data")
        files = list(fed_task.client_files)
        max_rows = max(count_training_rows(f) for f in files)
        values: dict[str, object] = dict(
            rounds=rounds, strategy=strategy, model=model, local_epochs=local_epochs,
            learning_rate=learning_rate, batch_size=batch_size, proximal_mu=proximal_mu,
            fraction_fit=fraction_fit, min_nodes=len(files), seed=seed,
            secagg=secagg, secagg_max_weight=float(max_rows),
            dp=dp, dp_noise_multiplier=noise_multiplier, dp_clipping_norm=clipping_norm,
            dp_delta=delta, eval_data=str(fed_task.holdout_file),
            report_path=str(out.with_name(out.stem + ".server.json")),
        )
        settings = RunSettings.build(**{**values, **extra_settings})
        job = SimulationJob(
            settings=settings,
            client_files=[str(f) for f in files],
            audit_dir=str(audit_dir) if audit_dir else "",
            extra_mods=list(client_mods),
            num_cpus=num_cpus,
            cpus_per_client=cpus_per_client,
            ray_temp_dir=str(scratch / "ray"),
        )
        server = run_simulation_job(job, scratch, timeout)
        centralized = train_centralized(files, fed_task.holdout_file, settings,
                                        Path(server.model_file))
    report = assemble_report(
        engine="simulation",
        task=fed_task.name,
        server=server,
        centralized=centralized,
        wall_seconds=time.monotonic() - started,
    )
    return write_report(report, out)


def run_simulation_job(job: SimulationJob, scratch: Path, timeout: float) -> ServerRunResult:
    """Run `job` in a child process; every process it leaves behind is stopped."""
    import cloudpickle

    job_file = scratch / "job.pkl"
    job_file.write_bytes(cloudpickle.dumps(job))
    log_file = scratch / "simulation.log"
    marker = new_marker()
    env = {
        **os.environ,
        MARKER_ENV: marker,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
    }
    report_path = Path(job.settings.report_path)
    report_path.unlink(missing_ok=True)
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "federated.simulation", str(job_file)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_process(proc)
            terminate_marked(marker)
            shutil.rmtree(job.ray_temp_dir, ignore_errors=True)
    if code != 0 or not report_path.is_file():
        tail = log_file.read_text(errors="replace")[-4000:]
        why = "timed out" if code is None else f"exited with {code}"
        raise SimulationFailed(f"simulation {why}; log tail:\n{tail}")
    return ServerRunResult.model_validate_json(report_path.read_text())


def simulated_node_config_mod(node_configs: dict[int, dict[str, str]]) -> Mod:
    """Give each virtual node the node config a real SuperNode gets from `--node-config`."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        partition = int(ctxt.node_config["partition-id"])
        ctxt.node_config.update(node_configs[partition])
        return call_next(msg, ctxt)

    return mod


def _resolve_task(
    task: str | FederatedTask, clients: int, alpha: float, seed: int, data_dir: Path
) -> FederatedTask:
    if isinstance(task, FederatedTask):
        if clients != len(task.client_files):
            raise InvalidFederatedConfig(
                f"clients={clients} but the task has {len(task.client_files)} client files"
            )
        return task
    if task == "breast-cancer-iid":
        return write_breast_cancer_task(data_dir, clients, "iid", seed=seed)
    if task == "breast-cancer-dirichlet":
        return write_breast_cancer_task(data_dir, clients, "dirichlet", alpha=alpha, seed=seed)
    raise InvalidFederatedConfig(f"unknown task {task!r} (one of {BUILTIN_TASKS})")


def _run_job_in_this_process(job: SimulationJob) -> None:
    """Child-process entry: Flower's simulation runtime over Ray, then Ray shut down."""
    import logging

    from flwr.simulation import run_simulation

    from federated.client_app import build_client_app
    from federated.server_app import build_server_app

    node_configs = {}
    for partition, path in enumerate(job.client_files):
        node_configs[partition] = {LOCAL_DATA_KEY: path}
        if job.audit_dir:
            node_configs[partition][AUDIT_DIR_KEY] = job.audit_dir
    client_app = build_client_app([simulated_node_config_mod(node_configs), *job.extra_mods])
    backend_config = {
        "client_resources": {"num_cpus": job.cpus_per_client, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": job.num_cpus,
            "num_gpus": 0,
            "object_store_memory": job.object_store_mb * 1024 * 1024,
            "logging_level": logging.ERROR,
            "log_to_driver": True,
            "_temp_dir": job.ray_temp_dir,
        },
    }
    try:
        run_simulation(
            server_app=build_server_app(job.settings),
            client_app=client_app,
            num_supernodes=len(job.client_files),
            backend_config=backend_config,
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()


if __name__ == "__main__":
    import cloudpickle

    _run_job_in_this_process(cloudpickle.loads(Path(sys.argv[1]).read_bytes()))
