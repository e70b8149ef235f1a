"""Consumer consent: a signed, person-bound, revocable authorization for one insurer.

The consumer signs a `Consent` with their Ed25519 key for that insurer (raw
32-byte keys in hex). It names the insurer, purpose, scenario, data scope and
validity window, and binds the person twice:

* `subject.id_commitment` = scrypt(national id, salt = consent id || nonce).
  The serving side checks a query's national id (or the commitment the
  insurer computed from it) against it. Another person's id gives another
  commitment, so the document cannot authorize a query about anyone else;
  scrypt, rather than a bare salted hash, makes guessing the id from the
  document costly (an 18-digit id has only ~10^11 plausible values).
* `subject.public_key` must be the key a registrar bound to that national id for
  that insurer (`ConsentRegistry.register_subject`). An insurer cannot mint a consent for
  someone: it would need that person's private key, and a consent signed by
  any other key is refused when it is registered.

A consumer's consent key is per insurer (`consent_signing_key`): the consumer's app
keeps one master seed and derives the key for an insurer as
HKDF-SHA256(master seed, salt "cogov/consent-key/v1", info label || insurer id). The
serving node keeps every consent it registers, for every insurer; with one key per
person it could link a person's consents to different insurers by their equal public
keys. Per-insurer keys are pseudo-random functions of the master seed, so without it
the keys one person shows two insurers are as unrelated as two people's. (Ed25519 has
no public derivation: a public key cannot be computed from another public key and an
insurer id, so the registrar stores one public key per person and insurer.) The
document format is unchanged; only which key signs it.

Registering a consent needs the national id once (to check both bindings);
later checks may present the national id or only its commitment. Whatever
fails about the person (another person's commitment, no key registered for
them, another key) is one refusal, `ConsentSubjectMismatch`, with one message,
checked after everything that depends on the document alone. Revocation
is a document signed by the same key; it stops every later check at once.
Replaying a consent for the same person within its validity is allowed;
replay of a query is the node's concern.
"""

import hashlib
import hmac
import json
import re
import secrets
import uuid
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from governance.errors import GovernanceError
from governance.ledger.signing import (
    canonical_json,
    public_key_hex,
    sign_document,
    verify_document,
)
from governance.ledger.transactions import write_transaction
from governance.migrations import apply_migrations
from mpc.claim.constants import CLAIM_SCENARIO

if TYPE_CHECKING:
    import sqlite3  # annotations only: the caller opens the connection

CONSENT_DOMAIN = "cogov-consent-v1"
REVOCATION_DOMAIN = "cogov-consent-revocation-v1"
COMMITMENT_SCHEME = "scrypt-n16384-r8-p1"
CONSENT_KEY_SALT = b"cogov/consent-key/v1"
CONSENT_KEY_LABEL = b"cogov consent signing key for insurer\x00"
MASTER_SEED_BYTES = 32
MAX_VALIDITY = timedelta(days=366)

COMPONENT = "consent"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE consent_subjects (
        id_digest BLOB PRIMARY KEY,
        public_key TEXT NOT NULL,
        registered_at TEXT NOT NULL
    );
    CREATE TABLE consents (
        consent_id TEXT PRIMARY KEY,
        document TEXT NOT NULL,
        document_sha256 TEXT NOT NULL,
        insurer TEXT NOT NULL,
        purpose TEXT NOT NULL,
        not_before TEXT NOT NULL,
        not_after TEXT NOT NULL,
        registered_at TEXT NOT NULL
    );
    CREATE TABLE consent_revocations (
        consent_id TEXT PRIMARY KEY REFERENCES consents (consent_id),
        document TEXT NOT NULL,
        revoked_at TEXT NOT NULL,
        registered_at TEXT NOT NULL
    );
    """,
    # One consent key per person and insurer; a key bound before is kept for every insurer.
    """
    CREATE TABLE consent_subject_keys (
        id_digest BLOB NOT NULL,
        insurer TEXT NOT NULL,
        public_key TEXT NOT NULL,
        registered_at TEXT NOT NULL,
        PRIMARY KEY (id_digest, insurer)
    );
    INSERT INTO consent_subject_keys (id_digest, insurer, public_key, registered_at)
        SELECT id_digest, '*', public_key, registered_at FROM consent_subjects;
    DROP TABLE consent_subjects;
    """,
)
ANY_INSURER = "*"  # a subject key bound for every insurer (one key per person: linkable)


class ConsentError(GovernanceError):
    """Base of consent errors; a failed check is a refusal (403)."""

    http_status = 403


class ConsentInvalid(ConsentError):
    """The consent or revocation document is malformed (the detail names the field)."""

    http_status = 400


class ConsentSignatureInvalid(ConsentInvalid):
    """The document's signature does not verify with the subject's key."""


class ConsentMissing(ConsentError):
    """No registered consent with this id."""


class ConsentNotYetValid(ConsentError):
    """The consent's validity window has not started."""


