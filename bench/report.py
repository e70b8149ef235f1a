"""`cogov bench all`: run every suite side by side and write one dated report.

Each suite is a module `bench.<name>` with `run(quick) -> dict` that writes
`bench/results/latest/<name>.json` and `<name>.md`. Suites run one after the
other, each in its own process (CrypTen, Ray and the process pools keep global
state), so a failing suite is reported and the others still run. The report
(`bench/results/<date>/report.md`, the JSON and the PNG plots) names the
machine's CPU and load, and is also copied to `bench/results/latest/`.
"""

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LATEST = RESULTS / "latest"
SUITES: tuple[str, ...] = (
    "tokenize",
    "psi",
    "stats",
    "ledger",
    "claim_engines",
    "claim_nodes",
    "federated",
    "load",
    "secure_room",
)


def available_suites() -> list[str]:
    here = Path(__file__).resolve().parent
    return [name for name in SUITES if (here / f"{name}.py").exists()]


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg()[0],
    }


def run_suite(name: str, quick: bool, timeout_s: float) -> dict:
    """Run one suite in a fresh process; the outcome, its seconds and its JSON."""
    started = time.monotonic()
    command = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if quick else [])
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=Path(__file__).resolve().parents[1],
        )
        outcome = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        tail = done.stderr[-1500:] if done.returncode else ""
    except subprocess.TimeoutExpired:
        outcome, tail = f"timed out after {timeout_s:.0f} s", ""
    result_file = LATEST / f"{name}.json"
    data = json.loads(result_file.read_text()) if result_file.exists() else None
    return {
        "suite": name,
        "outcome": outcome,
        "seconds": round(time.monotonic() - started, 1),
        "stderr_tail": tail,
        "result": data,
    }


PANELS = (  # (what a headline's key contains, axis label)
    ("p50_ms", "latency, ms (p50)"),
    ("per_s", "throughput, per second"),
    ("ratio", "ratio"),
    ("speedup", "speedup"),
    ("accuracy", "accuracy"),
)


def _plot(runs: list[dict], out_dir: Path) -> list[str]:
    """One figure per suite, a panel per unit, of the headline numbers; returns PNG names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for run in runs:
        groups = [
            (
                label,
                [
                    (k, v)
                    for k, v in headline_numbers(run["suite"], run["result"])
                    if marker in k.rsplit(".", 1)[-1]
                ],
            )
            for marker, label in PANELS
        ]
        groups = [g for g in groups if g[1]]
        if not groups:
            continue
        heights = [len(bars) for _, bars in groups]
        fig, axes = plt.subplots(
            len(groups),
            1,
            figsize=(8, 0.42 * sum(heights) + 1.4 * len(groups)),
            gridspec_kw={"height_ratios": heights},
            squeeze=False,
        )
        for ax, (label, bars) in zip(axes[:, 0], groups, strict=True):
            names, values = zip(*bars, strict=True)
            ax.barh(names, values, color="#3b6ea5")
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.set_xlim(left=0, right=max(values) * 1.18)
            for i, v in enumerate(values):
                ax.text(v, i, f" {v:,.3g}", va="center", fontsize=8)
        axes[0, 0].set_title(run["suite"])
        fig.tight_layout()
        name = f"{run['suite']}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def headline_numbers(suite: str, data: dict | None) -> list[tuple[str, float]]:
    """The few numbers worth a picture, read from a suite's JSON (absent ones skipped)."""
    if not data:
        return []
    found: list[tuple[str, float]] = []

    def walk(prefix: str, value: object, depth: int = 0) -> None:
        if depth > 4 or len(found) >= 14:
            return
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner, depth + 1)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            key = prefix.rsplit(".", 1)[-1]
            if any(word in key for word in ("p50_ms", "per_s", "ratio", "speedup", "accuracy")):
                found.append((prefix[-48:], float(value)))

    walk("", data)
    return found


def write_report(runs: list[dict], quick: bool, started: dt.datetime) -> Path:
    day = started.strftime("%Y-%m-%d")
    out_dir = RESULTS / day
    out_dir.mkdir(parents=True, exist_ok=True)
    host = machine()
    plots = _plot(runs, out_dir)
    lines = [
        f"# cogov benchmark report, {day}",
        "",
        f"Machine: {host['cpu']}, {host['cores']} cores, Python {host['python']}, "
        f"load average {host['load_average']:.1f} at the end. Mode: "
        f"{'quick' if quick else 'full'}. Every comparison below was measured side by side "
        "in this run; numbers are medians over the repeats each suite states.",
        "",
        "| suite | outcome | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {r['suite']} | {r['outcome']} | {r['seconds']} |" for r in runs]
    for run in runs:
        md = LATEST / f"{run['suite']}.md"
        lines += ["", "---", ""]
        if md.exists() and run["outcome"] == "ok":
            lines.append(md.read_text().replace("\n# ", "\n## ").lstrip("# ").join(["## ", ""]))
        else:
            lines.append(f"## {run['suite']}\n\nNo result: {run['outcome']}.")
            if run["stderr_tail"]:
                lines += ["", "```", run["stderr_tail"], "```"]
        if f"{run['suite']}.png" in plots:
            lines += ["", f"![{run['suite']}]({run['suite']}.png)"]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out_dir / "report.json").write_text(
        json.dumps(
            {"machine": host, "quick": quick, "started": started.isoformat(), "runs": runs},
            indent=2,
            default=str,
        )
    )
    for name in ["report.md", "report.json", *plots]:
        shutil.copyfile(out_dir / name, LATEST / name)
    return report


def run_all(
    quick: bool = False, suites: list[str] | None = None, timeout_s: float = 1800.0
) -> Path:
    started = dt.datetime.now(dt.UTC)
    LATEST.mkdir(parents=True, exist_ok=True)
    runs = [run_suite(name, quick, timeout_s) for name in (suites or available_suites())]
    return write_report(runs, quick, started)


if __name__ == "__main__":
    print(run_all(quick="--quick" in sys.argv))
