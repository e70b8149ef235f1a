"""The insurer's client for the fast-claim check (the insurer SDK).

    with Client("insurer-a", state=".cogov", contract_id="claim-check-insurer-a-2026",
                policies=policies_df) as client:
        client.register_consents(consents.values())
        verdicts = client.check(claims_df, consents, mode="ss")   # national id -> Consent

The client connects as the insurer node with its own certificate from the state dir.
Per batch it obtains the claimants' domain tokens through the blinded OPRF chain
(cached: a token is stable for the life of the shared domain), encodes the claims for
the mode, seals the
operator's part to the operator's certified key, and sends one request to the
regulator. The answer decodes here, and only here, to the verdict:
`claim_id, visit_found, amount_consistent, diagnosis_covered, payable` (`docs/verdict.md`).

Claims are checked before anything is sent: a malformed field (`MalformedInput`: a date
that is not ISO `YYYY-MM-DD`, a negative or fractional amount, an undotted diagnosis
code) or a hospital that is not a hospital node of the topology (`HospitalNotInTopology`)
is refused naming the claim, before a token is fetched or a query billed.

This module loads no web server: only the contract (`parties.claims.api`), the runtime's
client side, `mpc` and `governance`.

A failed batch raises `ClaimBatchFailed`; calling `check` again with the same
`request_id` re-sends the very same request (same shares or ciphertexts), which the
regulator answers at most once and bills at most once. Every request is signed with the
insurer node's key (`api.signed_request`): the meter of its answer carries the signature,
and a bill counts no meter without one. The nodes and the log know a request by its log
id (`Client.log_id`, keyed by a secret only this insurer and the regulator derive), never
by `request_id` itself.

Each claim carries a hospital tag (its consent's budget bucket at a hospital) and a digest
keyed with this insurer's own check secret (`parties.claims.fingerprints`). The same batch
asked again, from this client or another one of the same insurer, is the same question: the
regulator answers it with the stored answer, at no cost in budget or bill, and it opens here
because the reply key is derived from the question and the insurer's secret. Every new claim
spends one check of its consent's daily budget at its hospital (`CheckBudgetSpent` when
spent). A batch refused with the uniform `ClaimNotCheckable` (which says nothing of why)
is retried once with freshly fetched tokens when they changed (a key rotation made the cached
ones stale), then given up.
"""

import base64
import hashlib
import hmac
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.public
import pandas as pd
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from governance.consent import Consent
from governance.ledger import EntryInvalid, decode_leaf
from governance.meters import sign_request
from mpc.claim import OPERATOR, REGULATOR, SERVER, InsurerClaims, encode_claims, finish_verdicts
from mpc.claim.constants import DEFAULT_K, MODES, VERDICT_COLUMNS
from mpc.errors import MalformedInput
from parties.agreements.api import REGISTER_CONSENT
from parties.claims.api import (
    ANSWER_PURPOSE,
    CHECK,
    CLAIM_ID_PATTERN,
    ENVELOPE_PURPOSE,
    HE_PUBLIC_CONTEXT,
    MAX_CLAIMS,
    OPERATOR_CERTIFICATE,
    REQUEST_SIGNATURE_HEADER,
    ClaimCheckRequest,
    ClaimCheckResponse,
    ClaimNotCheckable,
    ClaimRef,
    refuse_unknown_hospitals,
    signed_request,
)
from parties.claims.fingerprints import check_key, claim_digest, hospital_tag
from parties.domains.client import domain_tokens
from parties.domains.commitment_book import CommitmentBook
from parties.ledger.api import WITNESS_ROLES, ReceiptInvalid, log_node
from parties.ledger.log_view import VIEW_FILE, LogView
from parties.ledger.pin import load_pin
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeError, RemoteError
from parties.runtime.node_log import REQUEST_ID_HEADER, current_request_id
from parties.runtime.pki import (
    certificate_signing_key,
    federation_signing_keys,
    load_certificate,
    load_signing_key,
    verified_node_certificate,
)
from parties.runtime.request_ids import log_request_id, pair_key
from parties.runtime.sealing import open_sealed, seal, sealing_public_key
from parties.runtime.state import StateDir, default_state_dir
from parties.runtime.topology import Role, Topology, load_topology

