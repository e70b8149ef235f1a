/*
 * Batch X25519 and Elligator 2 (x-only) on curve25519, for the PSI in mpc/psi.py.
 *
 * Two implementations of GF(2^255 - 19) share one representation: five limbs
 * in radix 2^51 (donna-c64 style).
 *
 *   portable  one element at a time, 64 x 64 -> 128-bit products;
 *   IFMA      eight independent elements in the eight 64-bit lanes of a zmm
 *             register, products by vpmadd52luq / vpmadd52huq (AVX-512 IFMA).
 *
 * IFMA multiplies the low 52 bits of its operands and drops the rest, so every
 * limb fed to a vector product must be < 2^52. Radix 2^51 leaves one bit of
 * slack: after a carry pass limbs are < 2^51 + 2^15 (bounds below). The 104-bit
 * product a_i * b_j = lo + 2^52 hi, and 2^52 = 2 * 2^51, so hi enters the next
 * limb doubled.
 *
 * The ladder is RFC 7748 section 5 (x-only Montgomery ladder, 255 steps,
 * clamped scalar). All lanes of a batch use the same scalar, so the conditional
 * swap mask is the same in every lane; it is built arithmetically from the
 * scalar bit (no branch, no secret-dependent address).
 *
 * Module functions (the buffers are packed 32-byte little-endian values):
 *   x25519_batch(scalar, us) / x25519_batch_portable(scalar, us) -> bytes
 *       Refuses u >= p (including any u with bit 255 set) and any u whose
 *       result is all zero (small order): raises ValueError(index, reason)
 *       for the first such index, in input order.
 *   elligator2_u_batch(fields) / elligator2_u_batch_portable(fields) -> bytes
 *       u-coordinate of RFC 9380 map_to_curve_elligator2 (curve25519, Z = 2),
 *       no cofactor clearing, canonical. Refuses a field element >= p with
 *       ValueError(index, reason).
 *   edwards_sign_batch(fields) -> bytes
 *       Each field element with bit 255 set to sgn0 of the x-coordinate of RFC 9380's
 *       map_to_curve_elligator2_edwards25519 (portable only): the input of libsodium's
 *       crypto_core_ed25519_from_uniform that yields the RFC's point, sign included.
 *   ifma_available() -> bool: whether the unsuffixed functions use IFMA.
 * The GIL is released while a batch is computed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_IFMA_CODE 1
#include <immintrin.h>
#else
#define HAVE_IFMA_CODE 0
#endif

/* The ladders run about 20% faster with their field operations inlined. */
#define INLINE __attribute__((always_inline)) inline

typedef uint64_t fe[5];
typedef unsigned __int128 u128;

#define MASK51 ((uint64_t)0x7ffffffffffff)
#define A_MONT 486662
#define A24 121665 /* (A - 2) / 4, RFC 7748 */

enum { OK = 0, NON_CANONICAL = 1, SMALL_ORDER = 2 };

/* ------------------------------------------------------------------ portable */

static uint64_t load64(const uint8_t *s) {
    uint64_t r;
    memcpy(&r, s, 8); /* x86-64 and every other target we build for is little-endian */
    return r;
}

static void store64(uint8_t *s, uint64_t v) { memcpy(s, &v, 8); }

/* Is the 32-byte little-endian value < p = 2^255 - 19? (bit 255 set means no) */
static int is_canonical(const uint8_t s[32]) {
    if (s[31] & 0x80) return 0;
    if (s[31] != 0x7f) return 1;
    for (int i = 30; i >= 1; i--)
        if (s[i] != 0xff) return 1;
    return s[0] < 0xed;
}

/* Limbs < 2^51; bit 255 is ignored (callers refuse it first). */
static void fe_frombytes(fe h, const uint8_t s[32]) {
    uint64_t w0 = load64(s), w1 = load64(s + 8), w2 = load64(s + 16), w3 = load64(s + 24);
    h[0] = w0 & MASK51;
    h[1] = ((w0 >> 51) | (w1 << 13)) & MASK51;
    h[2] = ((w1 >> 38) | (w2 << 26)) & MASK51;
    h[3] = ((w2 >> 25) | (w3 << 39)) & MASK51;
    h[4] = (w3 >> 12) & MASK51;
}

/* One carry pass with the 2^255 = 19 wrap; limbs in < 2^63 out < 2^51 (+19*2^12 in h[0]). */
static void fe_carry_full(fe h) {
    h[1] += h[0] >> 51; h[0] &= MASK51;
    h[2] += h[1] >> 51; h[1] &= MASK51;
    h[3] += h[2] >> 51; h[2] &= MASK51;
    h[4] += h[3] >> 51; h[3] &= MASK51;
    h[0] += 19 * (h[4] >> 51); h[4] &= MASK51;
}

/* Canonical value mod p (donna-c64's fcontract); input limbs < 2^54. */
static void fe_canonical(fe h) {
    fe_carry_full(h);
    fe_carry_full(h);
    /* now 0 <= h < 2^255 with limbs < 2^51: h >= p iff h + 19 >= 2^255 */
    h[0] += 19;
    fe_carry_full(h);
    /* h + 19 (mod 2^255, wrapped by 19 if it reached 2^255): add 2^255 - 19 and drop bit 255 */
    h[0] += (MASK51 + 1) - 19;
    h[1] += MASK51;
    h[2] += MASK51;
    h[3] += MASK51;
    h[4] += MASK51;
    h[1] += h[0] >> 51; h[0] &= MASK51;
    h[2] += h[1] >> 51; h[1] &= MASK51;
    h[3] += h[2] >> 51; h[2] &= MASK51;
    h[4] += h[3] >> 51; h[3] &= MASK51;
    h[4] &= MASK51;
}

