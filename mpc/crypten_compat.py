"""CrypTen shims: import it on torch 2.13, and make every random draw cryptographic.

1. crypten 0.4.1 imports `torch.onnx._internal.registration`, which torch moved to
   `torch.onnx._internal.torchscript_exporter.registration`. Importing this module
   first aliases the old name to the new one.
2. CrypTen draws every share, triple and zero sharing through
   `crypten.common.rng.generate_random_ring_element` / `generate_kbit_random_tensor`
   from a `torch.Generator` (MT19937: its future output follows from 624 outputs; see
   `mpc.ss.prng`). `install_crypto_rng()` rebinds both names, in every crypten module
   that imported them by value, to samplers that draw from a `StreamGenerator`
   (AES-256-CTR) and refuse anything else, and replaces `crypten._setup_prng` with an
   exchange of 32-byte seeds (`setup_crypto_prng`). Inside a secret-sharing session
   (`set_strict_rng(True)`) a draw without an explicit generator is refused too.

Always import crypten through `load_crypten()`; it applies both shims (idempotent).

Outside what this covers, CrypTen fails loudly rather than fall back to MT19937: its
own TTP client/server over torch.distributed seeds `torch.Generator`s (refused at the
first draw), dropout in `crypten.gradients` hands a stream to `torch.rand` (torch
raises), `crypten.manual_seed` is refused, and no CUDA generators are set up.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import numpy as np
import torch

from mpc.errors import MalformedInput
from mpc.ss.prng import (
    RING_BITS,
    SEED_BYTES,
    InsecureRandomness,
    StreamGenerator,
    check_seed,
    new_seed,
)

_OLD = "torch.onnx._internal.registration"
_NEW = "torch.onnx._internal.torchscript_exporter.registration"

SAMPLERS = ("generate_random_ring_element", "generate_kbit_random_tensor")
# every module of crypten 0.4.1 that imports a sampler by value; all must be rebound
SAMPLER_MODULES = (
    "crypten.common.rng",
    "crypten.mpc.primitives.arithmetic",
    "crypten.mpc.primitives.binary",
    "crypten.mpc.provider.ttp_provider",
    "crypten.mpc.provider.tfp_provider",
)
GENERATOR_KEYS = ("prev", "next", "local", "global")
CPU = torch.device("cpu")

ORIGINALS: dict[str, object] = {}  # CrypTen's own functions, kept for tests
_state = {"installed": False, "strict": False}


def _alias_onnx_registration() -> None:
    if _OLD in sys.modules:
        return
    try:
        importlib.import_module(_OLD)
    except ModuleNotFoundError:
        sys.modules[_OLD] = importlib.import_module(_NEW)


def load_crypten() -> ModuleType:
    """Return the `crypten` module: torch 2.13 alias in place, cryptographic samplers on."""
    _alias_onnx_registration()
    import crypten

    if not _state["installed"]:
        install_crypto_rng()
    return crypten


# -- the samplers ----------------------------------------------------------------------
def _stream(generator, kwargs: dict) -> StreamGenerator:
    device = kwargs.pop("device", None)
    if kwargs:
        raise InsecureRandomness(f"unexpected sampler arguments {sorted(kwargs)}")
    if device is not None and torch.device(device).type != "cpu":
        raise InsecureRandomness(f"cryptographic streams are CPU only; refusing {device}")
    if generator is None:
        if _state["strict"]:
            raise InsecureRandomness("a secret-sharing session drew randomness without "
                                     "naming its stream")
        import crypten

        generator = crypten.generators["local"].get(CPU)
        if generator is None:
            raise InsecureRandomness("CrypTen's generators are not set up")
    if not isinstance(generator, StreamGenerator):
        raise InsecureRandomness(
            f"refusing to draw a secret from {type(generator).__name__}: only "
            "mpc.ss.prng.StreamGenerator (AES-256-CTR) may feed the ss path")
    return generator


def generate_random_ring_element(size, *, ring_size=2**RING_BITS, generator=None, **kwargs):
    """CrypTen's sampler signature; uniform int64 over Z/2^64 from a cryptographic stream."""
    if ring_size != 2**RING_BITS:
        raise InsecureRandomness(f"only the ring Z/2^64 is sampled, not {ring_size!r}")
    return _stream(generator, kwargs).ring_elements(size)


