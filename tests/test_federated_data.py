"""Fast checks of the federated building blocks (no Flower run)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.accountants import RDPAccountant
from sklearn.metrics import roc_auc_score

from federated.datasets import (
    load_local_data,
    partition_dirichlet,
    partition_iid,
    pool_local_data,
    write_breast_cancer_task,
)
from federated.errors import InvalidFederatedConfig, InvalidLocalData
from federated.models import build_model, get_weights, set_weights
from federated.privacy import client_level_epsilon
from federated.scaling import scaling_from_rows, scaling_from_sums
from federated.settings import RunSettings
from federated.training import evaluate, roc_auc, train_epochs


def synth_claim_risk(rows: int, seed: int) -> pd.DataFrame:
    """Claim-risk rows shaped like the lead's files: visit features plus an anomaly label.

    Honest claims ask for about what the hospital billed for a visit that exists;
    inflated claims ask for much more, fabricated ones have no matching visit.
    """
    rng = np.random.default_rng(seed)
    billed = rng.lognormal(mean=7.0, sigma=0.8, size=rows)
    kind = rng.choice(["honest", "inflated", "fabricated"], p=[0.7, 0.2, 0.1], size=rows)
    ratio = np.where(kind == "inflated", rng.uniform(1.4, 3.0, rows), rng.normal(1.0, 0.05, rows))
    visit_found = np.where(kind == "fabricated", 0.0, 1.0)
    visit_found = np.where(rng.random(rows) < 0.03, 1.0 - visit_found, visit_found)  # noise
    days = np.where(kind == "fabricated", rng.integers(5, 60, rows), rng.integers(0, 2, rows))
    # Raw scales on purpose (log amounts near 7, days up to 60): the federation has
    # to standardize them itself.
    return pd.DataFrame({
        "log_billed": np.log(billed),
        "log_claimed": np.log(billed * ratio),
        "claim_to_bill_ratio": ratio,
        "visit_found": visit_found,
        "days_from_visit": days.astype(np.float64),
        "length_of_stay": rng.poisson(2.0, rows).astype(np.float64),
        "line_items": rng.poisson(5.0, rows).astype(np.float64),
        "label": (kind != "honest").astype(np.int64),
        "split": np.where(rng.random(rows) < 0.2, "test", "train"),
    })


def test_load_local_data_splits_rows(tmp_path):
    frame = synth_claim_risk(200, seed=1)
    frame.to_parquet(tmp_path / "h.parquet")
    data = load_local_data(tmp_path / "h.parquet")
    assert data.num_features == 7 and "label" not in data.feature_names
    assert len(data.y_train) == (frame.split == "train").sum()
    assert len(data.y_test) == (frame.split == "test").sum()
    assert data.x_train.dtype == np.float32


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.drop(columns=["label"]), "no 'label'"),
        (lambda f: f.assign(label=2), "only 0 and 1"),
        (lambda f: f.assign(log_billed="x"), "non-numeric"),
        (lambda f: f.assign(log_billed=np.nan), "NaN"),
        (lambda f: f.assign(split="validation"), "unknown 'split'"),
        (lambda f: f.assign(split="test"), "no training rows"),
        (lambda f: f[["label", "split"]], "no feature columns"),
    ],
)
def test_bad_local_data_is_refused(tmp_path, mutate, message):
    mutate(synth_claim_risk(20, seed=2)).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InvalidLocalData, match=message):
        load_local_data(tmp_path / "bad.parquet")


def test_missing_or_garbage_file_is_refused(tmp_path):
    with pytest.raises(InvalidLocalData, match="not found"):
        load_local_data(tmp_path / "absent.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InvalidLocalData, match="cannot read"):
        load_local_data(tmp_path / "junk.parquet")


def test_breast_cancer_iid_split_covers_every_row_once(tmp_path):
    task = write_breast_cancer_task(tmp_path, clients=7, partition="iid", seed=3)
    assert len(task.client_files) == 7
    pooled = pool_local_data(list(task.client_files))
    holdout = load_local_data(task.holdout_file)
    x_pool = np.concatenate([pooled.x_train, pooled.x_test])
    x_hold, _ = holdout.all_rows()
    assert len(x_pool) + len(x_hold) == 569  # every row of the bundled set, once
    assert len({r.tobytes() for r in x_pool} | {r.tobytes() for r in x_hold}) == 569
    sizes = [len(load_local_data(f).all_rows()[1]) for f in task.client_files]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_split_is_seeded_skewed_and_never_empty():
    labels = np.array([0] * 300 + [1] * 150)
    a = partition_dirichlet(labels, clients=20, alpha=0.5, seed=4)
    b = partition_dirichlet(labels, clients=20, alpha=0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(len(p) > 0 for p in a)
    assert sorted(np.concatenate(a).tolist()) == list(range(450))
    iid = partition_iid(450, clients=20, seed=4)

    def skew(parts):
        return np.mean([abs(labels[p].mean() - labels.mean()) for p in parts])

    assert skew(a) > 2 * skew(iid)


def test_partition_arguments_are_checked():
    with pytest.raises(InvalidFederatedConfig):
        partition_iid(5, clients=6, seed=0)
    with pytest.raises(InvalidFederatedConfig):
        partition_dirichlet(np.zeros(10), clients=2, alpha=0.0, seed=0)


def test_auc_matches_scikit_learn_including_ties():
    rng = np.random.default_rng(5)
    for _ in range(50):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        scores = np.round(rng.random(40), 1)
        assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_claim_risk_models_learn_anomalies(kind):
    train, test = synth_claim_risk(1500, seed=6), synth_claim_risk(500, seed=7)
    features = [c for c in train.columns if c not in ("label", "split")]
    scaling = scaling_from_rows(train[features].to_numpy())
    model = build_model(kind, len(features), seed=1)
    train_epochs(model, scaling.apply(train[features].to_numpy()),
                 train.label.to_numpy(np.float32),
                 epochs=30, learning_rate=0.2, batch_size=32, seed=1)
    scores = evaluate(model, scaling.apply(test[features].to_numpy()), test.label.to_numpy())
    majority = 1 - test.label.mean()
    assert scores.accuracy > max(0.9, majority + 0.15)
    assert scores.auc > 0.9


def test_weights_round_trip_and_shape_check():
    model = build_model("mlp", 5, hidden=4, seed=2)
    weights = get_weights(model)
    assert [w.shape for w in weights] == [(4, 5), (4,), (1, 4), (1,)]
    other = build_model("mlp", 5, hidden=4, seed=3)
    set_weights(other, weights)
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(other), weights, strict=True))
    with pytest.raises(InvalidFederatedConfig, match="shape mismatch"):
        set_weights(build_model("mlp", 6, hidden=4), weights)
    with pytest.raises(InvalidFederatedConfig, match="unknown model"):
        build_model("forest", 5)


def test_fedprox_term_keeps_local_model_near_the_global_one():
    frame = synth_claim_risk(300, seed=8)
    x = scaling_from_rows(frame.drop(columns=["label", "split"]).to_numpy()).apply(
        frame.drop(columns=["label", "split"]).to_numpy())
    y = frame.label.to_numpy(np.float32)

    def drift(mu):
        model = build_model("logreg", x.shape[1], seed=4)
        start = [p.detach().clone() for p in model.parameters()]
        train_epochs(model, x, y, epochs=20, learning_rate=0.2, batch_size=16, seed=4,
                     proximal_mu=mu)
        return float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start,
                                                               strict=True)))

    assert drift(5.0) < 0.5 * drift(0.0)
    assert torch.get_num_threads() == 1


def test_settings_round_trip_and_refusals():
    settings = RunSettings.build(rounds=3, strategy="fedprox", secagg=True, min_nodes=4)
    config = settings.to_run_config()
    assert config["proximal-mu"] == 0.1 and config["secagg"] is True
    assert RunSettings.from_run_config(config) == settings
    with pytest.raises(InvalidFederatedConfig, match="strategy"):
        RunSettings.build(strategy="fedsgd")
    with pytest.raises(InvalidFederatedConfig, match="min_nodes >= 3"):
        RunSettings.build(secagg=True, min_nodes=2)
    with pytest.raises(InvalidFederatedConfig, match=r"unknown_key|Extra inputs"):
        RunSettings.from_run_config({"unknown-key": 1})


def test_epsilon_comes_from_the_rdp_accountant():
    reference = RDPAccountant()
    for _ in range(10):
        reference.step(noise_multiplier=1.1, sample_rate=0.2)
    expected = reference.get_epsilon(delta=1e-5)
    assert client_level_epsilon(1.1, 0.2, 10, 1e-5) == pytest.approx(expected)
    assert client_level_epsilon(2.0, 0.2, 10, 1e-5) < expected < client_level_epsilon(
        1.1, 0.2, 40, 1e-5)
    assert client_level_epsilon(0.0, 0.2, 10, 1e-5) == float("inf")


def test_pooled_sums_give_the_pooled_mean_and_std():
    rng = np.random.default_rng(9)
    parts = [rng.normal(loc=i, scale=1 + i, size=(20 + 7 * i, 4)) for i in range(3)]
    for part in parts:
        part[:, 3] = 5.0  # a constant feature keeps scale 1
    pooled = np.concatenate(parts)
    scaling = scaling_from_sums(
        len(pooled),
        sum(p.sum(axis=0) for p in parts),
        sum((p * p).sum(axis=0) for p in parts),
        clients=3,
    )
    np.testing.assert_allclose(scaling.mean, pooled.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(scaling.scale[:3], pooled.std(axis=0)[:3], rtol=1e-5)
    assert scaling.scale[3] == 1.0
    standardized = scaling.apply(pooled)
    np.testing.assert_allclose(standardized[:, :3].mean(axis=0), 0.0, atol=1e-5)