static void fe_tobytes(uint8_t s[32], const fe f) {
    fe h;
    memcpy(h, f, sizeof(fe));
    fe_canonical(h);
    store64(s, h[0] | (h[1] << 51));
    store64(s + 8, (h[1] >> 13) | (h[2] << 38));
    store64(s + 16, (h[2] >> 26) | (h[3] << 25));
    store64(s + 24, (h[3] >> 39) | (h[4] << 12));
}

/*
 * Bounds (portable): products and squares return limbs < 2^51 except h[1] < 2^51 + 2^16;
 * fe_add of two such values < 2^53; fe_sub adds 2p (limbs 2^52 - 38, 2^52 - 2), valid for a
 * subtrahend with limbs < 2^52 - 38, result < 2^53. Multiplication inputs stay < 2^53:
 * each 128-bit column sum is < 5 * 2^53 * 19 * 2^53 < 2^113.
 */
static void fe_add(fe h, const fe f, const fe g) {
    for (int i = 0; i < 5; i++) h[i] = f[i] + g[i];
}

static void fe_sub(fe h, const fe f, const fe g) {
    h[0] = f[0] + 0xfffffffffffdaULL - g[0];
    for (int i = 1; i < 5; i++) h[i] = f[i] + 0xffffffffffffeULL - g[i];
}

static void fe_reduce128(fe h, u128 r0, u128 r1, u128 r2, u128 r3, u128 r4) {
    r1 += (uint64_t)(r0 >> 51);
    r2 += (uint64_t)(r1 >> 51);
    r3 += (uint64_t)(r2 >> 51);
    r4 += (uint64_t)(r3 >> 51);
    uint64_t c = (uint64_t)(r4 >> 51); /* < 2^63 */
    u128 t = (u128)((uint64_t)r0 & MASK51) + (u128)c * 19;
    h[0] = (uint64_t)t & MASK51;
    h[1] = ((uint64_t)r1 & MASK51) + (uint64_t)(t >> 51);
    h[2] = (uint64_t)r2 & MASK51;
    h[3] = (uint64_t)r3 & MASK51;
    h[4] = (uint64_t)r4 & MASK51;
}

static INLINE void fe_mul(fe h, const fe f, const fe g) {
    uint64_t f0 = f[0], f1 = f[1], f2 = f[2], f3 = f[3], f4 = f[4];
    uint64_t g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3], g4 = g[4];
    uint64_t g1_19 = 19 * g1, g2_19 = 19 * g2, g3_19 = 19 * g3, g4_19 = 19 * g4;
    u128 r0 = (u128)f0 * g0 + (u128)f1 * g4_19 + (u128)f2 * g3_19 + (u128)f3 * g2_19 +
              (u128)f4 * g1_19;
    u128 r1 = (u128)f0 * g1 + (u128)f1 * g0 + (u128)f2 * g4_19 + (u128)f3 * g3_19 +
              (u128)f4 * g2_19;
    u128 r2 = (u128)f0 * g2 + (u128)f1 * g1 + (u128)f2 * g0 + (u128)f3 * g4_19 +
              (u128)f4 * g3_19;
    u128 r3 = (u128)f0 * g3 + (u128)f1 * g2 + (u128)f2 * g1 + (u128)f3 * g0 +
              (u128)f4 * g4_19;
    u128 r4 = (u128)f0 * g4 + (u128)f1 * g3 + (u128)f2 * g2 + (u128)f3 * g1 + (u128)f4 * g0;
    fe_reduce128(h, r0, r1, r2, r3, r4);
}

static INLINE void fe_sq(fe h, const fe f) {
    uint64_t f0 = f[0], f1 = f[1], f2 = f[2], f3 = f[3], f4 = f[4];
    uint64_t d0 = 2 * f0, d1 = 2 * f1, d2_19 = 38 * f2, f3_19 = 19 * f3, f4_19 = 19 * f4,
             d4_19 = 2 * f4_19;
    u128 r0 = (u128)f0 * f0 + (u128)d4_19 * f1 + (u128)d2_19 * f3;
    u128 r1 = (u128)d0 * f1 + (u128)d4_19 * f2 + (u128)f3 * f3_19;
    u128 r2 = (u128)d0 * f2 + (u128)f1 * f1 + (u128)d4_19 * f3;
    u128 r3 = (u128)d0 * f3 + (u128)d1 * f2 + (u128)f4 * f4_19;
    u128 r4 = (u128)d0 * f4 + (u128)d1 * f3 + (u128)f2 * f2;
    fe_reduce128(h, r0, r1, r2, r3, r4);
}

static void fe_sqn(fe h, const fe f, int n) {
    fe_sq(h, f);
    while (--n > 0) fe_sq(h, h);
}

/* h = f * c + g for a small constant c (< 2^20). */
static INLINE void fe_mul_small_add(fe h, const fe f, uint64_t c, const fe g) {
    fe_reduce128(h, (u128)f[0] * c + g[0], (u128)f[1] * c + g[1], (u128)f[2] * c + g[2],
                 (u128)f[3] * c + g[3], (u128)f[4] * c + g[4]);
}

static void fe_cswap(fe f, fe g, uint64_t swap) {
    uint64_t mask = (uint64_t)0 - swap;
    for (int i = 0; i < 5; i++) {
        uint64_t t = mask & (f[i] ^ g[i]);
        f[i] ^= t;
        g[i] ^= t;
    }
}

/* z^(2^250 - 1) and z^11: the shared start of the inversion and (p-5)/8 chains (ref10). */
static void fe_pow_2_250_1(fe out, fe z11, const fe z) {
    fe z2, t, z9, z2_5_0, z2_10_0, z2_20_0, z2_50_0, z2_100_0;
    fe_sq(z2, z);
    fe_sqn(t, z2, 2);
    fe_mul(z9, t, z);
    fe_mul(z11, z9, z2);
    fe_sq(t, z11);
    fe_mul(z2_5_0, t, z9);
    fe_sqn(t, z2_5_0, 5);
    fe_mul(z2_10_0, t, z2_5_0);
    fe_sqn(t, z2_10_0, 10);
    fe_mul(z2_20_0, t, z2_10_0);
    fe_sqn(t, z2_20_0, 20);
    fe_mul(t, t, z2_20_0);
    fe_sqn(t, t, 10);
    fe_mul(z2_50_0, t, z2_10_0);
    fe_sqn(t, z2_50_0, 50);
    fe_mul(z2_100_0, t, z2_50_0);
    fe_sqn(t, z2_100_0, 100);
    fe_mul(t, t, z2_100_0);
    fe_sqn(t, t, 50);
    fe_mul(out, t, z2_50_0);
}