class ConsentExpired(ConsentError):
    """The consent's validity window has ended."""


class ConsentRevoked(ConsentError):
    """The subject revoked the consent."""


class ConsentMismatch(ConsentError):
    """The consent is about another person, insurer, purpose or scenario, or was altered."""


class ConsentSubjectMismatch(ConsentMismatch):
    """The consent does not bind the person queried: the id commitment is another person's,
    no key is registered for the person, or another key is.

    One message whatever the cause (`SUBJECT_MISMATCH`): which cause holds depends on what
    the registry holds about the person (is a key registered? which one?), so telling the
    causes apart would answer questions about the person to whoever presents the consent.
    """


SUBJECT_MISMATCH = "the consent does not bind the person queried"


class ConsentScopeExceeded(ConsentError):
    """The query asks for columns or outputs outside the consent's data scope."""


class ConsentConflict(ConsentError):
    """A different document is already registered under this id, or a key is already bound."""

    http_status = 409


_Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_Code = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
_NODE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_Node = Annotated[str, Field(pattern=_NODE_PATTERN)]
_COMMITMENT = re.compile(r"^[0-9a-f]{64}$")
_NODE = re.compile(_NODE_PATTERN)


def normalize_national_id(national_id: str) -> str:
    """Canonical form of a national id: no surrounding spaces, upper-case check letter."""
    value = national_id.strip().upper()
    if not re.fullmatch(r"[0-9A-Z]{6,32}", value):
        raise ConsentInvalid("national id: 6 to 32 letters or digits")
    return value


def consent_signing_key(master_seed: bytes, insurer: str) -> Ed25519PrivateKey:
    """What the consumer's app does before it signs for `insurer`: the Ed25519 key of this
    consumer for that insurer alone, derived from the app's secret master seed.

    The Ed25519 seed is HKDF-SHA256(ikm = master seed, salt = CONSENT_KEY_SALT,
    info = CONSENT_KEY_LABEL || insurer id, 32 bytes).
    """
    if not isinstance(master_seed, bytes) or len(master_seed) != MASTER_SEED_BYTES:
        raise ConsentInvalid(f"master seed: {MASTER_SEED_BYTES} secret bytes")
    if not _NODE.fullmatch(insurer):
        raise ConsentInvalid(f"insurer: {insurer!r} is not a node name")
    seed = HKDF(SHA256(), 32, CONSENT_KEY_SALT, CONSENT_KEY_LABEL + insurer.encode("ascii")
                ).derive(master_seed)
    return Ed25519PrivateKey.from_private_bytes(seed)


def subject_commitment(national_id: str, consent_id: str, nonce: str) -> str:
    """The commitment to a person's id inside consent `consent_id` (hex)."""
    salt = b"cogov-consent-subject-v1\x00" + consent_id.encode() + b"\x00" + nonce.encode()
    digest = hashlib.scrypt(
        normalize_national_id(national_id).encode(), salt=salt, n=2**14, r=8, p=1, dklen=32
    )
    return digest.hex()


class SubjectBinding(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Literal["scrypt-n16384-r8-p1"] = COMMITMENT_SCHEME
    id_commitment: _Hex32
    public_key: _Hex32


class DataScope(BaseModel):
    """Which record columns may be read and which outputs may be returned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    columns: tuple[_Code, ...]
    outputs: tuple[_Code, ...]


class ConsentTerms(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    consent_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{8,128}$")]
    subject: SubjectBinding
    insurer: _Node
    purpose: _Code
    scenario: _Code = CLAIM_SCENARIO
    scope: DataScope
    not_before: AwareDatetime
    not_after: AwareDatetime
    nonce: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]

    @model_validator(mode="after")
    def _window(self) -> "ConsentTerms":
        if self.not_after <= self.not_before:
            raise ValueError("not_after must be later than not_before")
        if self.not_after - self.not_before > MAX_VALIDITY:
            raise ValueError(f"validity longer than {MAX_VALIDITY.days} days")
        return self


class Consent(BaseModel):
    """Consent terms with the subject's signature."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    terms: ConsentTerms
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]

    @classmethod
    def parse(cls, data: str | bytes | dict[str, Any]) -> "Consent":
        """Validate a consent from JSON (or a dict); errors name the field."""
        try:
            if isinstance(data, dict):
                return cls.model_validate(data)
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ConsentInvalid(_first_error(exc)) from None

    @property
    def consent_id(self) -> str:
        return self.terms.consent_id

    def document_sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.model_dump(mode="json"))).hexdigest()

    def signature_valid(self) -> bool:
        return verify_document(
            self.terms.subject.public_key,
            CONSENT_DOMAIN,
            self.terms.model_dump(mode="json"),
            self.signature,
        )

    def log_payload(self) -> dict[str, str]:
        """Hashes and ids for a `consent_given` log entry (no personal data)."""
        return {
            "consent_id": self.consent_id,
            "consent_sha256": self.document_sha256(),
            "insurer": self.terms.insurer,
            "purpose": self.terms.purpose,
            "scenario": self.terms.scenario,
        }


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(p) for p in error["loc"]) or "document"
    return f"{field}: {error['msg'].removeprefix('Value error, ')}"


