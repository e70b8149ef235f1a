"""Desensitization rules from the policy file."""

import datetime as dt
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from governance.classify import DEFAULT_POLICY, MaskRule, load_policy, parse_policy
from governance.desensitize import (
    MaskingError,
    cut_to_district,
    desensitize_frame,
    desensitize_scanned,
    desensitize_visits,
    mask_middle,
    mask_name,
    mask_national_id,
    mask_value,
)
from governance.scan import scan_frame
from scenarios.claim_check.generator import generate


@pytest.fixture(scope="module")
def visits(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("gen")
    generate(out, patients=300, claims=12, seed=2, progress=False)
    return pq.read_table(out / "ground_truth" / "visits.parquet").to_pandas()


def test_masking_functions() -> None:
    rule = MaskRule(rule="keep")
    assert mask_national_id("32050519850317123X", rule) == "320505************"
    assert mask_name("王伟", rule) == "王*" and mask_name("欧阳娜娜", rule) == "欧阳**"
    assert mask_name("欧阳", rule) == "欧*"  # a two-character name starting like 欧阳
    assert mask_middle("13812345678", MaskRule(rule="mask_middle")) == "138****5678"
    assert mask_middle("1234", MaskRule(rule="mask_middle")) == "****"
    assert cut_to_district("江苏省苏州市姑苏区人民路123号", rule) == "江苏省苏州市姑苏区"
    assert cut_to_district("江苏省苏州市苏州工业园区星湖街88号", rule) == "江苏省苏州市苏州工业园区"
    assert cut_to_district("上海市浦东新区张江路1号", rule) == "上海市浦东新区"
    assert cut_to_district("某处", rule) == "***"
    assert mask_value(dt.date(1985, 3, 17), MaskRule(rule="year")) == 1985
    assert mask_value("17/03/1985", MaskRule(rule="year")) == 1985
    assert mask_value(123456, MaskRule(rule="bucket", width_fen=100000)) == 100000
    assert mask_value("J18.9", MaskRule(rule="category")) == "J18"
    assert mask_value(None, MaskRule(rule="surname_stars")) is None
    assert mask_value("x", MaskRule(rule="drop")) is None


def test_default_policy_on_the_common_model(visits: pd.DataFrame) -> None:
    before = visits.copy()
    masked = desensitize_visits(visits)
    pd.testing.assert_frame_equal(visits, before)  # the input is not touched
    assert masked["national_id"].str.fullmatch(r"\d{6}\*{12}").all()
    assert (masked["national_id"].str[:6] == visits["national_id"].str[:6]).all()
    assert all(m[0] == n[0] and set(m[1:]) <= {"*"} and len(m) == len(n)
               for m, n in zip(masked["name"], visits["name"], strict=True))
    phones = masked["phone"].dropna()
    assert phones.str.fullmatch(r"\d{3}\*{4}\d{4}").all()
    assert all(a.startswith("江苏省苏州市") and o.startswith(a) and a[-1] in "区市县"
               for a, o in zip(masked["address"], visits["address"], strict=True))
    assert masked["birth_date"].tolist() == [d.year for d in visits["birth_date"]]
    assert masked["total_fen"].tolist() == visits["total_fen"].tolist()  # buckets are off
    assert masked["diagnosis_code"].tolist() == visits["diagnosis_code"].tolist()
    # After masking, a scan finds no direct identifier left.
    flagged = {c.name: c.sensitive_type for c in scan_frame(masked, "m").columns
               if c.sensitive_type}
    assert flagged == {"diagnosis_code": "diagnosis"}


def test_policy_switches_rules(visits: pd.DataFrame, tmp_path: Path) -> None:
    text = DEFAULT_POLICY.read_text(encoding="utf-8")
    text = text.replace("width_fen = 100000, enabled = false", "width_fen = 50000")
    text = text.replace('diagnosis = { rule = "keep" }', 'diagnosis = { rule = "category" }')
    masked = desensitize_visits(visits, parse_policy(text))
    assert (masked["total_fen"] % 50000 == 0).all()
    assert masked["diagnosis_code"].str.fullmatch(r"[A-Z]\d{2}").all()


def test_scanned_columns_are_masked_by_detected_type() -> None:
    frame = pd.DataFrame({"ref": ["11010519491231002X", "440524188001010014"] * 5,
                          "who": ["王伟", "欧阳娜娜"] * 5, "dept": ["骨科", "眼科"] * 5})
    masked = desensitize_scanned(frame, scan_frame(frame, "t"))
    assert masked["ref"].tolist()[:2] == ["110105************", "440524************"]
    assert masked["who"].tolist()[:2] == ["王*", "欧阳**"]
    assert masked["dept"].tolist() == frame["dept"].tolist()


def test_errors_are_typed() -> None:
    frame = pd.DataFrame({"a": ["x"]})
    with pytest.raises(MaskingError, match="no such columns"):
        desensitize_frame(frame, {"b": "name"})
    with pytest.raises(MaskingError, match="no \\[desensitize\\] rule"):
        desensitize_frame(frame, {"a": "passport"})
    with pytest.raises(MaskingError):
        desensitize_frame(frame, {"a": "birth_date"}, load_policy())