DEFAULT_BATCH = 2000
# An `he` request carries about 432 KB of ciphertext per ciphertext of claims, base64 in
# JSON: 96 ciphertexts keep it under the nodes' 64 MiB body limit.
HE_CIPHERTEXTS_PER_REQUEST = 96
CLAIM_COLUMNS = ("claim_id", "national_id", "hospital_id", "visit_date", "claimed_fen",
                 "diagnosis_code")
CHECK_SECRET_INFO = b"cogov-claim-check-secret-v1"
REPLY_KEY_INFO = b"cogov-claim-reply-key-v1"


class MissingConsent(ValueError):
    """A claim names a person for whom no consent was given to the client."""

    http_status = 400


class ClaimBatchFailed(NodeError):
    """A batch was refused or failed; `completed` holds the verdicts of earlier batches."""

    def __init__(self, request_id: str, cause: NodeError, completed: pd.DataFrame) -> None:
        self.request_id = request_id
        self.error = getattr(cause, "error", type(cause).__name__)
        self.detail = getattr(cause, "detail", str(cause))
        self.http_status = cause.http_status
        self.completed = completed
        super().__init__(f"claim batch {request_id}: {self.error} ({self.http_status}): "
                         f"{self.detail}")


@dataclass
class _Prepared:
    """One encoded batch, kept until answered so a retry re-sends the same bytes."""

    request_id: str
    digest: str
    claims: pd.DataFrame
    engine: InsurerClaims
    query: Any
    reply_key: nacl.public.PrivateKey
    body: bytes
    log_id: str  # what the log and every node know the request by
    signature: str  # this insurer's signature of the request (its meter carries it)


def _claims_digest(claims: pd.DataFrame, mode: str, consent_ids: Sequence[str]) -> str:
    h = hashlib.sha256(mode.encode())
    h.update(pd.util.hash_pandas_object(claims[list(CLAIM_COLUMNS)].astype(str),
                                        index=False).to_numpy().tobytes())
    h.update("\n".join(consent_ids).encode())
    return h.hexdigest()


