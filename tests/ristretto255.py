"""RFC 9496 ristretto255 in pure Python, for the RFC 9497 known-answer vectors only.

PyNaCl's libsodium exports no ristretto255 functions, so the vectors' group is written out
here from RFC 9496 §4 (decode, encode, the edwards25519 group law in extended coordinates).
Slow and variable-time: test code, never used on secrets.
"""

from mpc.errors import MalformedInput

P = 2**255 - 19
ORDER = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, -1, P) % P
SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
INVSQRT_A_MINUS_D = 54469307008909316920995813868745141605393597292927456921205312896311721017578
BASE_X = 15112221349535400772501151409588531511454012693041857206046113283949847762202
BASE_Y = 4 * pow(5, -1, P) % P


def _negative(x: int) -> bool:
    return x % P % 2 == 1


def _abs(x: int) -> int:
    x %= P
    return P - x if _negative(x) else x


def _sqrt_ratio_m1(u: int, v: int) -> tuple[bool, int]:
    r = (u * pow(v, 3, P)) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    check = v * r * r % P
    correct = check == u % P
    flipped = check == -u % P
    flipped_i = check == -u * SQRT_M1 % P
    if flipped or flipped_i:
        r = r * SQRT_M1 % P
    return correct or flipped, _abs(r)


def _add(p1, p2):
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = t1 * 2 * D * t2 % P
    d = z1 * 2 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _decode(data: bytes):
    s = int.from_bytes(data, "little")
    if len(data) != 32 or s >= P or _negative(s):
        raise MalformedInput("not a canonical ristretto255 encoding")
    ss = s * s % P
    u1, u2 = (1 - ss) % P, (1 + ss) % P
    u2_sqr = u2 * u2 % P
    v = (-(D * u1 * u1) - u2_sqr) % P
    was_square, invsqrt = _sqrt_ratio_m1(1, v * u2_sqr % P)
    den_x = invsqrt * u2 % P
    den_y = invsqrt * den_x * v % P
    x = _abs(2 * s * den_x)
    y = u1 * den_y % P
    t = x * y % P
    if not was_square or _negative(t) or y == 0:
        raise MalformedInput("not a ristretto255 element")
    return x, y, 1, t


def _encode(point) -> bytes:
    x0, y0, z0, t0 = point
    u1 = (z0 + y0) * (z0 - y0) % P
    u2 = x0 * y0 % P
    _, invsqrt = _sqrt_ratio_m1(1, u1 * u2 * u2 % P)
    den1, den2 = invsqrt * u1 % P, invsqrt * u2 % P
    z_inv = den1 * den2 * t0 % P
    rotate = _negative(t0 * z_inv)
    x, y = (y0 * SQRT_M1 % P, x0 * SQRT_M1 % P) if rotate else (x0, y0)
    den_inv = den1 * INVSQRT_A_MINUS_D % P if rotate else den2
    if _negative(x * z_inv):
        y = -y % P
    return _abs(den_inv * (z0 - y)).to_bytes(32, "little")


class Ristretto255:
    """`mpc.voprf.PrimeOrderGroup` for ristretto255."""

    order = ORDER
    element_bytes = 32
    identity = bytes(32)
    generator = _encode((BASE_X, BASE_Y, 1, BASE_X * BASE_Y % P))

    def check(self, element: bytes) -> None:
        _decode(element)
        if element == self.identity:
            raise MalformedInput("the identity is not a valid input")

    def mul(self, scalar: int, element: bytes) -> bytes:
        point, acc = _decode(element), (0, 1, 1, 0)
        for bit in bin(scalar % ORDER)[2:]:
            acc = _add(acc, acc)
            if bit == "1":
                acc = _add(acc, point)
        return _encode(acc)

    def add(self, a: bytes, b: bytes) -> bytes:
        return _encode(_add(_decode(a), _decode(b)))
