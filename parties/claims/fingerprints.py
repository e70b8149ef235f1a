"""How a claim names its check budget and itself to the regulator, without its values.

The regulator counts checks per (contract, consent, hospital, UTC day) and answers an
identical check again from its book, yet it never sees a claim's token, hospital or
values (they travel sealed to the operator or secret-shared). So each claim carries two
tags, computed by the insurer:

- `hospital_tag` = HMAC-SHA256(key = the person's domain token, consent id | hospital):
  the (consent, hospital) budget bucket. The regulator holds no token, so it cannot tell
  which hospital a tag names (with three hospitals, an unkeyed tag would be tried in three
  guesses). The operator holds the token and the hospital, recomputes the tag and refuses
  a claim whose tag is another (`parties.claims.compute`), so an insurer cannot open a
  fresh bucket for the same consent and hospital by inventing a tag. A token of nobody, or
  of another person, opens a bucket of its own, and buys only the uniform refusal there.
- `claim_digest` = HMAC-SHA256(key = the insurer's own check secret, consent id | token |
  hospital | the claim as the engines encode it: day, amount in fen, diagnosis category):
  what makes two checks identical. Only the insurer can compute or test it; the regulator
  compares digests for equality and nothing else.

The digest is the insurer's word, and no server can verify it (none sees a claim value).
It needs no verification: a check whose digests were answered before gets the stored bytes
of that answer and nothing is computed, so passing a new claim off as an old one returns
the old verdict; a repeat disguised under a fresh digest is a new check and spends budget.
Either way a repeat learns nothing the budget did not already pay for.

`check_key` names one request's question (contract, mode, K, HE context and every claim's
tags, in order): the unit the regulator deduplicates.
"""

import hashlib
import hmac
import json
from collections.abc import Sequence

from parties.claims.api import ClaimRef

HOSPITAL_TAG_DOMAIN = b"cogov-claim-hospital-tag-v1"
CLAIM_DIGEST_DOMAIN = b"cogov-claim-digest-v1"
CHECK_KEY_DOMAIN = b"cogov-claim-check-key-v1"


def _message(domain: bytes, *fields: object) -> bytes:
    # JSON of the fields: unambiguous boundaries, whatever the strings hold.
    return domain + b"\x00" + json.dumps(list(fields), separators=(",", ":")).encode()


def hospital_tag(token: bytes, consent_id: str, hospital: str) -> str:
    """The budget bucket of (consent, hospital), keyed with the person's domain token (hex)."""
    return hmac.new(token, _message(HOSPITAL_TAG_DOMAIN, consent_id, hospital),
                    hashlib.sha256).hexdigest()


def claim_digest(secret: bytes, consent_id: str, token: bytes, hospital: str,
                 encoded: Sequence[int]) -> str:
    """What makes a check identical to another: the claim as the engines compute on it
    (`encoded` = day, claimed fen, category), keyed with the insurer's check secret (hex)."""
    return hmac.new(secret, _message(CLAIM_DIGEST_DOMAIN, consent_id, token.hex(), hospital,
                                     [int(v) for v in encoded]), hashlib.sha256).hexdigest()


def check_key(contract_id: str, mode: str, k: int, he_context: str | None,
              claims: Sequence[ClaimRef]) -> str:
    """The question a request asks, as the regulator deduplicates it (hex)."""
    fields = [[c.consent_id, c.hospital_tag, c.claim_digest] for c in claims]
    return hashlib.sha256(_message(CHECK_KEY_DOMAIN, contract_id, mode, k, he_context,
                                   fields)).hexdigest()
