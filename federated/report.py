"""The run report: per-round history, the centralized baseline, JSON and a PNG plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class RoundRecord(BaseModel):
    """Held-out scores after one round (round 0 is the initial model) and its traffic."""

    model_config = ConfigDict(extra="forbid")

    round: int
    loss: float | None
    accuracy: float | None
    auc: float | None
    train_loss: float | None = None
    clients_contacted: int = 0
    bytes_up_per_client: float = 0.0
    bytes_down_per_client: float = 0.0
    bytes_up_max: int = 0
    bytes_total: int = 0
    messages: int = 0
    failed_replies: int = 0
    elapsed_seconds: float = 0.0


class ServerRunResult(BaseModel):
    """What the ServerApp itself knows at the end of a run (written by the server)."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any]
    nodes: int
    sampled_per_round: int
    history: list[RoundRecord]
    model_file: str
    wall_seconds: float
    epsilon: float | None = None
    delta: float | None = None
    dp_sample_rate: float | None = None
    feature_scaling: dict[str, int] | None = None


class CentralizedBaseline(BaseModel):
    """The same model trained on the pooled client rows for the same total epochs."""

    model_config = ConfigDict(extra="forbid")

    epochs: int
    rows: int
    loss: float | None
    accuracy: float | None
    auc: float | None
    seconds: float


class FederatedReport(BaseModel):
    """The whole run, as written to `--out report.json`."""

    model_config = ConfigDict(extra="forbid")

    engine: str
    task: str
    clients: int
    rounds: int
    strategy: str
    model: str
    secagg: bool
    dp: bool
    federated_accuracy: float | None
    centralized_accuracy: float | None
    accuracy_ratio: float | None
    federated_auc: float | None
    centralized_auc: float | None
    epsilon: float | None = None
    delta: float | None = None
    history: list[RoundRecord]
    centralized: CentralizedBaseline
    server: ServerRunResult
    wall_seconds: float
    report_file: str = ""
    plot_file: str = ""
    model_file: str = ""

    def to_json_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if not self.dp:  # epsilon/delta only describe a DP run
            data.pop("epsilon")
            data.pop("delta")
        return _finite(data)


def assemble_report(
    *,
    engine: str,
    task: str,
    server: ServerRunResult,
    centralized: CentralizedBaseline,
    wall_seconds: float,
) -> FederatedReport:
    """Combine the server's result with the baseline into the final report."""
    settings = server.settings
    final = server.history[-1] if server.history else None
    fed_acc = final.accuracy if final else None
    cen_acc = centralized.accuracy
    ratio = fed_acc / cen_acc if fed_acc is not None and cen_acc else None
    return FederatedReport(
        engine=engine,
        task=task,
        clients=server.nodes,
        rounds=int(settings["rounds"]),
        strategy=str(settings["strategy"]),
        model=str(settings["model"]),
        secagg=bool(settings["secagg"]),
        dp=bool(settings["dp"]),
        federated_accuracy=fed_acc,
        centralized_accuracy=cen_acc,
        accuracy_ratio=ratio,
        federated_auc=final.auc if final else None,
        centralized_auc=centralized.auc,
        epsilon=server.epsilon,
        delta=server.delta,
        history=server.history,
        centralized=centralized,
        server=server,
        wall_seconds=wall_seconds,
        model_file=server.model_file,
    )


def write_report(report: FederatedReport, out: Path) -> FederatedReport:
    """Write `out` (JSON) and `out` with a `.png` suffix (plot); both atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_suffix(".png")
    report = report.model_copy(update={"report_file": str(out), "plot_file": str(plot)})
    write_plot(report, plot)
    write_json_atomic(out, report.to_json_dict())
    return report


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, sort_keys=False))
    os.replace(tmp, path)


def write_plot(report: FederatedReport, path: Path) -> None:
    """Accuracy, AUC and loss per round, with the centralized baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in report.history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("accuracy", report.centralized.accuracy),
        ("auc", report.centralized.auc),
        ("loss", report.centralized.loss),
    )
    for ax, (name, baseline) in zip(axes, panels, strict=True):
        values = [getattr(r, name) for r in report.history]
        ax.plot(rounds, [math.nan if v is None else v for v in values], marker="o",
                label="federated")
        if baseline is not None:
            ax.axhline(baseline, color="tab:red", linestyle="--", label="centralized")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    flags = [report.strategy] + (["SecAgg+"] if report.secagg else []) + (
        [f"DP eps={report.epsilon:.2f}"] if report.dp and report.epsilon is not None else [])
    fig.suptitle(f"{report.task}: {report.clients} clients, {report.engine} ({', '.join(flags)})")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: map them to None (infinite epsilon becomes null too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