/* z^(p-2) = z^(2^255 - 21): 1/z, and 0 for z = 0 (RFC 9380 inv0). */
static void fe_invert(fe out, const fe z) {
    fe t, z11;
    fe_pow_2_250_1(t, z11, z);
    fe_sqn(t, t, 5);
    fe_mul(out, t, z11);
}

/* z^((p-1)/2) = (z^(2^252 - 3))^4 * z^2: 1, p - 1 or 0 (Euler's criterion). */
static void fe_legendre(fe out, const fe z) {
    fe t, z11, z2;
    fe_pow_2_250_1(t, z11, z);
    fe_sqn(t, t, 2);
    fe_mul(t, t, z); /* z^(2^252 - 3) */
    fe_sqn(t, t, 2);
    fe_sq(z2, z);
    fe_mul(out, t, z2);
}

static void clamp(uint8_t k[32], const uint8_t scalar[32]) {
    memcpy(k, scalar, 32);
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
}

static void x25519_one(uint8_t out[32], const uint8_t k[32], const uint8_t u[32]) {
    fe x1, x2 = {1}, z2 = {0}, x3, z3 = {1};
    fe a, aa, b, bb, e, c, d, da, cb, t;
    uint64_t swap = 0;
    fe_frombytes(x1, u);
    memcpy(x3, x1, sizeof(fe));
    for (int pos = 254; pos >= 0; pos--) {
        uint64_t bit = (k[pos >> 3] >> (pos & 7)) & 1;
        swap ^= bit;
        fe_cswap(x2, x3, swap);
        fe_cswap(z2, z3, swap);
        swap = bit;
        fe_add(a, x2, z2);
        fe_sq(aa, a);
        fe_sub(b, x2, z2);
        fe_sq(bb, b);
        fe_sub(e, aa, bb);
        fe_add(c, x3, z3);
        fe_sub(d, x3, z3);
        fe_mul(da, d, a);
        fe_mul(cb, c, b);
        fe_add(t, da, cb);
        fe_sq(x3, t);
        fe_sub(t, da, cb);
        fe_sq(t, t);
        fe_mul(z3, x1, t);
        fe_mul(x2, aa, bb);
        fe_mul_small_add(t, e, A24, aa);
        fe_mul(z2, e, t);
    }
    fe_cswap(x2, x3, swap);
    fe_cswap(z2, z3, swap);
    fe_invert(z2, z2);
    fe_mul(x2, x2, z2);
    fe_tobytes(out, x2);
}

/* RFC 9380 section 6.7.1 with J = A, K = 1, Z = 2, x only. */
static void elligator2_one(uint8_t out[32], const uint8_t field[32]) {
    static const fe zero = {0}, a = {A_MONT};
    fe t, d, x1, x2, gx, chi, minus_a;
    uint8_t buf[32];
    fe_frombytes(t, field);
    fe_sub(minus_a, zero, a);
    fe_sq(d, t);
    fe_add(d, d, d);
    d[0] += 1;                           /* 1 + Z t^2 */
    fe_invert(d, d);                     /* inv0 */
    fe_mul(x1, minus_a, d);              /* x1 = -A / (1 + Z t^2) */
    /* x1 == 0 needs 1 + 2t^2 == 0, impossible (-1/2 is not a square mod p); kept as in the RFC */
    fe_tobytes(buf, x1);
    uint8_t acc = 0;
    for (int i = 0; i < 32; i++) acc |= buf[i];
    if (acc == 0) fe_mul_small_add(x1, zero, 0, minus_a);
    fe_add(gx, x1, a);
    fe_mul(gx, gx, x1);
    gx[0] += 1;
    fe_mul(gx, gx, x1);                  /* gx1 = x1^3 + A x1^2 + x1 */
    fe_legendre(chi, gx);
    fe_tobytes(buf, chi);
    /* not a square iff chi == p - 1, bytes ec ff .. ff 7f */
    int nonsquare = buf[0] == 0xec && buf[31] == 0x7f;
    for (int i = 1; i < 31; i++) nonsquare &= buf[i] == 0xff;
    fe_sub(x2, minus_a, x1);
    fe_mul_small_add(x2, x2, 1, zero);   /* carried: x2 = -x1 - A */
    fe_cswap(x1, x2, (uint64_t)nonsquare);
    fe_tobytes(out, x1);
}


/*
 * RFC 9380 section 6.8.2 (map_to_curve_elligator2_edwards25519) decides the sign of the
 * edwards25519 x-coordinate: Montgomery y = sqrt(gx) with sgn0(y) = 1 on the x1 branch and
 * 0 on the x2 branch, then x = sqrt(-486664) * xM / yM (the root with sgn0 = 0). libsodium's
 * crypto_core_ed25519_from_uniform computes the same point up to that sign and takes the
 * sign from bit 255 of its input; this writes the field element with that bit set to
 * sgn0(x), so from_uniform returns RFC 9380's clear_cofactor(map_to_curve(u)) exactly.
 */
static const uint8_t SQRT_M1[32] = {
    0xb0, 0xa0, 0x0e, 0x4a, 0x27, 0x1b, 0xee, 0xc4, 0x78, 0xe4, 0x2f, 0xad, 0x06, 0x18, 0x43, 0x2f,
    0xa7, 0xd7, 0xfb, 0x3d, 0x99, 0x00, 0x4d, 0x2b, 0x0b, 0xdf, 0xc1, 0x4f, 0x80, 0x24, 0x83, 0x2b};