class Client:
    """The insurer-facing client of the claim-check product."""

    def __init__(
        self,
        insurer: str,
        *,
        state: StateDir | Path | str | None = None,
        topology: Topology | Path | str | None = None,
        contract_id: str | None = None,
        policies: pd.DataFrame | None = None,
        k: int = DEFAULT_K,
        batch_size: int = DEFAULT_BATCH,
        timeout: float = 600.0,
    ) -> None:
        self.state = state if isinstance(state, StateDir) else StateDir(
            Path(state) if state is not None else default_state_dir())
        if topology is None:
            topology = self.state.root / "topology.toml"
        self.topology = topology if isinstance(topology, Topology) else load_topology(topology)
        spec = self.topology.node(insurer)
        if spec.role != Role.INSURER:
            raise ValueError(f"{insurer} is not an insurer node")
        self.insurer = insurer
        self.contract_id = contract_id or f"claim-check-{insurer}-2026"
        self.policies = policies[policies["insurer"] == insurer] if policies is not None \
            and "insurer" in policies else policies
        self.k = k
        self.batch_size = max(1, min(batch_size, MAX_CLAIMS))
        self.regulator = self.topology.node_of(Role.REGULATOR)
        self._http = NodeClient(self.state, self.topology, insurer, timeout=timeout)
        self._tokens: dict[str, bytes] = {}
        self._key_commitments: CommitmentBook | None = None
        self._operator_key: bytes | None = None
        self._he_public: Any = None
        self._check_secret: bytes | None = None
        self._request_id_key: bytes | None = None
        self._prepared: dict[str, _Prepared] = {}
        self._log_view: LogView | None = None
        self._regulator_key = b""
        self.last_receipt_bytes = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- consents -------------------------------------------------------------------------------
    def register_consents(self, consents: Iterable[Consent]) -> int:
        """Register consumers' signed consents at the regulator (idempotent)."""
        count = 0
        for consent in consents:
            self._http.call(self.regulator, REGISTER_CONSENT, consent)
            count += 1
        return count

    # -- tokens -----------------------------------------------------------------------------
    def tokens(self, national_ids: Sequence[str]) -> list[bytes]:
        """Domain tokens of these ids: one OPRF batch for those not cached yet."""

        missing = list(dict.fromkeys(i for i in national_ids if i not in self._tokens))
        if missing:
            if self._key_commitments is None:
                self._key_commitments = CommitmentBook(self._http)
            fetched = domain_tokens(self._http, missing, book=self._key_commitments)
            for nid, token in zip(missing, fetched, strict=True):
                self._tokens[nid] = token
        return [self._tokens[i] for i in national_ids]

    def forget_tokens(self) -> None:
        """Drop cached tokens (after the insurer's shared domain was re-created)."""
        self._tokens.clear()

    # -- keys -------------------------------------------------------------------------------
    def check_secret(self) -> bytes:
        """This insurer's secret for claim digests and reply keys: derived from its node's
        signing key, so every client of the insurer names the same claim alike and opens the
        answers stored for it, and nobody else can (HKDF-SHA256, its own label)."""
        if self._check_secret is None:
            seed = load_signing_key(self.state, self.insurer).private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption())
            self._check_secret = HKDF(hashes.SHA256(), 32, salt=None,
                                      info=CHECK_SECRET_INFO).derive(seed)
        return self._check_secret

    def log_id(self, request_id: str) -> str:
        """The id the regulator (and the log) will know `request_id` by: keyed by a secret
        only this insurer and the regulator derive, so the log never shows `request_id`."""
        if self._request_id_key is None:
            regulator = federation_signing_keys(self.state, [self.regulator])[self.regulator]
            self._request_id_key = pair_key(load_signing_key(self.state, self.insurer),
                                            regulator)
        return log_request_id(self._request_id_key, request_id)

    def reply_key(self, question: str) -> nacl.public.PrivateKey:
        """The key the operator seals the answer to `question` (a check key) to: the same
        for the same question, so a stored answer returned for it opens here."""
        seed = hmac.digest(self.check_secret(), REPLY_KEY_INFO + bytes.fromhex(question),
                           "sha256")
        return nacl.public.PrivateKey(seed)

    def operator_key(self) -> bytes:
        """The operator's X25519 sealing key, from its CA-verified certificate."""
        if self._operator_key is None:
            body = self._http.call(self.regulator, OPERATOR_CERTIFICATE)
            cert = x509.load_pem_x509_certificate(body.certificate_pem.encode())
            ca = load_certificate(self.state.ca.cert)
            operators = {n.name for n in self.topology.nodes_with_role(Role.OPERATOR)}
            if verified_node_certificate(ca, cert) not in operators:
                raise ValueError("the operator certificate does not certify an operator node")
            self._operator_key = bytes(sealing_public_key(certificate_signing_key(cert)))
        return self._operator_key

    def he_public(self) -> Any:
        """The regulator's public TenSEAL context (an `mpc.he.HePublicContext`), fetched once
        and checked to carry the claim-check parameters and no secret key."""
        from mpc.he import HePublicContext  # TenSEAL: loaded by clients that use the he mode

        if self._he_public is None:
            served = self._http.call(self.regulator, HE_PUBLIC_CONTEXT)
            public = HePublicContext.from_bytes(served.context)
            if public.digest != served.digest:
                raise RemoteError(502, "AnswerMismatch", "the HE context is not its digest's")
            self._he_public = public
        return self._he_public

    # -- the check ------------------------------------------------------------------------------
    def check(
        self,
        claims: pd.DataFrame,
        consents: Mapping[str, Consent],
        mode: str = "ss",
        *,
        request_id: str | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> pd.DataFrame:
        """Verdicts of `claims` (model columns); `consents` maps national id -> Consent."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if self.policies is None:
            raise ValueError("the client needs the insurer's policies to finish verdicts")
        claims = self.validated(claims)
        absent = sorted(set(claims["national_id"]) - set(consents))
        if absent:
            raise MissingConsent(f"{len(absent)} claimants gave no consent")
        size = self.batch_size if mode != "he" else min(self.batch_size, _he_batch(self.k))
        batches = [claims.iloc[i:i + size] for i in range(0, len(claims), size)]
        base = request_id or uuid.uuid4().hex
        done: list[pd.DataFrame] = []
        for i, batch in enumerate(batches):
            rid = base if len(batches) == 1 else f"{base}-{i:04d}"
            try:
                done.append(self._check_batch(batch, consents, mode, rid))
            except NodeError as exc:
                completed = pd.concat(done, ignore_index=True) if done else pd.DataFrame(
                    columns=VERDICT_COLUMNS)
                raise ClaimBatchFailed(rid, exc, completed) from exc
            if on_batch is not None:
                on_batch(i + 1, len(batches))
        return pd.concat(done, ignore_index=True)[VERDICT_COLUMNS]

    def validated(self, claims: pd.DataFrame) -> pd.DataFrame:
        """`claims` as `check` sends them, every claim checked first.

        Raises, naming the claim (its claim_id, else its row): `MalformedInput` for a bad
        field (claim_id, visit_date, claimed_fen, diagnosis_code, as the engines read them),
        `HospitalNotInTopology` for a hospital that is not a hospital node of the topology.
        """
        missing = [c for c in CLAIM_COLUMNS if c not in claims.columns]
        if missing:
            raise ValueError(f"claims lack columns {missing}")
        claims = claims.reset_index(drop=True).copy()
        for row, claim_id in enumerate(claims["claim_id"], start=1):
            if pd.isna(claim_id) or not re.match(CLAIM_ID_PATTERN, str(claim_id)):
                raise MalformedInput(f"row {row}: claim_id: {claim_id!r} is not 1 to 64 "
                                     "letters, digits or . _ : -")
        claims["claim_id"] = claims["claim_id"].astype(str)
        claims["national_id"] = claims["national_id"].astype(str)
        if "insurer" not in claims:
            claims["insurer"] = self.insurer
        if (claims["insurer"] != self.insurer).any():
            raise ValueError(f"some claims are not {self.insurer}'s")
        encode_claims(claims)  # the fields, checked as the engines will encode them
        refuse_unknown_hospitals(self.topology, [str(h) for h in claims["hospital_id"]],
                                 [f"claim {c}" for c in claims["claim_id"]])
        return claims

    def check_one(
        self,
        *,
        national_id: str,
        hospital_id: str,
        visit_date: str,
        claimed_fen: int,
        diagnosis_code: str,
        consent: Consent,
        mode: str = "ss",
        claim_id: str = "C1",
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """The verdict of one claim, as a dict of the verdict fields."""
        frame = pd.DataFrame([{
            "claim_id": claim_id, "insurer": self.insurer, "national_id": national_id,
            "hospital_id": hospital_id, "visit_date": visit_date,
            "claimed_fen": int(claimed_fen), "diagnosis_code": diagnosis_code,
        }])
        row = self.check(frame, {national_id: consent}, mode, request_id=request_id).iloc[0]
        return {c: (row[c].item() if hasattr(row[c], "item") else row[c]) for c in VERDICT_COLUMNS}

    # -- one batch ------------------------------------------------------------------------------
    def prepare(self, claims: pd.DataFrame, consents: Mapping[str, Consent], mode: str,
                request_id: str) -> _Prepared:
        """Encode and seal one batch (kept for retries under the same request id)."""
        consent_of = [consents[n] for n in claims["national_id"]]
        digest = _claims_digest(claims, mode, [c.consent_id for c in consent_of])
        found = self._prepared.get(request_id)
        if found is not None:
            if found.digest != digest:
                raise ValueError(f"request id {request_id} was prepared for other claims")
            return found
        tokens = self.tokens(list(claims["national_id"]))
        hospitals = [str(h) for h in claims["hospital_id"]]
        encoded = encode_claims(claims).values  # what the engines compute on, per claim
        secret = self.check_secret()
        refs = [ClaimRef(claim_id=cid, consent_id=c.consent_id,
                         hospital_tag=hospital_tag(token, c.consent_id, hospital),
                         claim_digest=claim_digest(secret, c.consent_id, token, hospital, row))
                for cid, c, token, hospital, row in zip(
                    claims["claim_id"], consent_of, tokens, hospitals, encoded, strict=True)]
        he_public = self.he_public() if mode == "he" else None
        engine = InsurerClaims(mode, self.k, he_public)
        he_context = he_public.digest if he_public is not None else None
        query = engine.encode_claims(claims)
        reply_key = self.reply_key(check_key(self.contract_id, mode, self.k, he_context, refs))
        log_id = self.log_id(request_id)
        envelope = seal(self.operator_key(), ENVELOPE_PURPOSE, {
            "request_id": log_id, "mode": mode, "k": self.k,
            "tokens": [t.hex() for t in tokens],
            "hospitals": hospitals,
            "reply_key": bytes(reply_key.public_key).hex(),
        }, query.payloads[OPERATOR if mode == "ss" else SERVER])
        request = ClaimCheckRequest(
            contract_id=self.contract_id, mode=mode, k=self.k, claims=refs,
            operator_envelope=base64.b64encode(envelope),
            regulator_share=base64.b64encode(query.payloads[REGULATOR]) if mode == "ss"
            else None,
            he_context=he_context,
        )
        signature = sign_request(load_signing_key(self.state, self.insurer),
                                 signed_request(log_id, self.insurer, request))
        prepared = _Prepared(request_id, digest, claims, engine, query, reply_key,
                             request.model_dump_json().encode(), log_id, signature)
        self._prepared[request_id] = prepared
        return prepared

    def send(self, prepared: _Prepared) -> ClaimCheckResponse:
        """Send one prepared batch to the regulator's product route (the very bytes prepared,
        so a retry is the same request)."""
        response = self._http.call(
            self.regulator, CHECK, content=prepared.body,
            headers={"Content-Type": "application/json", REQUEST_ID_HEADER: prepared.request_id,
                     REQUEST_SIGNATURE_HEADER: prepared.signature})
        self.bytes_sent += len(prepared.body)
        # The regulator answers this model's own JSON: its size is the answer's size.
        self.bytes_received += len(response.model_dump_json())
        return response

    def log_view(self) -> LogView:
        """This insurer's view of the log, kept in its node directory across clients."""
        if self._log_view is None:
            operator = log_node(self.topology)
            witnesses = [n.name for role in WITNESS_ROLES
                         for n in self.topology.nodes_with_role(role)]
            keys = federation_signing_keys(self.state, [operator, *witnesses, self.regulator])
            self._regulator_key = keys[self.regulator]
            paths = self.state.node(self.insurer)
            pin = load_pin(paths)
            self._log_view = LogView(paths.root / VIEW_FILE, self._http, operator,
                                     keys[operator], {w: keys[w] for w in witnesses},
                                     None if pin is None else pin.checkpoint)
        return self._log_view

    def take_receipt(self, prepared: _Prepared, response: ClaimCheckResponse) -> None:
        """Take an answer only with its meter in the log: the entry must be the regulator's
        signed `query_answered` of this request (or, for a stored answer, of the request
        that first asked it) for this insurer, its receipt must prove it in the log, one
        history with every checkpoint seen before (`LogView.accept`), and the log's cosigned
        checkpoint is fetched to settle earlier receipts (`LogView.refresh`)."""
        try:
            logged = decode_leaf(response.log_entry)
        except EntryInvalid as exc:
            raise ReceiptInvalid(f"the answer's log entry does not parse: {exc}") from None
        event = logged.entry.event
        own = response.request_id == prepared.log_id
        view = self.log_view()
        if (logged.index != response.receipt.index or event.kind != "query_answered"
                or event.actor != self.regulator or event.request_id != response.request_id
                or event.payload.get("party") != self.insurer
                or (own and event.payload.get("data_user_signature") != prepared.signature)
                or not logged.entry.signature_valid(self._regulator_key)):
            raise ReceiptInvalid("the answer's log entry is not the meter of this request")
        view.accept(response.receipt, response.log_entry)
        view.refresh()
        self.last_receipt_bytes = len(response.receipt.model_dump_json())

    def decode(self, prepared: _Prepared, response: ClaimCheckResponse) -> pd.DataFrame:
        """The verdicts a response decodes to (here, with the reply key and HE key).

        The answer may be the one stored for an earlier request that asked the same question
        (its own request id and claim ids): it opens only with this question's reply key, so
        it is an answer to these claims; the verdicts carry this batch's claim ids.
        """
        query = prepared.query
        if len(response.claim_ids) != len(query.claim_ids) or response.mode != query.mode:
            raise RemoteError(502, "AnswerMismatch", "the answer is for other claims")
        deduplicated = response.request_id != prepared.log_id
        if not deduplicated and response.claim_ids != list(query.claim_ids):
            raise RemoteError(502, "AnswerMismatch", "the answer is for other claims")
        head, answer = open_sealed(prepared.reply_key, ANSWER_PURPOSE, response.operator_answer)
        if head.get("request_id") != response.request_id or head.get("n") != len(
                query.claim_ids):
            raise RemoteError(502, "AnswerMismatch", "the operator's answer is for another request")
        answers = {OPERATOR if query.mode == "ss" else SERVER: answer}
        if query.mode in ("ss", "he"):  # ss: the regulator's share; he: its decrypted bits
            if response.regulator_answer is None:
                raise RemoteError(502, "AnswerMismatch", "the regulator's answer is missing")
            answers[REGULATOR] = response.regulator_answer
        bits = prepared.engine.decode_verdicts(query, answers)
        ids = set(prepared.claims["national_id"])
        policies = self.policies[[n in ids for n in self.policies["national_id"].astype(str)]]
        return finish_verdicts(prepared.claims, policies, bits)

    def _check_batch(self, claims: pd.DataFrame, consents: Mapping[str, Consent], mode: str,
                     request_id: str) -> pd.DataFrame:
        try:
            return self._run_batch(claims, consents, mode, request_id)
        except ClaimNotCheckable:
            # Cached tokens go stale when a key (k1 or the domain's k2) rotates, and stale
            # tokens get the uniform refusal (logged, not billed; it says nothing of why).
            # Fetch this batch's tokens again; when they changed, retry once.
            ids = list(dict.fromkeys(claims["national_id"]))
            cached = [self._tokens.pop(nid, None) for nid in ids]
            if self.tokens(ids) == cached:
                raise  # not stale tokens: a retry would spend budget for the same refusal
        return self._run_batch(claims, consents, mode, f"{request_id}-renewed")

    def _run_batch(self, claims: pd.DataFrame, consents: Mapping[str, Consent], mode: str,
                   request_id: str) -> pd.DataFrame:
        # The batch's request id also tags its OPRF calls: one id follows it through every node.
        token = current_request_id.set(self.log_id(request_id))
        try:
            prepared = self.prepare(claims, consents, mode, request_id)
            response = self.send(prepared)
            self.take_receipt(prepared, response)
            verdicts = self.decode(prepared, response)
        finally:
            current_request_id.reset(token)
        self._prepared.pop(request_id, None)
        return verdicts


def verdicts_to_csv(verdicts: pd.DataFrame, path: Path | str) -> None:
    """Write verdicts with exactly the verdict columns (booleans as true/false)."""
    out = verdicts[VERDICT_COLUMNS].copy()
    for col in ("visit_found", "amount_consistent", "diagnosis_covered"):
        out[col] = out[col].map({True: "true", False: "false"})
    target = Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    out.to_csv(tmp, index=False)
    tmp.replace(target)


def _he_batch(k: int) -> int:
    """Claims per `he` request at K = `k` (see HE_CIPHERTEXTS_PER_REQUEST)."""
    from mpc.he import claims_per_ciphertext  # TenSEAL: loaded in he mode only

    return HE_CIPHERTEXTS_PER_REQUEST * claims_per_ciphertext(k)
