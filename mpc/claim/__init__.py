"""The claim check: one API, three engines (`plain`, `ss`, `he`).

Insurer side::

    insurer = InsurerClaims(mode, k=4)             # he: InsurerClaims("he", he_public=...)
    query = insurer.encode_claims(claims_df)       # query.payloads: destination -> bytes
    ... send each payload to its destination, collect the answers ...
    bits = insurer.decode_verdicts(query, answers) # [claim_id, visit_found, amount_consistent,
                                                   #  diagnosis_match]
    verdicts = finish_verdicts(claims_df, policies_df, bits)

Every engine answers three BITS per claim, never counts (`docs/verdict.md`): the nested
OR over the K slots of found, found and amount, found and amount and diagnosis. In
`ss` only those bits are ever opened; `plain` has no privacy; in `he` the regulator
decrypts the operator's masked tests and answers only those bits (see `mpc.he`).

Destinations: `plain` and `he` -> "server" (the node holding the anonymized rows);
`ss` -> "operator" and "regulator" (one additive share each; the node layer seals
each payload to its node). Server side, per batch, after planning candidate slots
(`plan_candidate_slots`): `evaluate_plain`, `evaluate_he` (whose answer the regulator turns
into bits with `he_verdict_payload`), or for `ss` the leader's `evaluate_ss_leader` and, on
the follower, `ss_follower_inputs` inside `SsSession.serve_forever`. The insurer decodes
`plain` from "server", `he` from "regulator", `ss` from both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mpc.claim import ss_shares
from mpc.claim.candidates import (
    CandidateIndex,
    CandidateSlots,
    gather_rows,
    plan_candidate_slots,
)
from mpc.claim.constants import DEFAULT_K, MODES, VERDICT_COLUMNS
from mpc.claim.encoding import EncodedClaims, encode_claims, encode_visit_rows
from mpc.claim.errors import EngineMismatch, MalformedInput, TooManyCandidates
from mpc.claim.plain import (
    PRIVATE_BITS,
    finish_verdicts,
    plain_engine_bits,
    plain_verdicts,
)

if TYPE_CHECKING:
    import torch

    from mpc.he import HeDecryptionKey, HePublicContext
    from mpc.ss.session import BatchRequest, SsSession

OPERATOR, REGULATOR, SERVER = "operator", "regulator", "server"

__all__ = [
    "DEFAULT_K", "MODES", "PRIVATE_BITS", "VERDICT_COLUMNS", "CandidateIndex", "CandidateSlots",
    "ClaimQuery",
    "EncodedClaims", "EngineMismatch", "InsurerClaims", "MalformedInput", "TooManyCandidates",
    "encode_claims", "encode_visit_rows", "evaluate_he", "evaluate_plain",
    "evaluate_ss_leader", "finish_verdicts", "gather_rows", "he_verdict_payload",
    "plain_verdicts",
    "plan_candidate_slots", "share_visit_rows", "ss_follower_inputs",
]


@dataclass(frozen=True)
class ClaimQuery:
    """An encoded batch of claims: one payload per destination."""

    mode: str
    claim_ids: tuple[str, ...]
    k: int
    payloads: dict[str, bytes] = field(repr=False)


class InsurerClaims:
    """The insurer's side of one mode: encode claims, decode the private bits."""

    def __init__(self, mode: str, k: int = DEFAULT_K, he_public: HePublicContext | None = None):
        if mode not in MODES:
            raise MalformedInput(f"unknown mode {mode!r}; choose one of {MODES}")
        if mode == "he" and he_public is None:
            raise MalformedInput("he encrypts under the key holder's public context: pass it")
        self.mode, self.k, self.he_public = mode, k, he_public

    def encode_claims(self, claims: pd.DataFrame) -> ClaimQuery:
        encoded = encode_claims(claims)
        if self.mode == "plain":
            payloads = {SERVER: ss_shares.pack(ss_shares.KIND_CLAIMS, encoded.values)}
        elif self.mode == "ss":
            share_op, share_reg = ss_shares.split(encoded.values)
            payloads = {
                OPERATOR: ss_shares.pack(ss_shares.KIND_CLAIMS, share_op),
                REGULATOR: ss_shares.pack(ss_shares.KIND_CLAIMS, share_reg),
            }
        else:
            from mpc.he import encrypt_claims

            assert self.he_public is not None
            payloads = {SERVER: encrypt_claims(self.he_public, encoded.values, self.k)}
        return ClaimQuery(self.mode, encoded.claim_ids, self.k, payloads)

    def decode_verdicts(self, query: ClaimQuery, answers: dict[str, bytes]) -> pd.DataFrame:
        n = len(query.claim_ids)
        if query.mode != self.mode:
            raise EngineMismatch(f"query of mode {query.mode} given to a {self.mode} decoder")
        try:
            if self.mode in ("plain", "he"):
                source = SERVER if self.mode == "plain" else REGULATOR
                bits = ss_shares.unpack(answers[source], ss_shares.KIND_RESULT, (n, 3))
            elif self.mode == "ss":
                bits = ss_shares.combine(
                    ss_shares.unpack(answers[OPERATOR], ss_shares.KIND_RESULT, (n, 3)),
                    ss_shares.unpack(answers[REGULATOR], ss_shares.KIND_RESULT, (n, 3)),
                )
        except KeyError as exc:
            raise MalformedInput(f"missing answer from {exc.args[0]}") from None
        return bits_frame(query.claim_ids, bits)


