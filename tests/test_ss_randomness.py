"""Every secret of the ss path comes from AES-256-CTR streams, never from MT19937.

1. A real ss evaluation (operator, regulator, dealer as spawned processes on loopback
   mTLS) with every torch sampler and `torch.Generator` wired to record calls: the
   crypto path makes none; a control that puts CrypTen's own pairwise generators back
   is caught by the same check.
2. The operator's MT19937 attack: untemper 624 outputs, clone the state, predict. It
   predicts a `torch.Generator` ring stream exactly and our streams not at all.
3. Known answers for the stream (FIPS-197 AES-256, then AES-ECB of the counter blocks
   computed here) and a uniformity sanity check.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import threading
import traceback

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mpc.crypten_compat import (
    ORIGINALS,
    SAMPLER_MODULES,
    exchange_seeds,
    load_crypten,
    set_strict_rng,
    setup_crypto_prng,
    unpatched_modules,
)
from mpc.errors import MalformedInput
from mpc.ss.prng import InsecureRandomness, StreamGenerator, new_seed

crypten = load_crypten()
rng = crypten.common.rng

OPERATOR, REGULATOR, DEALER = "operator", "regulator", "health-authority"
PARTIES = [OPERATOR, REGULATOR]

# -- 1. no torch.Generator in a real ss evaluation --------------------------------------
TORCH_SAMPLERS = ("randint", "rand", "randn", "randperm", "randint_like", "rand_like",
                  "randn_like", "bernoulli", "normal", "multinomial", "poisson",
                  "manual_seed", "seed")
TENSOR_SAMPLERS = ("random_", "uniform_", "normal_", "bernoulli_", "exponential_",
                   "geometric_", "log_normal_", "cauchy_")


def _tripwire(calls: list, phase: dict) -> None:
    """Record every torch sampler call and every torch.Generator made or seeded."""

    def wrap(owner, name):
        original = getattr(owner, name)

        def recorder(*args, **kwargs):
            calls.append((phase["now"], name, kwargs.get("generator") is not None))
            return original(*args, **kwargs)

        setattr(owner, name, recorder)

    for name in TORCH_SAMPLERS:
        wrap(torch, name)
    for name in TENSOR_SAMPLERS:
        wrap(torch.Tensor, name)

    class RecordingGenerator(torch.Generator):  # the C type itself is immutable
        def __new__(cls, *args, **kwargs):
            calls.append((phase["now"], "Generator()", True))
            return super().__new__(cls, *args, **kwargs)

        def manual_seed(self, seed):
            calls.append((phase["now"], "Generator.manual_seed", True))
            return super().manual_seed(seed)

    torch.Generator = RecordingGenerator


def _count_stream_draws(counter: list) -> None:
    words = StreamGenerator._words

    def counted(self, n):
        counter[0] += n
        return words(self, n)

    StreamGenerator._words = counted


def _legacy_pairwise() -> None:
    """The control: CrypTen's own PRZS samplers and `_setup_prng` (torch MT19937)."""
    ring, kbit = (ORIGINALS[s] for s in ("generate_random_ring_element",
                                         "generate_kbit_random_tensor"))
    rng.generate_random_ring_element, rng.generate_kbit_random_tensor = ring, kbit
    crypten.mpc.primitives.arithmetic.generate_random_ring_element = ring
    crypten.mpc.primitives.binary.generate_kbit_random_tensor = kbit
    ORIGINALS["_setup_prng"]()  # 64-bit seeds over the session's communicator


def _one_dealer_stream_for_both() -> None:
    """A faulty or hostile dealer that deals both parties from the same seed."""
    from mpc.ss import dealer

    seed = new_seed()
    dealer.new_seed = lambda: seed


