"""Classification and grading from the editable policy file."""

from pathlib import Path

import pandas as pd
import pytest

from governance.classify import (
    DEFAULT_POLICY,
    PolicyError,
    classify_report,
    load_policy,
    parse_policy,
    render_classification,
)
from governance.scan import scan_path
from governance.standardize import infer_mapping
from scenarios.claim_check.generator import generate


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    generate(out, patients=300, claims=12, seed=9, progress=False)
    return out


def test_default_policy_grades_the_hospital_exports(generated: Path) -> None:
    report = scan_path(generated / "raw" / "hospital-1.csv")
    sample = pd.read_csv(generated / "raw" / "hospital-1.csv", dtype=str)
    fields = {"hospital-1": infer_mapping(sample, "hospital-1").columns()}
    result = classify_report(report, load_policy(), fields)
    level = {c.column: c.level for c in result.columns}
    assert level["pid"] == "L4" and level["dx_code"] == "L4"
    assert level["patient_name"] == level["mobile"] == level["home_addr"] == "L3"
    assert level["dob"] == "L3" and level["self_paid"] == "L3" and level["admit_date"] == "L3"
    assert level["id_card_checked"] == "L1"
    assert level["name"] == "L2"  # department names under a misleading column name
    assert level["remark"] == "L3"  # free text carrying phone numbers
    assert result.level_of("hospital-1", "gender") == "L2"
    labels = {c.level_label for c in result.columns}
    assert "core personal health" in labels
    render_classification(result)


def _policy_text(**replace: str) -> str:
    text = DEFAULT_POLICY.read_text(encoding="utf-8")
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new, 1)
    return text


@pytest.mark.parametrize(("old", "new", "field"), [
    ('level = "L4"', 'level = "L9"', "rules.0.level"),
    ('rule = "year"', 'rule = "yearly"', "desensitize.birth_date.rule"),
    ('keep_start = 3', 'keep_start = -1', "desensitize.phone.keep_start"),
    ('version = 1', 'version = 2', "version"),
    ('L1 = "public"', 'Level1 = "public"', "levels"),
    ('when = { sensitive_type = "diagnosis" }', 'when = { sensitivity = "diagnosis" }',
     "rules.0.when.sensitivity"),
    ('when = { sensitive_type = "diagnosis" }', 'when = { column_pattern = "(" }',
     "rules.0.when.column_pattern"),
])
def test_invalid_policy_names_the_field(old: str, new: str, field: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(_policy_text(**{old: new}), "custom.toml")
    assert f"custom.toml: {field}" in str(info.value)
    assert info.value.http_status == 422


def test_unreadable_or_malformed_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "absent.toml")
    (tmp_path / "broken.toml").write_text("levels = [")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(tmp_path / "broken.toml")


def test_rules_apply_first_match_first(tmp_path: Path, generated: Path) -> None:
    custom = tmp_path / "p.toml"
    custom.write_text(_policy_text(**{
        '[[rules]]\nname = "diagnosis"': '[[rules]]\nname = "refs"\n'
        'when = { column_pattern = "^(pid|dx_code)$" }\ncategory = "x"\nlevel = "L1"\n\n'
        '[[rules]]\nname = "diagnosis"',
    }))
    result = classify_report(scan_path(generated / "raw" / "hospital-1.csv"), load_policy(custom))
    grades = {c.column: (c.level, c.rule) for c in result.columns}
    assert grades["pid"] == ("L1", "refs") and grades["dx_code"] == ("L1", "refs")
    assert grades["patient_name"] == ("L3", "contact")