def bits_frame(claim_ids: tuple[str, ...], bits: np.ndarray) -> pd.DataFrame:
    """int [n, 3] verdict bits -> booleans [claim_id, *PRIVATE_BITS].

    Refuses anything that is not a nested chain of bits (each value 0 or 1, and
    diagnosis_match <= amount_consistent <= visit_found): shares of two different
    batches, a count from an old engine or a corrupted answer never pass for a verdict.
    """
    bits = np.asarray(bits)
    if bits.shape != (len(claim_ids), len(PRIVATE_BITS)):
        raise MalformedInput(f"verdict bits have shape {bits.shape}, "
                             f"expected {(len(claim_ids), len(PRIVATE_BITS))}")
    if not np.isin(bits, (0, 1)).all():
        raise MalformedInput("the answer holds values that are not verdict bits")
    if (np.diff(bits.astype(np.int64), axis=1) > 0).any():
        raise MalformedInput("the answer's verdict bits are not nested")
    frame = pd.DataFrame({"claim_id": list(claim_ids)})
    for j, name in enumerate(PRIVATE_BITS):
        frame[name] = bits[:, j] == 1
    return frame


def share_visit_rows(visits: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The health authority's step: two int64 [n, 3] share tables (operator, regulator)."""
    return ss_shares.split(encode_visit_rows(visits))


# -- server side --------------------------------------------------------------------------
def evaluate_plain(payload: bytes, rows: np.ndarray, slots: CandidateSlots) -> bytes:
    """`plain`: the circuit on plaintext claims and plaintext rows (no privacy)."""
    claims = ss_shares.unpack(payload, ss_shares.KIND_CLAIMS, (len(slots), 3))
    bits = plain_engine_bits(claims, gather_rows(rows, slots), slots.valid)
    return ss_shares.pack(ss_shares.KIND_RESULT, bits)


def evaluate_he(
    public: HePublicContext, payload: bytes, rows: np.ndarray, slots: CandidateSlots
) -> bytes:
    """`he`, at the operator: the masked tests against plaintext anonymized rows, encrypted
    under the regulator's key."""
    from mpc.he import evaluate_encrypted

    return evaluate_encrypted(public, payload, gather_rows(rows, slots), slots.valid)


def he_verdict_payload(key: HeDecryptionKey, answer: bytes, n: int, k: int) -> bytes:
    """`he`, at the regulator: the operator's answer decrypted to the insurer's verdict bits."""
    return ss_shares.pack(ss_shares.KIND_RESULT, key.verdict_bits(answer, n, k))


def evaluate_ss_leader(
    session: SsSession, batch_id: str, payload: bytes, row_shares: np.ndarray,
    slots: CandidateSlots,
) -> bytes:
    """`ss`, at the operator: run one batch with the regulator; this party's result share."""
    import torch

    claims = ss_shares.unpack(payload, ss_shares.KIND_CLAIMS, (len(slots), 3))
    rows = gather_rows(row_shares, slots)
    result = session.evaluate(batch_id, torch.from_numpy(claims), torch.from_numpy(rows),
                              slots.valid, slots.row_index)
    return ss_shares.pack(ss_shares.KIND_RESULT, result.numpy())


def ss_follower_inputs(
    request: BatchRequest, payload: bytes, row_shares: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ss`, at the regulator: its input shares for the batch the operator announced."""
    import torch

    claims = ss_shares.unpack(payload, ss_shares.KIND_CLAIMS, (request.n_claims, 3))
    rows = gather_rows(row_shares, CandidateSlots(request.row_index, None))
    return torch.from_numpy(claims), torch.from_numpy(rows)


def ss_result_payload(result: torch.Tensor) -> bytes:
    """A party's result shares as the bytes it answers the insurer with."""
    return ss_shares.pack(ss_shares.KIND_RESULT, result.numpy())