def _party_main(role, material, mode, job, inbox, outbox) -> None:
    from mpc.certificates import tls_contexts
    from mpc.ss.loopback import _bind_and_learn_addresses
    from mpc.ss.session import DealerSession, SsSession

    torch.set_num_threads(1)
    calls: list = []
    phase = {"now": "open"}
    drawn = [0]
    _count_stream_draws(drawn)
    _tripwire(calls, phase)
    listener, addresses = _bind_and_learn_addresses(role, inbox, outbox)
    server, client = tls_contexts(material)
    result = None
    try:
        if role == DEALER:
            if mode == "shared_dealer_stream":
                _one_dealer_stream_for_both()
            dealer = DealerSession.open(role, addresses, PARTIES, server, client,
                                        listener=listener)
            phase["now"] = "evaluate"
            dealer.serve_forever()
            dealer.close()
        else:
            session = SsSession.open(role, addresses, PARTIES, DEALER, server, client,
                                     listener=listener)
            if mode == "legacy":
                _legacy_pairwise()
            streams = all(isinstance(g, StreamGenerator)
                          for gens in crypten.generators.values() for g in gens.values())
            streams = streams and isinstance(session.dealer_client.generator, StreamGenerator)
            phase["now"] = "evaluate"
            claims, rows, valid, row_index = (job[k] for k in ("claims", "rows", "valid",
                                                               "row_index"))
            if role == OPERATOR:
                out = session.evaluate("randomness", torch.from_numpy(claims),
                                       torch.from_numpy(rows), valid, row_index)
            else:
                _, out = session.serve_one(lambda request: (torch.from_numpy(claims),
                                                            torch.from_numpy(rows)))
            phase["now"] = "close"
            session.close()
            result = (out.numpy(), streams)
        outbox.put(("done", role, result, calls, drawn[0]))
    except BaseException:  # reported to the parent, which fails the test
        outbox.put(("done", role, traceback.format_exc(), calls, drawn[0]))


def _job():
    from mpc.claim import ss_shares
    from mpc.claim.candidates import gather_rows, plan_candidate_slots
    from mpc.claim.encoding import encode_claims, encode_visit_rows
    from mpc.claim.plain import plain_engine_bits
    from mpc.claim.synthetic import make_dataset

    data = make_dataset(n_claims=80, seed=5)
    keys = lambda f: list(zip(f["national_id"].astype(str),  # noqa: E731
                              f["hospital_id"].astype(str), strict=True))
    slots = plan_candidate_slots(keys(data.claims), keys(data.visits), k=4)
    claims = encode_claims(data.claims).values
    rows = gather_rows(encode_visit_rows(data.visits), slots)
    expected = plain_engine_bits(claims, rows, slots.valid)
    c0, c1 = ss_shares.split(claims)
    r0, r1 = ss_shares.split(rows)
    jobs = {OPERATOR: {"claims": c0, "rows": r0, "valid": slots.valid,
                       "row_index": slots.row_index},
            REGULATOR: {"claims": c1, "rows": r1, "valid": None,
                        "row_index": slots.row_index},
            DEALER: None}
    return jobs, expected


def _run_session(mode: str) -> tuple[dict, np.ndarray]:
    from mpc.certificates import make_pki

    jobs, expected = _job()
    ctx = mp.get_context("spawn")
    pki = make_pki([OPERATOR, REGULATOR, DEALER])
    outbox = ctx.Queue()
    inboxes = {role: ctx.Queue() for role in (OPERATOR, REGULATOR, DEALER)}
    procs = [ctx.Process(target=_party_main, name=role, daemon=True,
                         args=(role, pki[role], mode, jobs[role], inboxes[role], outbox))
             for role in inboxes]
    for p in procs:
        p.start()
    try:
        ports = {}
        for _ in procs:
            kind, name, port = outbox.get(timeout=180)
            assert kind == "port"
            ports[name] = ("127.0.0.1", port)
        for inbox in inboxes.values():
            inbox.put(("addresses", ports))
        reports = {}
        for _ in procs:
            _, role, result, calls, drawn = outbox.get(timeout=300)
            reports[role] = {"result": result, "calls": calls, "drawn": drawn}
    except queue.Empty:
        pytest.fail(f"party processes stalled: {[(p.name, p.exitcode) for p in procs]}")
    finally:
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
    return reports, expected


def _check_result(reports: dict, expected: np.ndarray) -> None:
    for role in PARTIES:
        assert isinstance(reports[role]["result"], tuple), reports[role]["result"]
    share0, share1 = reports[OPERATOR]["result"][0], reports[REGULATOR]["result"][0]
    assert ((share0 + share1) == expected).all()  # int64 wraps: the shares' sum mod 2^64
    assert expected[:, 0].any() and not expected[:, 0].all()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["crypto", "legacy"])
def test_no_torch_generator_produces_a_secret(mode):
    reports, expected = _run_session(mode)
    _check_result(reports, expected)
    assert reports[DEALER]["result"] is None
    for role in (OPERATOR, REGULATOR, DEALER):
        assert reports[role]["drawn"] > 0, role  # the streams did produce the randomness
    if mode == "crypto":
        for role in (OPERATOR, REGULATOR, DEALER):
            assert reports[role]["calls"] == [], role
        assert all(reports[role]["result"][1] for role in PARTIES)
    else:  # the same tripwire sees CrypTen's MT19937 path the moment it is back
        for role in PARTIES:
            seen = reports[role]["calls"]
            assert ("open", "Generator.manual_seed", True) in seen, role
            assert ("evaluate", "randint", True) in seen, role
        assert reports[DEALER]["calls"] == []  # the dealer kept its streams


