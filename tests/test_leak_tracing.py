"""Leak tracing names the source domain, even from a few tokens hidden in noise."""

import base64
import os
import random

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from governance.leak_tracing import (
    LeakFileError,
    read_leaked_tokens,
    recompute_domain_tokens,
    trace_leak,
    trace_leak_file,
)
from mpc import xid


@pytest.fixture(scope="module")
def federation():
    """Three domains issued from the same level-1 tokens of 300 people."""
    k1 = xid.XidKey.generate("k1")
    keys = {d: xid.XidKey.generate(f"k2:{d}") for d in ("claims", "research", "audit")}
    p1 = xid.tokenize(k1, [f"person-{i}" for i in range(300)])
    return keys, p1, recompute_domain_tokens(keys, p1)


def leak(domains, source, real, noise, seed=7):
    rng = random.Random(seed)
    tokens = rng.sample(sorted(domains[source]), real) + [os.urandom(32) for _ in range(noise)]
    rng.shuffle(tokens)
    return tokens


def test_ten_real_tokens_among_ninety_random_name_the_domain(federation):
    _, _, domains = federation
    report = trace_leak(leak(domains, "research", 10, 90), domains)
    assert report.attributed == ["research"]
    top = report.matches[0]
    assert (top.domain, top.matched, report.leaked) == ("research", 10, 100)
    assert top.share == pytest.approx(0.10)
    assert top.chance_log10 < -600  # ten chance matches are impossible in practice
    assert report.unmatched == 90
    assert [m.matched for m in report.matches[1:]] == [0, 0]
    assert "10 of 100 leaked tokens (10%) match domain 'research'" in report.summary()


def test_a_mixed_leak_names_both_domains_with_their_shares(federation):
    _, _, domains = federation
    tokens = sorted(domains["claims"])[:10] + sorted(domains["audit"])[:2]
    report = trace_leak(tokens, domains)
    assert report.attributed == ["claims", "audit"]
    assert [(m.domain, m.matched) for m in report.matches[:2]] == [("claims", 10), ("audit", 2)]
    assert report.matches[0].share == pytest.approx(10 / 12)
    assert trace_leak(tokens, domains, min_matches=3).attributed == ["claims"]


def test_pure_noise_and_level_one_tokens_match_nothing(federation):
    _, p1, domains = federation
    report = trace_leak([os.urandom(32) for _ in range(100)] + p1[:20], domains)
    assert report.attributed == []
    assert report.unmatched == 120
    assert "none of 120" in report.summary()


def test_hex_base64_and_garbage_entries(federation):
    _, _, domains = federation
    real = sorted(domains["claims"])[:4]
    entries = [real[0].hex(), base64.b64encode(real[1]).decode(), real[2], real[3].hex().upper()]
    entries += ["not a token", b"short", "zz" * 32, None]
    report = trace_leak(entries, domains)
    assert (report.leaked, report.unparseable) == (4, 4)
    assert report.matches[0].matched == 4


def test_batch_lookup_callable_is_accepted(federation):
    _, _, domains = federation
    calls = []

    def lookup(tokens):
        calls.append(len(tokens))
        return [t for t in tokens if t in domains["research"]]

    report = trace_leak(leak(domains, "research", 5, 20), {"research": lookup})
    assert report.attributed == ["research"] and calls == [25]
    assert report.matches[0].chance_log10 < -300  # size unknown: 2^40 assumed


def test_recomputed_sets_agree_with_blinded_tokens(federation):
    keys, _, domains = federation
    k1 = xid.XidKey.generate("k1-other")
    assert (
        not domains["claims"]
        & recompute_domain_tokens({"claims": keys["claims"]}, xid.tokenize(k1, ["person-1"]))[
            "claims"
        ]
    )


def test_leaked_csv_and_parquet_files(federation, tmp_path):
    _, _, domains = federation
    tokens = leak(domains, "audit", 10, 90)
    frame = pd.DataFrame(
        {"name": [f"n{i}" for i in range(100)], "member": [t.hex() for t in tokens]}
    )
    csv = tmp_path / "leak.csv"
    frame.to_csv(csv, index=False)
    assert trace_leak_file(csv, domains).attributed == ["audit"]  # column guessed
    assert trace_leak_file(csv, domains, column="member").matches[0].matched == 10

    parquet = tmp_path / "leak.parquet"
    pq.write_table(pa.table({"xid": pa.array(tokens, type=pa.binary())}), parquet)
    report = trace_leak_file(parquet, domains)
    assert report.attributed == ["audit"] and report.leaked == 100


def test_unreadable_files_raise_a_typed_error(tmp_path):
    with pytest.raises(LeakFileError):
        read_leaked_tokens(tmp_path / "missing.csv")
    no_tokens = tmp_path / "plain.csv"
    pd.DataFrame({"a": ["x", "y"], "b": ["1", "2"]}).to_csv(no_tokens, index=False)
    with pytest.raises(LeakFileError):
        read_leaked_tokens(no_tokens)
    with pytest.raises(LeakFileError):
        read_leaked_tokens(no_tokens, column="xid")
    assert LeakFileError.http_status == 422
