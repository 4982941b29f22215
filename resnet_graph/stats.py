"""Small statistics for the experiment report: Student's t quantile and the paired
difference with its confidence interval. Pure Python (no SciPy in the install).

The t quantile inverts the t distribution's CDF, which is a regularised
incomplete beta function: ``P(|T| > t) = I_x(df / 2, 1 / 2)`` with
``x = df / (df + t^2)``. The incomplete beta is evaluated by its continued
fraction (modified Lentz), and the quantile found by bisection, to about 1e-10.
"""

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

RESOLVED_LEVEL = 0.95
# An interval narrower than this (in the differences' unit: fractions of accuracy, where one
# test image is 1e-4) comes from differences equal up to float rounding, not from seeds.
NO_SPREAD = 1e-9


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = ``level`` (e.g. 0.95 -> 2.262 for df 9)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 1.0 - level:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_two_sided_p(mid, df) > 1.0 - level:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(hi, 1.0):
            break
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over the shared seeds, with its ``level`` t interval.

    With one seed there is no spread, so ``low``/``high`` are None and
    :attr:`resolved` is False: the report says "one seed: not resolved".
    """

    seeds: tuple
    mean: float
    low: Optional[float]
    high: Optional[float]
    level: float = RESOLVED_LEVEL

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def degenerate(self) -> bool:
        """Several seeds, every difference the same: the interval has no width, which
        says the seeds changed nothing (identical runs), not that the difference is sure."""
        return no_spread(self.low, self.high)

    @property
    def resolved(self) -> bool:
        """The interval excludes zero (and has a width)."""
        return (self.low is not None and not self.degenerate
                and (self.low > 0.0 or self.high < 0.0))

    def verdict(self) -> str:
        if self.n < 2:
            return "one seed: not resolved"
        if self.degenerate:
            return "no spread over the seeds (identical differences): not resolved"
        if self.resolved:
            return f"resolved ({int(round(100 * self.level))}% interval excludes 0)"
        return f"not resolved ({int(round(100 * self.level))}% interval includes 0)"


def no_spread(low: Optional[float], high: Optional[float]) -> bool:
    """Whether an interval [low, high] has no width (up to float rounding): the
    differences were all the same. False without an interval (one seed)."""
    return low is not None and high - low <= NO_SPREAD


def paired_difference(a: dict, b: dict, level: float = RESOLVED_LEVEL) -> Optional[PairedDifference]:
    """``a``/``b``: {seed: value}. The paired difference over the seeds both have (finite
    values only), with a t interval of n - 1 degrees of freedom; None without a shared seed."""
    seeds = sorted(s for s in a if s in b and _finite(a[s]) and _finite(b[s]))
    if not seeds:
        return None
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    return difference_interval(diffs, seeds, level)


def difference_interval(diffs: Sequence[float], seeds: Sequence = (),
                        level: float = RESOLVED_LEVEL) -> PairedDifference:
    """Mean of ``diffs`` and its ``level`` t interval (None bounds for one value)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(tuple(seeds), mean, None, None, level)
    half = t_quantile(level, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(tuple(seeds) or tuple(range(len(diffs))), mean, mean - half,
                            mean + half, level)


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
