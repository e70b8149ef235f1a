"""Federated runs on Flower's simulation engine (Ray in a child process)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common import bytes_to_ndarray
from typer.testing import CliRunner

from federated.audit import read_outbound_records, write_outbound_record
from federated.cli import app as fl_cli
from federated.datasets import FederatedTask, load_local_data, write_breast_cancer_task
from federated.errors import InvalidFederatedConfig
from federated.privacy import client_level_epsilon
from federated.simulation import simulate
from tests.test_federated_data import synth_claim_risk

CLIENTS, ROUNDS, LOCAL_EPOCHS = 10, 10, 3
PARAMETER_SHAPES = [(1, 30), (1,)]
ALLOWED_OUTBOUND = {
    ("array", "fitres.parameters"),
    ("config", "fitres.status"),
    ("config", "fitres.metrics"),
    ("metric", "fitres.num_examples"),
    ("config", "secaggplus_configs"),
    ("array", "feature_stats"),  # per-feature sums over >= 10 rows, for standardization
    ("metric", "feature_stats_count"),
}


def ray_pids() -> set[int]:
    """Ray daemons and workers alive on this machine."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if any(tag in cmd for tag in (b"raylet", b"gcs_server", b"ray::", b"ray/_private")):
                found.add(int(entry.name))
    return found


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """FedAvg through the CLI, IID breast cancer, every outbound message recorded."""
    root = tmp_path_factory.mktemp("plain")
    before = ray_pids()
    result = CliRunner().invoke(fl_cli, [
        "simulate", "--clients", str(CLIENTS), "--rounds", str(ROUNDS),
        "--local-epochs", str(LOCAL_EPOCHS), "--audit-dir", str(root / "audit"),
        "--out", str(root / "report.json"),
    ])
    assert result.exit_code == 0, result.output
    return root, before, ray_pids()


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    """The same run with SecAgg+ in place of plain aggregation."""
    root = tmp_path_factory.mktemp("secagg")
    report = simulate(CLIENTS, ROUNDS, "breast-cancer-iid", secagg=True, out=root / "report.json",
                      local_epochs=LOCAL_EPOCHS, audit_dir=root / "audit")
    return root, report