static const uint8_t SQRT_M486664[32] = {
    0x06, 0x7e, 0x45, 0xff, 0xaa, 0x04, 0x6e, 0xcc, 0x82, 0x1a, 0x7d, 0x4b, 0xd1, 0xd3, 0xa1, 0xc5,
    0x7e, 0x4f, 0xfc, 0x03, 0xdc, 0x08, 0x7b, 0xd2, 0xbb, 0x06, 0xa0, 0x60, 0xf4, 0xed, 0x26, 0x0f};

static int fe_equal(const fe f, const fe g) {
    uint8_t a[32], b[32];
    uint8_t diff = 0;
    fe_tobytes(a, f);
    fe_tobytes(b, g);
    for (int i = 0; i < 32; i++) diff |= a[i] ^ b[i];
    return diff == 0;
}

static int fe_is_zero(const fe f) {
    static const fe zero = {0};
    return fe_equal(f, zero);
}

static int fe_parity(const fe f) {
    uint8_t a[32];
    fe_tobytes(a, f);
    return a[0] & 1;
}

static void edwards_signed_one(uint8_t out[32], const uint8_t field[32]) {
    static const fe zero = {0}, a = {A_MONT};
    fe t, d, x1, x2, gx1, gx2, gx, chi, minus_a, y, y2, root, c1, xe, tmp, z11;
    uint8_t buf[32];
    fe_frombytes(t, field);
    fe_sub(minus_a, zero, a);
    fe_sq(d, t);
    fe_add(d, d, d);
    d[0] += 1;
    fe_invert(d, d);
    fe_mul(x1, minus_a, d);
    if (fe_is_zero(x1)) fe_mul_small_add(x1, zero, 0, minus_a);
    fe_add(gx1, x1, a);
    fe_mul(gx1, gx1, x1);
    gx1[0] += 1;
    fe_mul(gx1, gx1, x1);
    fe_legendre(chi, gx1);
    fe_tobytes(buf, chi);
    int nonsquare = buf[0] == 0xec && buf[31] == 0x7f;
    for (int i = 1; i < 31; i++) nonsquare &= buf[i] == 0xff;
    int square = nonsquare ^ 1;
    fe_sub(x2, minus_a, x1);
    fe_mul_small_add(x2, x2, 1, zero);
    fe_add(gx2, x2, a);
    fe_mul(gx2, gx2, x2);
    gx2[0] += 1;
    fe_mul(gx2, gx2, x2);
    /* branch-free selections: the field elements derive from a secret id's hash */
    fe_cswap(x1, x2, (uint64_t)(square ^ 1));
    fe_cswap(gx1, gx2, (uint64_t)(square ^ 1));
    const uint64_t *xm = x1;
    memcpy(gx, gx1, sizeof(fe));
    /* y = gx^((p+3)/8), times sqrt(-1) when that is not a root (p = 5 mod 8) */
    fe_pow_2_250_1(tmp, z11, gx);
    fe_sqn(tmp, tmp, 2);
    fe_mul(tmp, tmp, gx); /* gx^(2^252 - 3) */
    fe_mul(y, tmp, gx);
    fe_sq(y2, y);
    fe_frombytes(root, SQRT_M1);
    fe_mul(root, y, root);
    fe_cswap(y, root, (uint64_t)(fe_equal(y2, gx) ^ 1));
    int y_negated = fe_parity(y) ^ square; /* sgn0(y) = 1 exactly on the x1 branch */
    memcpy(out, field, 32);
    if (fe_is_zero(y)) return; /* RFC: x = 0 when yM = 0 */
    fe_invert(tmp, y);
    fe_frombytes(c1, SQRT_M486664);
    fe_mul(xe, c1, tmp);
    fe_mul(xe, xe, xm);
    fe d1;
    memcpy(d1, xm, sizeof(fe));
    d1[0] += 1;
    if (fe_is_zero(xe) || fe_is_zero(d1)) return; /* RFC: x = 0 when xM = -1 */
    out[31] |= (uint8_t)((fe_parity(xe) ^ y_negated) << 7);
}

static int edwards_signed_run(uint8_t *out, const uint8_t *fields, Py_ssize_t n,
                              Py_ssize_t *bad) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!is_canonical(fields + 32 * i)) {
            *bad = i;
            return NON_CANONICAL;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) edwards_signed_one(out + 32 * i, fields + 32 * i);
    return OK;
}

/* ------------------------------------------------------------------ IFMA, 8 lanes */

#if HAVE_IFMA_CODE
#define TGT __attribute__((target("avx512f,avx512vl,avx512ifma")))

typedef __m512i fe8[5];

/*
 * Bounds (IFMA): fe8_carry maps limbs < 2^61 to limbs < 2^51 + 2^10 (limb 0: < 2^51 + 2^15),
 * so every stored value has limbs < 2^52, the IFMA operand width. fe8_add / fe8_sub carry
 * their result (a sum of two such values may reach 2^52 + 2^16). fe8_sub adds 2p, whose
 * limbs 2^52 - 38 and 2^52 - 2 exceed any stored limb.
 */
TGT static INLINE void fe8_carry(fe8 h, const __m512i r0, const __m512i r1, const __m512i r2,
                                 const __m512i r3, const __m512i r4) {
    const __m512i m = _mm512_set1_epi64(MASK51);
    __m512i c0 = _mm512_srli_epi64(r0, 51), c1 = _mm512_srli_epi64(r1, 51);
    __m512i c2 = _mm512_srli_epi64(r2, 51), c3 = _mm512_srli_epi64(r3, 51);
    __m512i c4 = _mm512_srli_epi64(r4, 51); /* < 2^10 */
    h[0] = _mm512_madd52lo_epu64(_mm512_and_si512(r0, m), c4, _mm512_set1_epi64(19));
    h[1] = _mm512_add_epi64(_mm512_and_si512(r1, m), c0);
    h[2] = _mm512_add_epi64(_mm512_and_si512(r2, m), c1);
    h[3] = _mm512_add_epi64(_mm512_and_si512(r3, m), c2);
    h[4] = _mm512_add_epi64(_mm512_and_si512(r4, m), c3);
}