def generate_kbit_random_tensor(size, *, bitlength=None, generator=None, **kwargs):
    """CrypTen's sampler signature; uniform over [0, 2^bitlength) from a cryptographic stream."""
    return _stream(generator, kwargs).kbit(size, RING_BITS if bitlength is None else bitlength)


_PATCHED = {
    "generate_random_ring_element": generate_random_ring_element,
    "generate_kbit_random_tensor": generate_kbit_random_tensor,
}


def _crypten_modules() -> list[ModuleType]:
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "crypten" or name.startswith("crypten."))]


def install_crypto_rng() -> None:
    """Rebind CrypTen's samplers and seed setup everywhere (idempotent)."""
    _alias_onnx_registration()
    import crypten

    for name in SAMPLER_MODULES:
        importlib.import_module(name)
    rng = sys.modules["crypten.common.rng"]
    if not ORIGINALS:
        for name in SAMPLERS:
            ORIGINALS[name] = getattr(rng, name)
        ORIGINALS["_setup_prng"] = crypten._setup_prng
    for module in _crypten_modules():
        for name in SAMPLERS:
            if getattr(module, name, None) is ORIGINALS[name]:
                setattr(module, name, _PATCHED[name])
    for name in SAMPLER_MODULES:
        module = sys.modules[name]
        bound = [getattr(module, s) for s in SAMPLERS if hasattr(module, s)]
        if not bound or any(f not in _PATCHED.values() for f in bound):
            raise InsecureRandomness(f"{name} still samples with CrypTen's own generator")
    crypten._setup_prng = setup_crypto_prng
    _state["installed"] = True


def unpatched_modules() -> list[str]:
    """crypten modules still holding one of CrypTen's own samplers (should be none)."""
    return sorted(m.__name__ for m in _crypten_modules()
                  if any(getattr(m, s, None) is ORIGINALS.get(s) for s in SAMPLERS))


def set_strict_rng(on: bool) -> None:
    """While on, a draw that names no stream is refused (set by the ss session)."""
    _state["strict"] = bool(on)


# -- seeds --------------------------------------------------------------------------------
def _seed_tensor(seed: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(check_seed(seed), dtype="<i8").astype(np.int64))


def _tensor_seed(tensor: torch.Tensor) -> bytes:
    if tensor.dtype != torch.int64 or tensor.numel() != SEED_BYTES // 8:
        raise MalformedInput("a seed travels as four int64 words")
    seed = tensor.reshape(-1).numpy().astype("<i8").tobytes()
    if seed == bytes(SEED_BYTES):
        raise MalformedInput("received an all-zero seed")
    return seed


def exchange_seeds(comm) -> dict[str, bytes]:
    """Draw and swap CrypTen's four seeds over `comm` (a CrypTen communicator).

    Each party draws 32 bytes for "next" and sends them to the next rank, which keeps
    them as its "prev"; "local" never leaves the party; rank 0 draws "global" and
    broadcasts it.
    """
    rank, world = comm.get_rank(), comm.get_world_size()
    mine = new_seed()
    if world >= 2:
        incoming = torch.zeros(SEED_BYTES // 8, dtype=torch.int64)
        sent = comm.isend(_seed_tensor(mine), (rank + 1) % world)
        received = comm.irecv(incoming, src=(rank - 1) % world)
        sent.wait()
        received.wait()
        prev = _tensor_seed(incoming)
    else:
        prev = mine
    shared = _seed_tensor(new_seed()) if rank == 0 else torch.zeros(SEED_BYTES // 8,
                                                                      dtype=torch.int64)
    shared = comm.broadcast(shared, 0)
    return {"prev": prev, "next": mine, "local": new_seed(), "global": _tensor_seed(shared)}


def install_generators(seeds: dict[str, bytes]) -> None:
    """Point `crypten.generators` at one stream per key (CPU; other devices dropped)."""
    import crypten

    for key in GENERATOR_KEYS:
        crypten.generators[key].clear()
        crypten.generators[key][CPU] = StreamGenerator(seeds[key])


def setup_crypto_prng(comm=None) -> None:
    """Stands in for `crypten._setup_prng`: 32-byte seeds over `comm` (default: CrypTen's)."""
    if comm is None:
        import crypten

        comm = crypten.communicator.get()
    install_generators(exchange_seeds(comm))
