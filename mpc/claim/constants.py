"""The claim check's constants, defined once for the engines, the nodes, the consents and the
benchmarks: plain values, with no imports of their own.

The verdict rule these name is written out in `docs/verdict.md`.
"""

from typing import Literal, get_args

CLAIM_SCENARIO = "claim_check"

# `plain` is the readable reference (the oracle), listed first: benchmarks run it first and
# measure the private modes, `he` and `ss`, against it.
Mode = Literal["plain", "he", "ss"]
MODES: tuple[str, ...] = get_args(Mode)

DEFAULT_K = 4  # candidate visit rows per claim (padded with dummies)
MAX_K = 16  # the most an insurer may ask for

# The record columns a claim check reads, as contracts and consents list them.
RECORD_COLUMNS = ("admission_date", "diagnosis_code", "self_pay_fen")
# The outputs a claim check returns, as contracts and consents list them ...
VERDICT_OUTPUTS = ("visit_found", "amount_consistent", "diagnosis_covered", "payable")
# ... and the verdict table's columns, in order (a list: pandas selects columns by list).
VERDICT_COLUMNS = ["claim_id", *VERDICT_OUTPUTS]