TGT static INLINE void fe8_add(fe8 h, const fe8 f, const fe8 g) {
    fe8_carry(h, _mm512_add_epi64(f[0], g[0]), _mm512_add_epi64(f[1], g[1]),
              _mm512_add_epi64(f[2], g[2]), _mm512_add_epi64(f[3], g[3]),
              _mm512_add_epi64(f[4], g[4]));
}

TGT static INLINE void fe8_sub(fe8 h, const fe8 f, const fe8 g) {
    const __m512i p0 = _mm512_set1_epi64(0xfffffffffffdaLL);
    const __m512i p1 = _mm512_set1_epi64(0xffffffffffffeLL);
    fe8_carry(h, _mm512_sub_epi64(_mm512_add_epi64(f[0], p0), g[0]),
              _mm512_sub_epi64(_mm512_add_epi64(f[1], p1), g[1]),
              _mm512_sub_epi64(_mm512_add_epi64(f[2], p1), g[2]),
              _mm512_sub_epi64(_mm512_add_epi64(f[3], p1), g[3]),
              _mm512_sub_epi64(_mm512_add_epi64(f[4], p1), g[4]));
}

TGT static INLINE __m512i times19(__m512i x) {
    /* x < 2^56: 19x = 16x + 2x + x < 2^61, exact in 64 bits */
    __m512i x3 = _mm512_add_epi64(x, _mm512_slli_epi64(x, 1));
    return _mm512_add_epi64(x3, _mm512_slli_epi64(x, 4));
}

/*
 * Products in radix 2^51: with lo(i, j), hi(i, j) the low and high 52 bits of f_i g_j,
 *   f g = sum_k (L_k + 2 H_{k-1}) 2^(51k),  L_k = sum_{i+j=k} lo(i, j),  H_k = sum_{i+j=k} hi(i, j),
 * k = 0..9, and 2^255 = 19 (mod p) folds column k + 5 into column k:
 *   r_k = L_k + 2 H_{k-1} + 19 (L_{k+5} + 2 H_{k+4}).
 * Each L, H sums at most 5 terms < 2^52, so r_k < 15 * 2^52 * 20 < 2^61 (fe8_carry's range).
 * Columns k and k + 5 are computed together, which keeps few registers live (no spills).
 */
TGT static INLINE void fe8_mul(fe8 h, const fe8 f, const fe8 g) {
    const __m512i zero = _mm512_setzero_si512();
    __m512i r[5];
#pragma GCC unroll 5
    for (int k = 0; k < 5; k++) {
        __m512i lo = zero, hi = zero, lo5 = zero, hi5 = zero; /* L_k, H_{k-1}, L_{k+5}, H_{k+4} */
#pragma GCC unroll 5
        for (int i = 0; i < 5; i++) {
            int j = k - i;
            if (j >= 0) {
                lo = _mm512_madd52lo_epu64(lo, f[i], g[j]);
            } else {
                lo5 = _mm512_madd52lo_epu64(lo5, f[i], g[j + 5]);
            }
            j = k - 1 - i;
            if (j >= 0) {
                hi = _mm512_madd52hi_epu64(hi, f[i], g[j]);
            } else if (j + 5 < 5) {
                hi5 = _mm512_madd52hi_epu64(hi5, f[i], g[j + 5]);
            }
        }
        __m512i low = _mm512_add_epi64(lo, _mm512_slli_epi64(hi, 1));
        __m512i high = _mm512_add_epi64(lo5, _mm512_slli_epi64(hi5, 1));
        r[k] = _mm512_add_epi64(low, times19(high));
    }
    fe8_carry(h, r[0], r[1], r[2], r[3], r[4]);
}

TGT static INLINE void fe8_sq(fe8 h, const fe8 f) {
    /* fe8_mul's columns, with each cross product computed once and doubled by a shift */
    const __m512i zero = _mm512_setzero_si512();
    __m512i r[5];
#pragma GCC unroll 5
    for (int k = 0; k < 5; k++) {
        __m512i lo = zero, hi = zero, lo5 = zero, hi5 = zero, dlo = zero, dhi = zero, dlo5 = zero,
                dhi5 = zero; /* cross terms, then the squares f_i^2 */
#pragma GCC unroll 5
        for (int i = 0; i < 5; i++) {
#pragma GCC unroll 5
            for (int j = i; j < 5; j++) {
                int cross = j > i;
                if (i + j == k) {
                    if (cross) lo = _mm512_madd52lo_epu64(lo, f[i], f[j]);
                    else dlo = _mm512_madd52lo_epu64(dlo, f[i], f[j]);
                }
                if (i + j == k + 5) {
                    if (cross) lo5 = _mm512_madd52lo_epu64(lo5, f[i], f[j]);
                    else dlo5 = _mm512_madd52lo_epu64(dlo5, f[i], f[j]);
                }
                if (i + j == k - 1) {
                    if (cross) hi = _mm512_madd52hi_epu64(hi, f[i], f[j]);
                    else dhi = _mm512_madd52hi_epu64(dhi, f[i], f[j]);
                }
                if (i + j == k + 4) {
                    if (cross) hi5 = _mm512_madd52hi_epu64(hi5, f[i], f[j]);
                    else dhi5 = _mm512_madd52hi_epu64(dhi5, f[i], f[j]);
                }
            }
        }
        /* 2 * cross + square for L; H enters doubled: 4 * cross + 2 * square */
        __m512i low = _mm512_add_epi64(_mm512_add_epi64(_mm512_slli_epi64(lo, 1), dlo),
                                       _mm512_add_epi64(_mm512_slli_epi64(hi, 2),
                                                        _mm512_slli_epi64(dhi, 1)));
        __m512i high = _mm512_add_epi64(_mm512_add_epi64(_mm512_slli_epi64(lo5, 1), dlo5),
                                        _mm512_add_epi64(_mm512_slli_epi64(hi5, 2),
                                                         _mm512_slli_epi64(dhi5, 1)));
        r[k] = _mm512_add_epi64(low, times19(high));
    }
    fe8_carry(h, r[0], r[1], r[2], r[3], r[4]);
}