def issue_consent(
    subject_key: Ed25519PrivateKey,
    national_id: str,
    *,
    insurer: str,
    purpose: str,
    columns: Collection[str],
    outputs: Collection[str],
    not_before: datetime,
    not_after: datetime,
    scenario: str = CLAIM_SCENARIO,
    consent_id: str | None = None,
) -> Consent:
    """What the consumer's app does: build and sign a consent for one insurer."""
    consent_id = consent_id or f"consent-{uuid.uuid4().hex}"
    nonce = secrets.token_hex(16)
    try:
        terms = ConsentTerms(
            consent_id=consent_id,
            subject=SubjectBinding(
                id_commitment=subject_commitment(national_id, consent_id, nonce),
                public_key=public_key_hex(subject_key),
            ),
            insurer=insurer,
            purpose=purpose,
            scenario=scenario,
            scope=DataScope(columns=tuple(columns), outputs=tuple(outputs)),
            not_before=not_before,
            not_after=not_after,
            nonce=nonce,
        )
    except ValidationError as exc:
        raise ConsentInvalid(_first_error(exc)) from None
    signature = sign_document(subject_key, CONSENT_DOMAIN, terms.model_dump(mode="json"))
    return Consent(terms=terms, signature=signature)


class ConsentRevocation(BaseModel):
    """The subject's signed withdrawal of one consent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    consent_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{8,128}$")]
    revoked_at: AwareDatetime
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"signature"})

    def log_payload(self) -> dict[str, str]:
        return {"consent_id": self.consent_id, "revocation_sha256": _sha256_doc(self)}


def _sha256_doc(model: BaseModel) -> str:
    return hashlib.sha256(canonical_json(model.model_dump(mode="json"))).hexdigest()


def revoke_consent(
    consent: Consent, subject_key: Ed25519PrivateKey, revoked_at: datetime
) -> ConsentRevocation:
    """What the consumer's app does to withdraw a consent."""
    unsigned = ConsentRevocation(
        consent_id=consent.consent_id, revoked_at=revoked_at, signature="0" * 128
    )
    signature = sign_document(subject_key, REVOCATION_DOMAIN, unsigned.body())
    return unsigned.model_copy(update={"signature": signature})


