"""The deployment engine: SuperLink and SuperNodes as real processes over TLS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federated.datasets import write_breast_cancer_task
from federated.deployment import DeployCertificates, deploy
from federated.errors import InvalidCertificates, InvalidLocalData
from federated.loopback_pki import issue_loopback_certificates as issue_test_pki

FLOWER_PROCESSES = (b"flower-superlink", b"flower-supernode", b"flower-superexec",
                    b"flwr-serverapp", b"flwr-clientapp")


def flower_pids() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and any(name in cmd for name in FLOWER_PROCESSES):
                found.add(int(entry.name))
    return found


@pytest.mark.slow
def test_superlink_and_supernodes_over_tls(tmp_path):
    certs = issue_test_pki(tmp_path / "pki")
    task = write_breast_cancer_task(tmp_path / "data", clients=2)
    before = flower_pids()
    report = deploy(certs, list(task.client_files), rounds=2, eval_data=task.holdout_file,
                    out=tmp_path / "out" / "report.json", task=task.name, local_epochs=3)
    assert flower_pids() <= before  # SuperLink, SuperNodes, SuperExec, app processes gone
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["engine"] == "deployment" and saved["clients"] == 2
    assert saved["federated_accuracy"] > 0.85 and saved["centralized_accuracy"] > 0.85
    assert [r["round"] for r in saved["history"]] == [0, 1, 2]
    for record in saved["history"][1:]:
        assert record["clients_contacted"] == 2 and record["failed_replies"] == 0
        assert record["bytes_up_per_client"] > 31 * 4
    assert report.history[2].loss < report.history[0].loss
    assert (tmp_path / "out" / "report.png").is_file()


def test_certificate_from_another_ca_is_refused_before_start(tmp_path):
    ours = issue_test_pki(tmp_path / "ours")
    theirs = issue_test_pki(tmp_path / "theirs", ca_name="someone else's CA")
    task = write_breast_cancer_task(tmp_path / "data", clients=2)
    mixed = DeployCertificates(ours.ca_cert, theirs.server_cert, theirs.server_key)
    before = flower_pids()
    with pytest.raises(InvalidCertificates, match="not issued by the CA"):
        deploy(mixed, list(task.client_files), eval_data=task.holdout_file,
               out=tmp_path / "r.json")
    garbage = DeployCertificates(ours.ca_cert, ours.server_cert, tmp_path / "none.key")
    with pytest.raises(InvalidCertificates, match="cannot load"):
        deploy(garbage, list(task.client_files), eval_data=task.holdout_file,
               out=tmp_path / "r.json")
    with pytest.raises(InvalidLocalData):
        deploy(ours, [task.client_files[0], tmp_path / "missing.parquet"],
               eval_data=task.holdout_file, out=tmp_path / "r.json")
    assert flower_pids() <= before and not (tmp_path / "r.json").exists()