TGT static void fe8_sqn(fe8 h, const fe8 f, int n) {
    fe8_sq(h, f);
    while (--n > 0) fe8_sq(h, h);
}

/* h = f * c + g for a constant c < 2^20: lo52 and hi52 of each f_i * c, as in fe8_fold */
TGT static INLINE void fe8_mul_small_add(fe8 h, const fe8 f, uint64_t c, const fe8 g) {
    const __m512i vc = _mm512_set1_epi64((long long)c), zero = _mm512_setzero_si512();
    __m512i lo[5], hi[5];
    for (int i = 0; i < 5; i++) {
        lo[i] = _mm512_madd52lo_epu64(g[i], f[i], vc);
        hi[i] = _mm512_slli_epi64(_mm512_madd52hi_epu64(zero, f[i], vc), 1); /* < 2^21 */
    }
    fe8_carry(h, _mm512_madd52lo_epu64(lo[0], hi[4], _mm512_set1_epi64(19)),
              _mm512_add_epi64(lo[1], hi[0]), _mm512_add_epi64(lo[2], hi[1]),
              _mm512_add_epi64(lo[3], hi[2]), _mm512_add_epi64(lo[4], hi[3]));
}

TGT static INLINE void fe8_cswap(fe8 f, fe8 g, __m512i mask) {
    for (int i = 0; i < 5; i++) {
        __m512i t = _mm512_and_si512(mask, _mm512_xor_si512(f[i], g[i]));
        f[i] = _mm512_xor_si512(f[i], t);
        g[i] = _mm512_xor_si512(g[i], t);
    }
}

TGT static void fe8_pow_2_250_1(fe8 out, fe8 z11, const fe8 z) {
    fe8 z2, t, z9, z2_5_0, z2_10_0, z2_20_0, z2_50_0, z2_100_0;
    fe8_sq(z2, z);
    fe8_sqn(t, z2, 2);
    fe8_mul(z9, t, z);
    fe8_mul(z11, z9, z2);
    fe8_sq(t, z11);
    fe8_mul(z2_5_0, t, z9);
    fe8_sqn(t, z2_5_0, 5);
    fe8_mul(z2_10_0, t, z2_5_0);
    fe8_sqn(t, z2_10_0, 10);
    fe8_mul(z2_20_0, t, z2_10_0);
    fe8_sqn(t, z2_20_0, 20);
    fe8_mul(t, t, z2_20_0);
    fe8_sqn(t, t, 10);
    fe8_mul(z2_50_0, t, z2_10_0);
    fe8_sqn(t, z2_50_0, 50);
    fe8_mul(z2_100_0, t, z2_50_0);
    fe8_sqn(t, z2_100_0, 100);
    fe8_mul(t, t, z2_100_0);
    fe8_sqn(t, t, 50);
    fe8_mul(out, t, z2_50_0);
}

TGT static void fe8_invert(fe8 out, const fe8 z) {
    fe8 t, z11;
    fe8_pow_2_250_1(t, z11, z);
    fe8_sqn(t, t, 5);
    fe8_mul(out, t, z11);
}

TGT static void fe8_legendre(fe8 out, const fe8 z) {
    fe8 t, z11, z2;
    fe8_pow_2_250_1(t, z11, z);
    fe8_sqn(t, t, 2);
    fe8_mul(t, t, z);
    fe8_sqn(t, t, 2);
    fe8_sq(z2, z);
    fe8_mul(out, t, z2);
}

/* Lanes <-> vectors: the lane values are converted with the portable code. */
TGT static void fe8_load(fe8 h, const uint8_t *src, size_t lanes) {
    uint64_t limbs[5][8];
    fe t;
    for (size_t l = 0; l < 8; l++) {
        fe_frombytes(t, src + 32 * (l < lanes ? l : lanes - 1)); /* pad with the last lane */
        for (int i = 0; i < 5; i++) limbs[i][l] = t[i];
    }
    for (int i = 0; i < 5; i++) h[i] = _mm512_loadu_si512(limbs[i]);
}

TGT static void fe8_store(uint8_t *dst, const fe8 f, size_t lanes) {
    uint64_t limbs[5][8];
    fe t;
    for (int i = 0; i < 5; i++) _mm512_storeu_si512(limbs[i], f[i]);
    for (size_t l = 0; l < lanes; l++) {
        for (int i = 0; i < 5; i++) t[i] = limbs[i][l];
        fe_tobytes(dst + 32 * l, t);
    }
}

TGT static void fe8_const(fe8 h, uint64_t c) {
    h[0] = _mm512_set1_epi64((long long)c);
    for (int i = 1; i < 5; i++) h[i] = _mm512_setzero_si512();
}

/* Canonical limbs (the portable fe_canonical, lane-wise). */
TGT static void fe8_canonical(fe8 h) {
    const __m512i m = _mm512_set1_epi64(MASK51), n19 = _mm512_set1_epi64(19);
    for (int pass = 0; pass < 3; pass++) {
        if (pass == 2) h[0] = _mm512_add_epi64(h[0], n19);
        for (int i = 0; i < 4; i++) {
            h[i + 1] = _mm512_add_epi64(h[i + 1], _mm512_srli_epi64(h[i], 51));
            h[i] = _mm512_and_si512(h[i], m);
        }
        h[0] = _mm512_madd52lo_epu64(h[0], _mm512_srli_epi64(h[4], 51), n19);
        h[4] = _mm512_and_si512(h[4], m);
    }
    h[0] = _mm512_add_epi64(h[0], _mm512_set1_epi64((long long)(MASK51 + 1 - 19)));
    for (int i = 1; i < 5; i++) h[i] = _mm512_add_epi64(h[i], m);
    for (int i = 0; i < 4; i++) {
        h[i + 1] = _mm512_add_epi64(h[i + 1], _mm512_srli_epi64(h[i], 51));
        h[i] = _mm512_and_si512(h[i], m);
    }
    h[4] = _mm512_and_si512(h[4], m);
}