class ConsentRegistry:
    """The serving node's store of subject keys, consents and revocations.

    `pepper` is a node secret: subject keys are indexed by HMAC(pepper, id)
    so the table does not hold national ids or digests guessable from them.
    """

    def __init__(self, conn: "sqlite3.Connection", pepper: bytes) -> None:
        if len(pepper) < 16:
            raise ValueError("pepper: at least 16 secret bytes")
        apply_migrations(conn, COMPONENT, MIGRATIONS)
        self._conn = conn
        self._pepper = pepper

    def _id_digest(self, national_id: str) -> bytes:
        return hmac.digest(self._pepper, normalize_national_id(national_id).encode(), "sha256")

    def register_subject(
        self, national_id: str, public_key: str, now: datetime, *, insurer: str | None = None,
        replace: bool = False,
    ) -> None:
        """Bind a person's national id to their consent-signing key for `insurer` (the
        registrar's step); without an insurer, one key for every insurer (linkable)."""
        if not _COMMITMENT.fullmatch(public_key):
            raise ConsentInvalid("public_key: 64 lowercase hex chars")
        if insurer is not None and not _NODE.fullmatch(insurer):
            raise ConsentInvalid(f"insurer: {insurer!r} is not a node name")
        bound_for = ANY_INSURER if insurer is None else insurer
        digest = self._id_digest(national_id)
        with write_transaction(self._conn):
            rows = dict(self._conn.execute(
                "SELECT insurer, public_key FROM consent_subject_keys WHERE id_digest = ?",
                (digest,)).fetchall())
            held = rows.get(bound_for)
            if held is not None and held != public_key and not replace:
                raise ConsentConflict("this person already has another key registered")
            if any(k == public_key for i, k in rows.items() if i != bound_for):
                raise ConsentConflict("a consent key serves one insurer: this one is already "
                                      "registered for another")
            self._conn.execute(
                "INSERT OR REPLACE INTO consent_subject_keys VALUES (?, ?, ?, ?)",
                (digest, bound_for, public_key, now.isoformat()),
            )

    def subject_key(self, national_id: str, insurer: str | None = None) -> str | None:
        """The key bound to the person for `insurer` (else the one bound for every insurer)."""
        rows = dict(self._conn.execute(
            "SELECT insurer, public_key FROM consent_subject_keys WHERE id_digest = ?",
            (self._id_digest(national_id),)).fetchall())
        if insurer is not None and insurer in rows:
            return rows[insurer]
        return rows.get(ANY_INSURER)

    def register(self, consent: Consent, national_id: str, now: datetime) -> None:
        """Accept a consent after checking its signature and both bindings to the person."""
        terms = consent.terms
        registered_key = self.subject_key(national_id, terms.insurer)
        # No key registered and another key registered are one refusal (see
        # `ConsentSubjectMismatch`); the commitment is checked whatever the key said.
        key_matches = registered_key is not None and hmac.compare_digest(
            registered_key, terms.subject.public_key)
        self._check_subject(consent, national_id)
        if not key_matches:
            raise ConsentSubjectMismatch(SUBJECT_MISMATCH)
        self.store(consent, now)

    def store(self, consent: Consent, now: datetime) -> bool:
        """Keep a signed, unexpired consent whose person binding is checked elsewhere.

        `register` checks the binding with the national id; a node that never
        sees ids (the product's serving node) binds consents to the person behind
        a query's token instead, and stores them with this. Returns whether the
        consent is new (the same document again is accepted and changes nothing).
        """
        if not consent.signature_valid():
            raise ConsentSignatureInvalid(f"consent {consent.consent_id}: bad signature")
        terms = consent.terms
        if now >= terms.not_after:
            raise ConsentExpired(f"consent {consent.consent_id} ended at {terms.not_after}")
        document = consent.model_dump_json()
        with write_transaction(self._conn):
            row = self._conn.execute(
                "SELECT document_sha256 FROM consents WHERE consent_id = ?", (consent.consent_id,)
            ).fetchone()
            if row is not None:
                if row[0] != consent.document_sha256():
                    raise ConsentConflict(f"consent id {consent.consent_id} is already taken")
                return False
            self._conn.execute(
                "INSERT INTO consents VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    consent.consent_id,
                    document,
                    consent.document_sha256(),
                    terms.insurer,
                    terms.purpose,
                    terms.not_before.isoformat(),
                    terms.not_after.isoformat(),
                    now.isoformat(),
                ),
            )
        return True

    def get(self, consent_id: str) -> Consent | None:
        row = self._conn.execute(
            "SELECT document FROM consents WHERE consent_id = ?", (consent_id,)
        ).fetchone()
        return None if row is None else Consent.model_validate_json(row[0])

    def revoke(self, revocation: ConsentRevocation, now: datetime) -> None:
        """Record the subject's signed revocation; idempotent, the earliest time wins."""
        consent = self.get(revocation.consent_id)
        if consent is None:
            raise ConsentMissing(f"no consent {revocation.consent_id}")
        if not verify_document(
            consent.terms.subject.public_key,
            REVOCATION_DOMAIN,
            revocation.body(),
            revocation.signature,
        ):
            raise ConsentSignatureInvalid("revocation is not signed by the consent's subject")
        with write_transaction(self._conn):
            row = self._conn.execute(
                "SELECT revoked_at FROM consent_revocations WHERE consent_id = ?",
                (revocation.consent_id,),
            ).fetchone()
            if row is not None and datetime.fromisoformat(row[0]) <= revocation.revoked_at:
                return
            self._conn.execute(
                "INSERT OR REPLACE INTO consent_revocations VALUES (?, ?, ?, ?)",
                (
                    revocation.consent_id,
                    revocation.model_dump_json(),
                    revocation.revoked_at.isoformat(),
                    now.isoformat(),
                ),
            )

    def in_force(self, insurer: str, purpose: str, now: datetime, *, scenario: str,
                 columns: Collection[str], outputs: Collection[str]) -> list[str]:
        """Ids of the stored consents given to `insurer` that allow this use at `now`: in
        their window, unrevoked, for `purpose` and `scenario`, with `columns` and `outputs`
        in scope. Signatures were verified when each was stored."""
        revoked = {cid: datetime.fromisoformat(at) for cid, at in self._conn.execute(
            "SELECT r.consent_id, r.revoked_at FROM consent_revocations r JOIN consents c"
            " ON c.consent_id = r.consent_id WHERE c.insurer = ?", (insurer,))}
        found = []
        for consent_id, document in self._conn.execute(
                "SELECT consent_id, document FROM consents WHERE insurer = ? AND purpose = ?",
                (insurer, purpose)):
            terms = json.loads(document)["terms"]
            if ((consent_id in revoked and revoked[consent_id] <= now)
                    or not datetime.fromisoformat(terms["not_before"]) <= now
                    < datetime.fromisoformat(terms["not_after"])
                    or terms.get("scenario", CLAIM_SCENARIO) != scenario
                    or not set(columns) <= set(terms["scope"]["columns"])
                    or not set(outputs) <= set(terms["scope"]["outputs"])):
                continue
            found.append(consent_id)
        return found

    def revoked_at(self, consent_id: str) -> datetime | None:
        row = self._conn.execute(
            "SELECT revoked_at FROM consent_revocations WHERE consent_id = ?", (consent_id,)
        ).fetchone()
        return None if row is None else datetime.fromisoformat(row[0])

    def check(
        self,
        consent: Consent,
        national_id_or_commitment: str,
        insurer: str,
        purpose: str,
        now: datetime,
        *,
        scenario: str | None = None,
        columns: Collection[str] = (),
        outputs: Collection[str] = (),
    ) -> ConsentTerms:
        """Raise the typed error that refuses this query, or return the consent's terms.

        `national_id_or_commitment` is the queried person's national id or the
        64-hex commitment computed from it for this consent.
        """
        if not consent.signature_valid():
            raise ConsentSignatureInvalid(f"consent {consent.consent_id}: bad signature")
        stored = self._conn.execute(
            "SELECT document_sha256 FROM consents WHERE consent_id = ?", (consent.consent_id,)
        ).fetchone()
        if stored is None:
            raise ConsentMissing(f"consent {consent.consent_id} is not registered")
        if stored[0] != consent.document_sha256():
            raise ConsentMismatch(f"consent {consent.consent_id} differs from the registered one")
        revoked_at = self.revoked_at(consent.consent_id)
        if revoked_at is not None and revoked_at <= now:
            raise ConsentRevoked(f"consent {consent.consent_id} was revoked at {revoked_at}")
        terms = consent.terms
        if now < terms.not_before:
            raise ConsentNotYetValid(f"consent {consent.consent_id} starts at {terms.not_before}")
        if now >= terms.not_after:
            raise ConsentExpired(f"consent {consent.consent_id} ended at {terms.not_after}")
        if insurer != terms.insurer:
            raise ConsentMismatch(f"consent was given to {terms.insurer}, not {insurer}")
        if purpose != terms.purpose:
            raise ConsentMismatch(f"consent covers purpose {terms.purpose}, not {purpose}")
        if scenario is not None and scenario != terms.scenario:
            raise ConsentMismatch(f"consent covers scenario {terms.scenario}, not {scenario}")
        extra_columns = sorted(set(columns) - set(terms.scope.columns))
        extra_outputs = sorted(set(outputs) - set(terms.scope.outputs))
        if extra_columns or extra_outputs:
            raise ConsentScopeExceeded(
                f"outside the consent's scope: columns {extra_columns}, outputs {extra_outputs}"
            )
        # Last: every refusal above depends on the document and the query alone, this one on
        # the person, so a caller can tell "the document refuses" from "the person does not
        # match" and refuse the latter uniformly (`ConsentSubjectMismatch`).
        self._check_subject(consent, national_id_or_commitment)
        return terms

    @staticmethod
    def _check_subject(consent: Consent, national_id_or_commitment: str) -> None:
        terms = consent.terms
        value = national_id_or_commitment.strip()
        if _COMMITMENT.fullmatch(value):
            commitment = value
        else:
            commitment = subject_commitment(value, terms.consent_id, terms.nonce)
        if not hmac.compare_digest(commitment, terms.subject.id_commitment):
            raise ConsentSubjectMismatch(SUBJECT_MISMATCH)
