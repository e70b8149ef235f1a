"""Byte encodings of what the secret-sharing engine sends: tensors and small JSON objects.

No pickle crosses the wire. A tensor list is `count (u8)` then, per tensor,
`dtype (u8) | ndim (u8) | dims (u64 each)`, then the raw little-endian data of all
tensors in order. Decoding checks every length and refuses anything else.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch

from mpc.errors import MalformedInput

FRAME_TENSORS = 1
FRAME_OBJECT = 2

_DTYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    1: (torch.int64, np.dtype("<i8")),
    2: (torch.int32, np.dtype("<i4")),
    3: (torch.int8, np.dtype("i1")),
    4: (torch.uint8, np.dtype("u1")),
    5: (torch.float64, np.dtype("<f8")),
    6: (torch.float32, np.dtype("<f4")),
    7: (torch.bool, np.dtype("?")),
}
_CODE = {torch_dtype: code for code, (torch_dtype, _) in _DTYPES.items()}
MAX_ELEMENTS = 1 << 28


def encode_tensors(tensors: list[torch.Tensor]) -> bytes:
    if len(tensors) > 255:
        raise MalformedInput("too many tensors in one frame")
    head = [struct.pack("!B", len(tensors))]
    body = []
    for t in tensors:
        t = t.detach().cpu().contiguous()
        if t.dtype not in _CODE:
            raise MalformedInput(f"unsupported dtype {t.dtype}")
        head.append(struct.pack(f"!BB{t.dim()}Q", _CODE[t.dtype], t.dim(), *t.shape))
        body.append(t.numpy().astype(_DTYPES[_CODE[t.dtype]][1], copy=False).tobytes())
    return b"".join(head + body)


def decode_tensors(data: bytes) -> list[torch.Tensor]:
    view = memoryview(data)
    try:
        (count,) = struct.unpack_from("!B", view, 0)
        offset = 1
        specs = []
        for _ in range(count):
            code, ndim = struct.unpack_from("!BB", view, offset)
            offset += 2
            dims = struct.unpack_from(f"!{ndim}Q", view, offset)
            offset += 8 * ndim
            if code not in _DTYPES:
                raise MalformedInput(f"unknown dtype code {code}")
            if int(np.prod(dims, dtype=np.float64)) > MAX_ELEMENTS:
                raise MalformedInput("tensor too large")
            specs.append((code, dims))
    except struct.error as exc:
        raise MalformedInput("truncated tensor header") from exc
    out = []
    for code, dims in specs:
        _, np_dtype = _DTYPES[code]
        n = int(np.prod(dims, dtype=np.int64))
        size = n * np_dtype.itemsize
        if offset + size > len(view):
            raise MalformedInput("truncated tensor data")
        array = np.frombuffer(view, dtype=np_dtype, count=n, offset=offset).reshape(dims)
        out.append(torch.from_numpy(array.astype(np_dtype.newbyteorder("="), copy=True)))
        offset += size
    if offset != len(view):
        raise MalformedInput("trailing bytes after tensors")
    return out


def encode_object(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_object(data: bytes) -> object:
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedInput("bad JSON object frame") from exc