@pytest.mark.timeout(600)
def test_a_dealer_that_deals_both_parties_one_stream_is_refused():
    """With one stream for both, the operator would replay the regulator's triples."""
    reports, _ = _run_session("shared_dealer_stream")
    for role in PARTIES:
        assert isinstance(reports[role]["result"], str), role  # a traceback: refused
        assert "SharedDealerStream" in reports[role]["result"], role


def test_a_forked_child_cannot_repeat_its_parents_stream():
    stream = StreamGenerator(new_seed())
    stream.ring_elements(4)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its copy of the stream must refuse to draw
        try:
            stream.ring_elements(4)
            os.write(write, b"drew")
        except InsecureRandomness:
            os.write(write, b"refused")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"refused"
    assert stream.ring_elements(4).shape == (4,)  # the parent's stream still draws


# -- the samplers refuse anything but a stream ----------------------------------------
def test_every_crypten_binding_is_patched():
    assert unpatched_modules() == []
    assert crypten._setup_prng is setup_crypto_prng
    for name in SAMPLER_MODULES:
        module = crypten
        for part in name.split(".")[1:]:
            module = getattr(module, part)
        for sampler in ("generate_random_ring_element", "generate_kbit_random_tensor"):
            if hasattr(module, sampler):
                assert getattr(module, sampler) is getattr(rng, sampler)
    assert rng.generate_random_ring_element is not ORIGINALS["generate_random_ring_element"]


@pytest.mark.parametrize("sampler", ["generate_random_ring_element",
                                     "generate_kbit_random_tensor"])
def test_samplers_refuse_torch_generators_and_missing_streams(sampler):
    draw = getattr(rng, sampler)
    with pytest.raises(InsecureRandomness, match="Generator"):
        draw((4,), generator=torch.Generator())
    with pytest.raises(InsecureRandomness, match="CPU only"):
        draw((4,), generator=StreamGenerator(new_seed()), device="cuda")
    set_strict_rng(True)
    try:
        with pytest.raises(InsecureRandomness, match="without naming its stream"):
            draw((4,))
    finally:
        set_strict_rng(False)
    assert draw((2, 3), generator=StreamGenerator(new_seed()), device="cpu").shape == (2, 3)


def test_stream_refuses_integer_seeds():
    with pytest.raises(InsecureRandomness):
        StreamGenerator(new_seed()).manual_seed(1234)
    with pytest.raises(InsecureRandomness):
        pickle.dumps(StreamGenerator(new_seed()))
    with pytest.raises(InsecureRandomness):
        rng.generate_random_ring_element((4,), ring_size=2**32,
                                         generator=StreamGenerator(new_seed()))
    # CrypTen's PRZS spreads a size into positional arguments: a second one would be
    # taken for a bit length (a 4-bit "mask"), so the samplers take no second one.
    with pytest.raises(TypeError):
        rng.generate_kbit_random_tensor(3, 4, generator=StreamGenerator(new_seed()))
    for bad in (1234, b"short", bytes(33), bytes(32), "00" * 32):
        with pytest.raises(MalformedInput):
            StreamGenerator(bad)


def test_dealer_seeds_are_32_bytes():
    from mpc.ss.dealer import DealerClient, _Tuples

    class OneMessage:
        def __init__(self, payload: bytes):
            self.payload = payload

        def recv(self, peer, kind, timeout=None):
            return self.payload

    with pytest.raises(MalformedInput):
        _Tuples([11, 22])  # the old 63-bit integer seeds
    with pytest.raises(MalformedInput):
        DealerClient(OneMessage(b'{"seed": 1234567}'), "dealer", 0)
    seed = new_seed()
    client = DealerClient(OneMessage(b'{"seed": "%s"}' % seed.hex().encode()), "dealer", 1)
    assert isinstance(client.get_generator(), StreamGenerator)
    assert torch.equal(client.get_generator().ring_elements(8),
                       StreamGenerator(seed).ring_elements(8))


