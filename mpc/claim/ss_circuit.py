"""The verdict circuit on additive shares (CrypTen primitives, integer encoding).

Per claim i and candidate slot j, with d = admission_day - visit_day:

    date_ij  = [d >= -1] and [d <= 1]    = 1 - ltz(d + 1) - ltz(1 - d)
    amount_ij = [claimed <= self_pay]     = 1 - ltz(self_pay - claimed)
    diag_ij  = [category equal]          = 1 - ltz(e) - ltz(-e),  e = cat_row - cat_claim
    found_ij = valid_ij * date_ij

and the outputs are sums over the K slots of found, found*amount, found*diag. The two
terms inside each bracket cannot both be 1 (for in-range inputs), so the ANDs are
subtractions. All 5*n*K comparisons run as ONE vectorized CrypTen `ltz` (constant
rounds whatever the batch size), followed by two multiplication rounds. The validity
flag multiplies (rather than shifts) the date test so no claim value can make a
dummy slot match. Output shares are re-randomized with a fresh zero sharing before
they leave the party, so the two output shares are uniform given their sum.
"""

from __future__ import annotations

import torch

from mpc.crypten_compat import load_crypten

_crypten = load_crypten()
ArithmeticSharedTensor = _crypten.mpc.primitives.ArithmeticSharedTensor
convert = _crypten.mpc.primitives.converters.convert
Ptype = _crypten.mpc.ptype  # the enum (crypten.mpc re-exports it over the module name)

SIGN_SHIFT = 63


def _shared(share: torch.Tensor) -> ArithmeticSharedTensor:
    return ArithmeticSharedTensor.from_shares(share, precision=0)


def less_than_zero(share: torch.Tensor) -> torch.Tensor:
    """Shares of [x < 0] (0/1) from shares of x, for every element at once."""
    binary = convert(_shared(share), Ptype.binary)
    binary.share >>= SIGN_SHIFT
    bit = convert(binary, Ptype.arithmetic, precision=0, bits=1)
    return bit.share


def verdict_shares(
    rank: int, claims: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """This party's int64 [n, 3] shares of (visit_found, amount_consistent, diagnosis_match).

    `claims` int64 [n, 3] and `rows` int64 [n, k, 3] are this party's shares; `valid`
    is the bool [n, k] slot mask at rank 0 (the party that planned the slots), None
    elsewhere.
    """
    n, k = rows.shape[0], rows.shape[1]
    one = 1 if rank == 0 else 0  # a public constant enters through rank 0's share only
    d = rows[..., 0] - claims[:, 0:1]
    delta = rows[..., 1] - claims[:, 1:2]
    e = rows[..., 2] - claims[:, 2:3]
    lt = less_than_zero(torch.stack([d + one, one - d, delta, e, -e]))
    date = one - lt[0] - lt[1]
    amount = one - lt[2]
    diagnosis = one - lt[3] - lt[4]

    valid_shared = ArithmeticSharedTensor(
        valid.to(torch.int64) if valid is not None else None,
        size=(n, k),
        precision=0,
        src=0,
    )
    found = valid_shared.mul(_shared(date))
    both = _shared(torch.stack([found.share, found.share])).mul(
        _shared(torch.stack([amount, diagnosis]))
    )
    out = torch.stack([found.share.sum(-1), both.share[0].sum(-1), both.share[1].sum(-1)], 1)
    return out + ArithmeticSharedTensor.PRZS((n, 3)).share
