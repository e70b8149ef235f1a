"""Ids as the bytes the protocols hash: one encoding for xID tokens and private intersections.

A str id is UTF-8 encoded and bytes are taken as they are, so "a" and b"a" are the
same person to every protocol. An empty id names nobody and is refused, as is any
other type, naming the id's index.
"""

from collections.abc import Sequence

import numpy as np

from mpc.errors import MalformedInput

Ids = Sequence[str | bytes] | np.ndarray


def id_bytes(ids: Ids) -> list[bytes]:
    """Each id as bytes; raises `MalformedInput` for an empty id or one of another type."""
    out = []
    for i, value in enumerate(ids.tolist() if isinstance(ids, np.ndarray) else ids):
        if isinstance(value, str):
            value = value.encode()
        elif isinstance(value, bytearray):
            value = bytes(value)
        elif not isinstance(value, bytes):
            raise MalformedInput(f"id {i}: expected str or bytes, got {type(value).__name__}")
        if not value:
            raise MalformedInput(f"id {i}: empty id")
        out.append(value)
    return out
