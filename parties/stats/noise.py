"""Exact discrete Laplace noise from `secrets`, for statistics released under ε-DP.

The samplers of Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential
Privacy" (NeurIPS 2020, arXiv:2004.00010): Algorithm 1 draws Bernoulli(exp(-γ)) and
Algorithm 2 the discrete Laplace distribution, P[x] ∝ exp(-|x|·s/t) over the integers,
both with rational arithmetic and uniform integers only, so no floating point rounding
shapes the noise (the attacks of Mironov 2012 on floating-point Laplace do not apply).
An integer query of sensitivity Δ released with `discrete_laplace(Δ·q, p)` for ε = p/q
is ε-differentially private.
"""

import secrets
from fractions import Fraction


def _bernoulli(p: Fraction) -> bool:
    return secrets.randbelow(p.denominator) < p.numerator


def bernoulli_exp(gamma: Fraction) -> bool:
    """Bernoulli(exp(-γ)) for a rational γ ≥ 0 (CKS 2020, Algorithm 1)."""
    if gamma < 0:
        raise ValueError("gamma must be non-negative")
    while gamma > 1:  # exp(-γ) = exp(-1)^⌊γ⌋ · exp(-(γ - ⌊γ⌋))
        if not bernoulli_exp(Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(gamma / k):
        k += 1
    return k % 2 == 1


def discrete_laplace(t: int, s: int) -> int:
    """One draw with P[x] ∝ exp(-|x|·s/t), t and s positive integers (CKS 2020, Algorithm 2)."""
    if t < 1 or s < 1:
        raise ValueError("t and s are positive integers")
    while True:
        u = secrets.randbelow(t)
        if not bernoulli_exp(Fraction(u, t)):
            continue
        v = 0
        while bernoulli_exp(Fraction(1)):
            v += 1
        y = (u + t * v) // s
        negative = secrets.randbelow(2) == 1
        if negative and y == 0:
            continue
        return -y if negative else y


def noised(value: int, sensitivity: int, epsilon: Fraction) -> int:
    """`value` plus discrete Laplace noise of scale sensitivity/ε: ε-DP for that sensitivity."""
    return value + discrete_laplace(sensitivity * epsilon.denominator, epsilon.numerator)