/* Lanes where the canonical f equals the canonical constant c (limbs given). */
TGT static __mmask8 fe8_equals(const fe8 f, const uint64_t c[5]) {
    fe8 t;
    for (int i = 0; i < 5; i++) t[i] = f[i];
    fe8_canonical(t);
    __mmask8 eq = 0xff;
    for (int i = 0; i < 5; i++)
        eq &= _mm512_cmpeq_epi64_mask(t[i], _mm512_set1_epi64((long long)c[i]));
    return eq;
}

TGT static void fe8_select(fe8 h, __mmask8 take_g, const fe8 f, const fe8 g) {
    for (int i = 0; i < 5; i++) h[i] = _mm512_mask_blend_epi64(take_g, f[i], g[i]);
}

TGT static void x25519_8(uint8_t *out, const uint8_t k[32], const uint8_t *us, size_t lanes) {
    fe8 x1, x2, z2, x3, z3, a, aa, b, bb, e, c, d, da, cb, t;
    uint64_t swap = 0;
    fe8_load(x1, us, lanes);
    fe8_const(x2, 1);
    fe8_const(z2, 0);
    fe8_const(z3, 1);
    for (int i = 0; i < 5; i++) x3[i] = x1[i];
    for (int pos = 254; pos >= 0; pos--) {
        uint64_t bit = (k[pos >> 3] >> (pos & 7)) & 1;
        swap ^= bit;
        __m512i mask = _mm512_set1_epi64((long long)((uint64_t)0 - swap));
        fe8_cswap(x2, x3, mask);
        fe8_cswap(z2, z3, mask);
        swap = bit;
        fe8_add(a, x2, z2);
        fe8_sq(aa, a);
        fe8_sub(b, x2, z2);
        fe8_sq(bb, b);
        fe8_sub(e, aa, bb);
        fe8_add(c, x3, z3);
        fe8_sub(d, x3, z3);
        fe8_mul(da, d, a);
        fe8_mul(cb, c, b);
        fe8_add(t, da, cb);
        fe8_sq(x3, t);
        fe8_sub(t, da, cb);
        fe8_sq(t, t);
        fe8_mul(z3, x1, t);
        fe8_mul(x2, aa, bb);
        fe8_mul_small_add(t, e, A24, aa);
        fe8_mul(z2, e, t);
    }
    __m512i mask = _mm512_set1_epi64((long long)((uint64_t)0 - swap));
    fe8_cswap(x2, x3, mask);
    fe8_cswap(z2, z3, mask);
    fe8_invert(z2, z2);
    fe8_mul(x2, x2, z2);
    fe8_store(out, x2, lanes);
}

TGT static void elligator2_8(uint8_t *out, const uint8_t *fields, size_t lanes) {
    static const uint64_t zero_limbs[5] = {0, 0, 0, 0, 0};
    static const uint64_t p_minus_1[5] = {MASK51 - 19, MASK51, MASK51, MASK51, MASK51};
    fe8 t, d, x1, x2, gx, chi, minus_a, a, one, zero;
    fe8_load(t, fields, lanes);
    fe8_const(one, 1);
    fe8_const(zero, 0);
    fe8_const(a, A_MONT);
    fe8_sub(minus_a, zero, a);
    fe8_sq(d, t);
    fe8_add(d, d, d);
    fe8_add(d, d, one);
    fe8_invert(d, d);
    fe8_mul(x1, minus_a, d);
    fe8_select(x1, fe8_equals(x1, zero_limbs), x1, minus_a);
    fe8_add(gx, x1, a);
    fe8_mul(gx, gx, x1);
    fe8_add(gx, gx, one);
    fe8_mul(gx, gx, x1);
    fe8_legendre(chi, gx);
    fe8_sub(x2, minus_a, x1);
    fe8_select(x1, fe8_equals(chi, p_minus_1), x1, x2);
    fe8_store(out, x1, lanes);
}
#endif /* HAVE_IFMA_CODE */

static int use_ifma = 0;

static void detect_ifma(void) {
#if HAVE_IFMA_CODE
    __builtin_cpu_init();
    use_ifma = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512ifma");
#endif
}

/* ------------------------------------------------------------------ batch drivers */

/* Returns OK, or the reason for *bad (the first refused index in input order). */
static int x25519_run(uint8_t *out, const uint8_t scalar[32], const uint8_t *us, Py_ssize_t n,
                      int ifma, Py_ssize_t *bad) {
    uint8_t k[32];
    Py_ssize_t limit = n;
    int reason = OK;
    clamp(k, scalar);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!is_canonical(us + 32 * i)) {
            limit = i;
            reason = NON_CANONICAL;
            break;
        }
    }
    Py_ssize_t i = 0;
#if HAVE_IFMA_CODE
    if (ifma) {
        for (; i < limit; i += 8) {
            size_t lanes = (size_t)(limit - i < 8 ? limit - i : 8);
            x25519_8(out + 32 * i, k, us + 32 * i, lanes);
        }
    }
#else
    (void)ifma;
#endif
    for (; i < limit; i++) x25519_one(out + 32 * i, k, us + 32 * i);
    memset(k, 0, sizeof k);
    for (i = 0; i < limit; i++) {
        uint8_t acc = 0;
        for (int j = 0; j < 32; j++) acc |= out[32 * i + j];
        if (acc == 0) {
            *bad = i;
            return SMALL_ORDER;
        }
    }
    *bad = limit;
    return reason;
}

