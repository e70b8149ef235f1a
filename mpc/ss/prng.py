"""Cryptographic random streams for every secret the secret-sharing engine draws.

Why this module exists: CrypTen draws each Beaver triple, binary triple, B2A bit and
pseudo-random zero sharing from a `torch.Generator`, which is MT19937. MT19937 is
linear: 624 consecutive 32-bit outputs (312 int64 ring elements) give its whole
state, hence every later output. In the claim circuit the operator knows `valid` in
plaintext, so opening `valid - a` hands it a contiguous block of the regulator's
dealer stream; from that block it could predict every later share of the regulator
and unmask every opening of the session. A seed of 64 bits does not help: the state
is recovered from the output, not from the seed.

So in the `ss` path every random value comes from a `StreamGenerator` instead: AES-256
in counter mode (pyca `cryptography`), keyed with a 32-byte seed from
`secrets.token_bytes(32)`, the counter block starting at zero. A draw of n ring
elements takes the next 8*n keystream bytes as little-endian int64 (uniform over
Z/2^64); a k-bit draw keeps the low k bits of the same words. Without the key, any
amount of output says nothing about the rest (AES as a pseudo-random function).

A seed keys exactly one stream (one key, one counter, never re-seeded), so no counter
block is ever reused. Two parties holding the same seed draw the same values only if
they make the same draws in the same order, which CrypTen's protocols do.

`mpc.crypten_compat.install_crypto_rng()` routes CrypTen's samplers here; they refuse
any `torch.Generator`.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import threading
import weakref
from collections.abc import Iterable

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mpc.errors import MalformedInput, MpcError

SEED_BYTES = 32
RING_BITS = 64
_ZERO_COUNTER = bytes(16)


class InsecureRandomness(MpcError):
    """A secret was about to be drawn from a non-cryptographic generator (or none)."""

    http_status = 500


def new_seed() -> bytes:
    """A fresh 256-bit stream key from the OS CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def check_seed(seed: object) -> bytes:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise MalformedInput(f"a stream seed is {SEED_BYTES} bytes")
    if not any(seed):
        raise MalformedInput("an all-zero stream seed is refused")
    return bytes(seed)


def seed_from_hex(text: object) -> bytes:
    """A seed as sent in a JSON message: 64 hex digits."""
    if not isinstance(text, str) or len(text) != 2 * SEED_BYTES:
        raise MalformedInput(f"a stream seed is {2 * SEED_BYTES} hex digits")
    try:
        return check_seed(bytes.fromhex(text))
    except ValueError as exc:
        raise MalformedInput("a stream seed is hex") from exc


def _shape(size: int | Iterable[int]) -> tuple[int, ...]:
    dims = (size,) if isinstance(size, int) else tuple(size)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise MalformedInput(f"bad tensor size {size!r}")
    return dims


_live_streams: weakref.WeakSet[StreamGenerator] = weakref.WeakSet()


def _disable_inherited_streams() -> None:
    """A forked child holds copies of its parent's streams: drawing from one would repeat
    the parent's keystream, so every inherited stream refuses to draw."""
    for stream in list(_live_streams):
        stream._forked = True


os.register_at_fork(after_in_child=_disable_inherited_streams)


class StreamGenerator:
    """An AES-256-CTR keystream read as int64 ring elements (CPU only).

    Stands where CrypTen expects a `torch.Generator`: it has `.device`, and CrypTen's
    samplers (patched by `mpc.crypten_compat`) call `ring_elements` / `kbit`.
    """

    device = torch.device("cpu")

    def __init__(self, seed: bytes) -> None:
        key = check_seed(seed)
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
        self._lock = threading.Lock()
        self._forked = False
        self.drawn = 0  # ring elements drawn so far
        _live_streams.add(self)

    def _words(self, n: int) -> np.ndarray:
        """The next n keystream words as int64 (8 bytes each, little-endian).

        One cipher call per draw, written straight into the array (CTR output may
        use up to a block more than its input, hence the two spare words).
        """
        if self._forked:
            raise InsecureRandomness("a stream inherited through fork would repeat its "
                                     "parent's keystream")
        out = np.empty(n + 2, dtype=np.int64)
        with self._lock:
            written = self._encryptor.update_into(bytes(8 * n), memoryview(out).cast("B"))
            self.drawn += n
        if written != 8 * n:
            raise InsecureRandomness("the cipher returned a short keystream")
        words = out[:n]
        if sys.byteorder != "little":
            words.byteswap(inplace=True)
        return words

    def ring_elements(self, size: int | Iterable[int]) -> torch.Tensor:
        """int64 tensor of `size`, each element uniform over the ring Z/2^64."""
        dims = _shape(size)
        return torch.from_numpy(self._words(math.prod(dims)).reshape(dims))

    def kbit(self, size: int | Iterable[int], bitlength: int = RING_BITS) -> torch.Tensor:
        """int64 tensor of `size`, uniform over [0, 2^bitlength) (the ring if 64)."""
        if not isinstance(bitlength, int) or not 1 <= bitlength <= RING_BITS:
            raise MalformedInput(f"bitlength must be 1..{RING_BITS}, got {bitlength!r}")
        out = self.ring_elements(size)
        if bitlength < RING_BITS:
            out &= (1 << bitlength) - 1
        return out

    # -- what a torch.Generator would offer, refused ---------------------------------
    def manual_seed(self, *_args, **_kwargs):
        raise InsecureRandomness("a stream is keyed once with 32 random bytes; "
                                 "integer seeds are refused")

    def __getstate__(self):
        raise InsecureRandomness("a stream generator does not leave its process")

    def __repr__(self) -> str:
        return f"<StreamGenerator AES-256-CTR drawn={self.drawn}>"
