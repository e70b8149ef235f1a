"""The discrete Laplace sampler (CKS 2020) against its exact distribution."""

import math
from collections import Counter
from fractions import Fraction

import pytest

from parties.stats.noise import bernoulli_exp, discrete_laplace, noised

DRAWS = 20_000


def test_bernoulli_exp_frequency_matches_exp_minus_gamma():
    for gamma in (Fraction(1, 3), Fraction(1), Fraction(5, 2)):
        hits = sum(bernoulli_exp(gamma) for _ in range(DRAWS))
        p = math.exp(-gamma)
        sigma = math.sqrt(p * (1 - p) / DRAWS)
        assert abs(hits / DRAWS - p) < 6 * sigma


@pytest.mark.parametrize(("t", "s"), [(1, 1), (3, 2), (1000, 1000)])
def test_discrete_laplace_matches_its_probability_mass(t, s):
    counts = Counter(discrete_laplace(t, s) for _ in range(DRAWS))
    rate = s / t  # P[x] = (1 - e^-rate) / (1 + e^-rate) * e^(-rate |x|)
    norm = (1 - math.exp(-rate)) / (1 + math.exp(-rate))
    for x in (-2, -1, 0, 1, 2):
        p = norm * math.exp(-rate * abs(x))
        sigma = math.sqrt(p * (1 - p) / DRAWS)
        assert abs(counts[x] / DRAWS - p) < 6 * sigma, x


def test_noise_scale_follows_sensitivity_over_epsilon():
    # scale 1000 / (1/2) = 2000: the mean absolute noise is about 2000, never 0 or 1.
    draws = [noised(0, 1000, Fraction(1, 2)) for _ in range(4000)]
    rate = 1 / 2000
    expected = 2 * math.exp(-rate) / ((1 - math.exp(-rate)) * (1 + math.exp(-rate)))
    assert abs(sum(abs(d) for d in draws) / len(draws) - expected) < 0.1 * expected
    assert len(set(draws)) > 1000


def test_sampler_refuses_bad_parameters():
    with pytest.raises(ValueError):
        discrete_laplace(0, 1)
    with pytest.raises(ValueError):
        bernoulli_exp(Fraction(-1))


def test_one_person_does_not_flip_a_refusal_into_a_release():
    """rev15b's attack: with the minimum group size on the true size, a group of 9 was
    always refused and one of 10 always released, so one person's visit showed through.
    On the noised count both sizes are refused and released, at rates within e^ε of each
    other (ε of the count = 1 here)."""
    from parties.stats.api import MIN_GROUP_SIZE, StatisticNotReleased
    from parties.stats.operator import noised_release

    def release_rate(size: int) -> float:
        released = 0
        for _ in range(4000):
            try:
                noised_release([5] * size, 10, Fraction(1))
                released += 1
            except StatisticNotReleased:
                pass
        return released / 4000

    below, at = release_rate(MIN_GROUP_SIZE - 1), release_rate(MIN_GROUP_SIZE)
    assert 0 < below < at < 1
    assert at / below < math.e * 1.2 and (1 - below) / (1 - at) < math.e * 1.2