def test_iid_federated_accuracy_within_two_points_of_centralized(plain_run):
    root, _, _ = plain_run
    report = json.loads((root / "report.json").read_text())
    assert report["federated_accuracy"] >= report["centralized_accuracy"] - 0.02
    assert report["federated_accuracy"] > 0.9
    assert [r["round"] for r in report["history"]] == list(range(ROUNDS + 1))
    for record in report["history"][1:]:
        assert {"loss", "accuracy", "auc"} <= record.keys() and record["auc"] > 0.9
        assert record["clients_contacted"] == CLIENTS
        # Up: 31 float32 parameters plus framing; nowhere near a client's rows.
        assert 31 * 4 < record["bytes_up_per_client"] < 4096
    assert report["centralized"]["epochs"] == ROUNDS * LOCAL_EPOCHS
    assert "epsilon" not in report
    assert (root / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ray_leaves_no_process_behind(plain_run):
    _, before, after = plain_run
    assert after <= before


def test_secagg_gives_the_fedavg_model(plain_run, secagg_run):
    plain_root = plain_run[0]
    _, report = secagg_run
    plain = np.load(plain_root / "report.server.model.npz")
    masked = np.load(report.model_file)
    for key in plain.files:
        # Only SecAgg+'s fixed-point quantization (2**22 levels) separates the two.
        np.testing.assert_allclose(masked[key], plain[key], rtol=0, atol=2e-4)
    plain_report = json.loads((plain_root / "report.json").read_text())
    assert report.federated_accuracy == pytest.approx(plain_report["federated_accuracy"], abs=0.01)
    # Four SecAgg+ stages per round: more messages and bytes than plain FedAvg.
    assert report.history[1].messages == 8 * CLIENTS
    assert report.history[1].bytes_up_per_client > plain_report["history"][1][
        "bytes_up_per_client"]


def _raw_rows(files) -> np.ndarray:
    rows = []
    for file in files:
        x, _ = load_local_data(file).all_rows()
        rows.append(x)
    return np.concatenate(rows)


def find_raw_rows(records, raw: np.ndarray) -> list[str]:
    """Where a raw feature row (float32 or float64, any offset) appears in the records."""
    width = raw.shape[1]
    row_bytes = {r.astype(np.float32).tobytes() for r in raw}
    encodings = [r.astype(dtype).tobytes() for r in raw for dtype in (np.float32, np.float64)]
    hits = []
    for index, arrays in records:
        for entry in index["entries"]:
            array = arrays[entry["npz"]]
            candidates = [array]
            if array.dtype == np.uint8:
                blob = array.tobytes()
                if any(enc in blob for enc in encodings):
                    hits.append(f"{entry['record']}/{entry['key']} bytes")
                with contextlib.suppress(Exception):  # not an ndarray serialization
                    candidates.append(bytes_to_ndarray(blob))
            for candidate in candidates:
                if candidate.dtype.kind != "f" or candidate.size < width:
                    continue
                flat = candidate.astype(np.float32).ravel()
                windows = np.lib.stride_tricks.sliding_window_view(flat, width)
                if any(w.tobytes() in row_bytes for w in windows):
                    hits.append(f"{entry['record']}/{entry['key']} array")
    return hits


def test_detector_finds_a_planted_row(tmp_path):
    task = write_breast_cancer_task(tmp_path / "data", clients=2)
    raw = _raw_rows(task.client_files)
    leak = RecordDict({"leak": ArrayRecord([np.concatenate([[0.5], raw[7]])])})
    write_outbound_record(tmp_path / "audit", leak)
    as_bytes = RecordDict({"c": ConfigRecord({"blob": raw[3].astype(np.float64).tobytes()})})
    write_outbound_record(tmp_path / "audit", as_bytes)
    clean = RecordDict({"p": ArrayRecord([raw[5] + 0.25])})
    write_outbound_record(tmp_path / "audit", clean)
    assert len(find_raw_rows(read_outbound_records(tmp_path / "audit"), raw)) == 2


@pytest.mark.parametrize("which", ["plain", "secagg"])
def test_no_raw_row_leaves_a_client(which, plain_run, secagg_run, tmp_path):
    root = plain_run[0] if which == "plain" else secagg_run[0]
    records = read_outbound_records(root / "audit")
    # One feature-stats answer per client, then one fit reply per client per round in
    # plain FedAvg, four SecAgg+ stages otherwise.
    assert len(records) == CLIENTS + CLIENTS * ROUNDS * (1 if which == "plain" else 4)
    kinds = {(e["kind"], e["record"]) for index, _ in records for e in index["entries"]}
    assert kinds <= ALLOWED_OUTBOUND
    shapes = {(e["record"], arrays[e["npz"]].shape) for index, arrays in records
              for e in index["entries"] if e["kind"] == "array"}
    stats = {("feature_stats", (30,))}
    if which == "plain":
        assert shapes == stats | {("fitres.parameters", s) for s in PARAMETER_SHAPES}
    else:
        assert shapes == stats  # SecAgg+ replaces plaintext parameters by masked vectors
    task = write_breast_cancer_task(tmp_path, clients=CLIENTS)  # same seed: same rows
    assert find_raw_rows(records, _raw_rows(task.client_files)) == []


def drop_hospital_zero_in_round_two(msg, ctxt, call_next):
    """Fault injection: hospital 0 fails while computing its masked update in round 2."""
    if (int(ctxt.node_config["partition-id"]) == 0 and msg.metadata.group_id == "2"
            and msg.metadata.message_type == "train" and msg.content.array_records):
        raise RuntimeError("hospital 0 lost power mid-round")
    return call_next(msg, ctxt)


def test_a_client_dropping_mid_round_does_not_stop_secagg(tmp_path):
    report = simulate(5, 3, "breast-cancer-iid", secagg=True, out=tmp_path / "r.json",
                      client_mods=[drop_hospital_zero_in_round_two])
    failed = [r.failed_replies for r in report.history[1:]]
    assert failed == [0, 1, 0]
    second = report.history[2]
    # The round still aggregated (4 survivors' masks removed with the dropped one's
    # reconstructed key) and moved the model.
    assert second.train_loss is not None
    assert second.loss != report.history[1].loss
    assert report.federated_accuracy > 0.85


def test_dp_claim_risk_mlp_reports_epsilon_and_clips(tmp_path):
    files = []
    for hospital in range(5):
        path = tmp_path / f"hospital-{hospital}.parquet"
        synth_claim_risk(240, seed=10 + hospital).to_parquet(path)
        files.append(path)
    holdout = tmp_path / "holdout.parquet"
    synth_claim_risk(400, seed=99).drop(columns=["split"]).to_parquet(holdout)
    task = FederatedTask("claim-risk", tuple(files), holdout,
                         load_local_data(holdout).feature_names)
    clip, rounds = 0.5, 4
    report = simulate(5, rounds, task, dp=True, model="mlp", out=tmp_path / "dp.json",
                      fraction_fit=0.6, noise_multiplier=0.3, clipping_norm=clip,
                      learning_rate=0.3, local_epochs=5, audit_dir=tmp_path / "audit")
    assert report.server.sampled_per_round == 3
    assert report.server.feature_scaling["clients_reporting"] == 5
    assert report.epsilon == pytest.approx(client_level_epsilon(0.3, 0.6, rounds, 1e-5))
    saved = json.loads((tmp_path / "dp.json").read_text())
    assert saved["epsilon"] == pytest.approx(report.epsilon) and saved["delta"] == 1e-5
    # Clipping: two clients of one round start from the same global model, so their
    # returned models lie within 2 * clip of each other.
    by_round: dict[str, list[np.ndarray]] = {}
    for index, arrays in read_outbound_records(tmp_path / "audit"):
        if index["group_id"] == "feature-stats":
            continue
        flat = np.concatenate([arrays[e["npz"]].ravel() for e in index["entries"]
                               if e["record"] == "fitres.parameters"])
        by_round.setdefault(index["group_id"], []).append(flat)
    assert sorted(by_round) == [str(r) for r in range(1, rounds + 1)]
    for models in by_round.values():
        assert len(models) == 3
        for a in models:
            for b in models:
                assert np.linalg.norm(a - b) <= 2 * clip + 1e-4
    majority = 1 - load_local_data(holdout).y_train.mean()
    assert report.federated_accuracy > majority


def test_bad_requests_fail_before_any_process_starts(tmp_path):
    with pytest.raises(InvalidFederatedConfig, match="unknown task"):
        simulate(3, 1, "mnist", out=tmp_path / "r.json")
    with pytest.raises(InvalidFederatedConfig, match="min_nodes >= 3"):
        simulate(2, 1, secagg=True, out=tmp_path / "r.json")
    with pytest.raises(InvalidFederatedConfig, match="rounds"):
        simulate(3, 0, out=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
