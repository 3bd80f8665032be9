"""Tolerances derived from the sampling distribution, not tuned by hand.

Every bound is a z-score: Z = 6 makes a false failure about one in 10^9 per check.
"""

from __future__ import annotations

import math

Z = 6.0


def binomial_bound(n: int, p: float, z: float = Z) -> float:
    """Half-width of a z-sigma interval for a Binomial(n, p) *fraction*."""
    return z * math.sqrt(max(p * (1.0 - p), 1e-12) / n)


def assert_fraction(observed: float, n: int, p: float, z: float = Z, what: str = "fraction"):
    bound = binomial_bound(n, p, z)
    assert abs(observed - p) <= bound, f"{what} {observed:.5f} vs expected {p:.5f} (+-{bound:.5f}, n={n})"


def assert_mean(observed: float, expected: float, std: float, n: int, z: float = Z, what: str = "mean"):
    """Sample mean of n iid draws with standard deviation ``std``."""
    bound = z * std / math.sqrt(n)
    assert abs(observed - expected) <= bound, f"{what} {observed:.5f} vs {expected:.5f} (+-{bound:.5f}, n={n})"