class _PairComm:
    """Two CrypTen-style communicators joined by queues (isend/irecv/broadcast only)."""

    class _Done:
        def wait(self):
            return None

    def __init__(self, rank: int, boxes: dict):
        self.rank, self.boxes = rank, boxes

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return 2

    def isend(self, tensor, dst):
        self.boxes[(self.rank, dst)].put(tensor.clone())
        return self._Done()

    def irecv(self, tensor, src):
        tensor.copy_(self.boxes[(src, self.rank)].get(timeout=10))
        return self._Done()

    def broadcast(self, tensor, src):
        if self.rank == src:
            self.isend(tensor, 1 - src)
            return tensor
        self.irecv(tensor, src)
        return tensor


def test_seed_exchange_pairs_next_with_prev():
    boxes = {(0, 1): queue.Queue(), (1, 0): queue.Queue()}
    seeds: dict = {}
    threads = [threading.Thread(target=lambda r=r: seeds.__setitem__(
        r, exchange_seeds(_PairComm(r, boxes)))) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seeds[0]["next"] == seeds[1]["prev"] and seeds[1]["next"] == seeds[0]["prev"]
    assert seeds[0]["global"] == seeds[1]["global"]
    assert seeds[0]["local"] != seeds[1]["local"]
    assert seeds[0]["next"] != seeds[0]["prev"]
    assert all(len(s) == 32 for party in seeds.values() for s in party.values())


# -- 2. the operator's MT19937 attack ---------------------------------------------------
MASK32 = 0xFFFFFFFF


def _untemper(y: int) -> int:
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    x = y
    for _ in range(5):  # y ^= (y << 7) & 0x9D2C5680, undone 7 bits at a time
        x = y ^ ((x << 7) & 0x9D2C5680)
    y = x & MASK32
    x = y
    for _ in range(3):  # y ^= y >> 11, undone 11 bits at a time
        x = y ^ (x >> 11)
    return x & MASK32


class _MT19937Clone:
    """MT19937 rebuilt from 624 consecutive tempered outputs (any 624-word window)."""

    def __init__(self, outputs: list[int]):
        assert len(outputs) == 624
        self.mt = [_untemper(o) for o in outputs]
        self.index = 624

    def _twist(self) -> None:
        mt = self.mt
        for i in range(624):
            y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
            mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
        self.index = 0

    def next32(self) -> int:
        if self.index >= 624:
            self._twist()
        y = self.mt[self.index]
        self.index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y & MASK32


# torch's CPU `randint(-2**63, 2**63 - 1, dtype=int64)` (CrypTen's ring draw) takes
# random64() = (first MT output << 32) | second output, reduces it mod 2^64 - 1 (the
# identity but for one value in 2^64) and adds -2^63: element = u - 2^63.
def _torch_words(element: int) -> list[int]:
    u = element + 2**63
    return [u >> 32, u & MASK32]


def _torch_element(clone: _MT19937Clone) -> int:
    return ((clone.next32() << 32) | clone.next32()) - 2**63


def _memory_words(element: int) -> list[int]:  # the int64 as two little-endian 32-bit words
    u = element % 2**64
    return [u & MASK32, u >> 32]


def _memory_element(clone: _MT19937Clone) -> int:
    u = clone.next32() | (clone.next32() << 32)
    return u - 2**64 if u >= 2**63 else u


MAPPINGS = {"torch": (_torch_words, _torch_element), "memory": (_memory_words, _memory_element)}


def _predict(observed: list[int], n: int, mapping: str) -> tuple[list[int], int]:
    """Clone from the first 312 observed elements; (next n predicted, self-check hits)."""
    words_of, element_of = MAPPINGS[mapping]
    words = [w for e in observed[:312] for w in words_of(e)]
    clone = _MT19937Clone(words)
    check = [element_of(clone) for _ in observed[312:]]
    hits = sum(a == b for a, b in zip(check, observed[312:], strict=True))
    return [element_of(clone) for _ in range(n)], hits


def _operator_view(draw, regulator, operator, n: int = 100, k: int = 4) -> list[int]:
    """The regulator's dealer stream as the operator reads it off `valid * date`.

    The triple's `a` is drawn by each party from its dealer stream; opening
    eps = valid - a0 - a1 is public, and the operator knows `valid` (it planned the
    slots) and its own a0, so it reads a1 = valid - a0 - eps: n*k consecutive elements.
    """
    valid = torch.from_numpy((np.arange(n * k) % 3 != 0).reshape(n, k)).to(torch.int64)
    a1 = draw((n, k), generator=regulator)
    a0 = draw((n, k), generator=operator)
    eps = valid - a0 - a1  # opened (int64 wraps like the ring)
    return (valid - a0 - eps).flatten().tolist()


def _crypten_seeded_torch_generator() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(8), "big") - 2**63)  # as crypten._setup_prng
    return g