static int elligator2_run(uint8_t *out, const uint8_t *fields, Py_ssize_t n, int ifma,
                          Py_ssize_t *bad) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!is_canonical(fields + 32 * i)) {
            *bad = i;
            return NON_CANONICAL;
        }
    }
    Py_ssize_t i = 0;
#if HAVE_IFMA_CODE
    if (ifma) {
        for (; i < n; i += 8) {
            size_t lanes = (size_t)(n - i < 8 ? n - i : 8);
            elligator2_8(out + 32 * i, fields + 32 * i, lanes);
        }
    }
#else
    (void)ifma;
#endif
    for (; i < n; i++) elligator2_one(out + 32 * i, fields + 32 * i);
    return OK;
}

/* ------------------------------------------------------------------ Python glue */

static PyObject *refuse(int reason, Py_ssize_t index) {
    const char *what = reason == NON_CANONICAL ? "non-canonical u-coordinate" : "small-order point";
    PyObject *args = Py_BuildValue("(ns)", index, what);
    if (args != NULL) {
        PyErr_SetObject(PyExc_ValueError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *batch_x25519(PyObject *args, int ifma) {
    Py_buffer scalar, us;
    if (!PyArg_ParseTuple(args, "y*y*", &scalar, &us)) return NULL;
    PyObject *result = NULL;
    if (scalar.len != 32) {
        PyErr_SetString(PyExc_ValueError, "scalar must be 32 bytes");
    } else if (us.len % 32) {
        PyErr_Format(PyExc_ValueError, "packed length %zd is not a multiple of 32", us.len);
    } else if ((result = PyBytes_FromStringAndSize(NULL, us.len)) != NULL) {
        uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
        Py_ssize_t bad = 0;
        int reason;
        Py_BEGIN_ALLOW_THREADS
        reason = x25519_run(out, scalar.buf, us.buf, us.len / 32, ifma, &bad);
        Py_END_ALLOW_THREADS
        if (reason != OK) {
            Py_CLEAR(result);
            refuse(reason, bad);
        }
    }
    PyBuffer_Release(&scalar);
    PyBuffer_Release(&us);
    return result;
}

typedef int (*field_runner)(uint8_t *, const uint8_t *, Py_ssize_t, int, Py_ssize_t *);

static int edwards_signed_runner(uint8_t *out, const uint8_t *fields, Py_ssize_t n, int ifma,
                                 Py_ssize_t *bad) {
    (void)ifma;
    return edwards_signed_run(out, fields, n, bad);
}

static PyObject *batch_fields(PyObject *args, int ifma, field_runner run) {
    Py_buffer fields;
    if (!PyArg_ParseTuple(args, "y*", &fields)) return NULL;
    PyObject *result = NULL;
    if (fields.len % 32) {
        PyErr_Format(PyExc_ValueError, "packed length %zd is not a multiple of 32", fields.len);
    } else if ((result = PyBytes_FromStringAndSize(NULL, fields.len)) != NULL) {
        uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
        Py_ssize_t bad = 0;
        int reason;
        Py_BEGIN_ALLOW_THREADS
        reason = run(out, fields.buf, fields.len / 32, ifma, &bad);
        Py_END_ALLOW_THREADS
        if (reason != OK) {
            Py_CLEAR(result);
            PyObject *err = Py_BuildValue("(ns)", bad, "field element not below p");
            if (err != NULL) {
                PyErr_SetObject(PyExc_ValueError, err);
                Py_DECREF(err);
            }
        }
    }
    PyBuffer_Release(&fields);
    return result;
}

static PyObject *py_x25519_batch(PyObject *self, PyObject *args) {
    (void)self;
    return batch_x25519(args, use_ifma);
}

static PyObject *py_x25519_batch_portable(PyObject *self, PyObject *args) {
    (void)self;
    return batch_x25519(args, 0);
}

static PyObject *py_elligator2_u_batch(PyObject *self, PyObject *args) {
    (void)self;
    return batch_fields(args, use_ifma, elligator2_run);
}

static PyObject *py_elligator2_u_batch_portable(PyObject *self, PyObject *args) {
    (void)self;
    return batch_fields(args, 0, elligator2_run);
}

static PyObject *py_edwards_sign_batch(PyObject *self, PyObject *args) {
    (void)self;
    return batch_fields(args, 0, edwards_signed_runner);
}

static PyObject *py_ifma_available(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(use_ifma);
}

static PyMethodDef methods[] = {
    {"x25519_batch", py_x25519_batch, METH_VARARGS,
     "x25519_batch(scalar, us) -> bytes: X25519 of one scalar with each packed u-coordinate."},
    {"x25519_batch_portable", py_x25519_batch_portable, METH_VARARGS,
     "x25519_batch on the portable path, whatever the CPU."},
    {"elligator2_u_batch", py_elligator2_u_batch, METH_VARARGS,
     "elligator2_u_batch(fields) -> bytes: RFC 9380 Elligator 2 u-coordinate, no cofactor "
     "clearing."},
    {"elligator2_u_batch_portable", py_elligator2_u_batch_portable, METH_VARARGS,
     "elligator2_u_batch on the portable path, whatever the CPU."},
    {"edwards_sign_batch", py_edwards_sign_batch, METH_VARARGS,
     "edwards_sign_batch(fields) -> bytes: each field element with bit 255 set to the sign "
     "of RFC 9380's edwards25519 Elligator 2 x-coordinate (libsodium from_uniform input)."},
    {"ifma_available", py_ifma_available, METH_NOARGS,
     "Whether x25519_batch and elligator2_u_batch use the AVX-512 IFMA path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mpc.hazmat._x25519",
    "Batch X25519 and Elligator 2 on curve25519 (portable and AVX-512 IFMA).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__x25519(void) {
    detect_ifma();
    return PyModule_Create(&module);
}