def test_mt19937_attack_predicts_crypten_old_torch_stream():
    draw = ORIGINALS["generate_random_ring_element"]  # CrypTen's own sampler
    regulator = _crypten_seeded_torch_generator()
    seen = _operator_view(draw, regulator, _crypten_seeded_torch_generator())
    assert len(seen) == 400
    predicted, hits = _predict(seen, 1000, "torch")
    assert hits == 88  # the clone reproduces the rest of what it saw
    actual = draw((1000,), generator=regulator).tolist()  # the regulator's next shares
    assert predicted == actual


@pytest.mark.parametrize("mapping", sorted(MAPPINGS))
@pytest.mark.parametrize("view", ["operator", "raw"])
def test_mt19937_attack_predicts_nothing_of_our_streams(view, mapping):
    draw = rng.generate_random_ring_element  # the patched sampler, as the session draws
    regulator = StreamGenerator(new_seed())
    if view == "operator":
        seen = _operator_view(draw, regulator, StreamGenerator(new_seed()))
    else:
        seen = draw((1248,), generator=regulator).tolist()
    predicted, hits = _predict(seen, 1000, mapping)
    actual = draw((1000,), generator=regulator).tolist()
    # a 64-bit element matches by chance with probability 2^-64
    assert hits == 0
    assert sum(p == a for p, a in zip(predicted, actual, strict=True)) == 0


# -- 3. known answers and uniformity ------------------------------------------------------
KEY = bytes(range(32))


def test_aes256_is_fips197():
    ecb = Cipher(algorithms.AES(KEY), modes.ECB()).encryptor()
    block = ecb.update(bytes.fromhex("00112233445566778899aabbccddeeff"))
    assert block.hex() == "8ea2b7ca516745bfeafc49904b496089"  # FIPS-197 appendix C.3


def test_stream_known_answer():
    n = 40
    ecb = Cipher(algorithms.AES(KEY), modes.ECB()).encryptor()
    keystream = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(n // 2))
    ctr = Cipher(algorithms.AES(KEY), modes.CTR(bytes(16))).encryptor()
    assert ctr.update(bytes(8 * n)) == keystream
    expected = [int.from_bytes(keystream[8 * i:8 * i + 8], "little", signed=True)
                for i in range(n)]
    assert expected[:4] == [-3413929544732602126, -9189824986115017815,
                            -1900596787321348624, 4410926500381718182]

    stream = StreamGenerator(KEY)
    got = stream.ring_elements(3).tolist() + stream.ring_elements((3, 5)).flatten().tolist()
    got += rng.generate_random_ring_element((22,), generator=stream).tolist()
    assert got == expected  # draws continue the one keystream
    assert stream.drawn == n

    bits = StreamGenerator(KEY)
    assert bits.kbit((n,), 1).tolist() == [e & 1 for e in expected]
    later = StreamGenerator(KEY).ring_elements(2 * n).tolist()[n:]
    assert bits.kbit((n,), 20).tolist() == [e & 0xFFFFF for e in later]  # the next n words
    whole = StreamGenerator(KEY)  # bitlength None or 64: full ring elements
    assert rng.generate_kbit_random_tensor((n,), generator=whole).tolist() == expected
    assert StreamGenerator(new_seed()).ring_elements(4).tolist() != expected[:4]


def test_stream_looks_uniform():
    n = 4096
    values = StreamGenerator(KEY).ring_elements(n).numpy()
    words = values.view(np.uint64)
    bits = ((words[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).astype(float)
    frequency = bits.mean(0)
    assert np.all(np.abs(frequency - 0.5) < 0.04)  # 5 sigma for 4096 draws, each bit
    for shift in (0, 30, 60):  # 16 buckets of 4 bits, low / middle / top
        counts = np.bincount(((words >> np.uint64(shift)) & np.uint64(15)).astype(np.int64),
                             minlength=16)
        chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum()
        assert chi2 < 40, (shift, chi2)  # 15 degrees of freedom: p ~ 5e-4
    assert len(np.unique(values)) == n
    assert (values < 0).mean() == pytest.approx(0.5, abs=0.04)
    one_bit = StreamGenerator(KEY).kbit(n, 1).numpy()
    assert set(np.unique(one_bit)) == {0, 1}
    assert one_bit.mean() == pytest.approx(0.5, abs=0.04)
