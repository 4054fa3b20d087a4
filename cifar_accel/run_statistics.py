"""Statistics of several runs' accuracies, with scipy's Student t: what a mean over seeds and a difference between
two settings are worth.

One run's accuracy says little: two seeds of one recipe differ by 0.2-0.3 points on CIFAR-10. The speed-run
records report means over many runs with a one-sample t-test against the target (hiverge/cifar10-speedrun);
``describe`` gives the same figures, ``welch`` tests whether two groups differ by more than their noise.
"""

import math
from collections.abc import Sequence

SIGNIFICANCE = 0.05  # a difference "exceeds its noise" when Welch's two-sided p-value is below this


def describe(values: Sequence[float], target: float | None = None) -> dict:
    """n, mean, sample standard deviation, standard error and the 95% t interval of the mean; with ``target``, the
    one-sample t-test that the mean exceeds it (one-sided p-value, as the speed-run records state theirs).
    With one value, the spread and the test are None."""
    from scipy import stats  # start-up time: scipy.stats takes a second to import

    values = [float(value) for value in values]
    n = len(values)
    if not n:
        raise ValueError("describe() needs at least one value")
    mean = math.fsum(values) / n
    summary = {"n": n, "mean": mean, "sd": None, "se": None, "ci95": None}
    if target is not None:
        summary.update(target=target, t=None, p_value=None)
    if n < 2:
        return summary
    sd = math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (n - 1))
    se = sd / math.sqrt(n)
    half_width = float(stats.t.ppf(0.975, n - 1)) * se
    summary.update(sd=sd, se=se, ci95=[mean - half_width, mean + half_width])
    if target is not None and se > 0:
        test = stats.ttest_1samp(values, target, alternative="greater")
        summary.update(t=float(test.statistic), p_value=float(test.pvalue))
    elif target is not None:  # every run gave the same accuracy: the test is decided without noise
        summary.update(t=math.copysign(math.inf, mean - target) if mean != target else 0.0,
                       p_value=0.0 if mean > target else 1.0)  # fmt: skip
    return summary


def welch(first: Sequence[float], second: Sequence[float]) -> dict | None:
    """Welch's t-test of ``mean(second) - mean(first)`` (two-sided; unequal variances): the difference, its t, p and
    whether it exceeds its noise (p < 0.05). None when a group has fewer than two runs or neither has any spread."""
    from scipy import stats

    if len(first) < 2 or len(second) < 2:
        return None
    difference = math.fsum(second) / len(second) - math.fsum(first) / len(first)
    if len(set(first)) == 1 and len(set(second)) == 1:
        return None
    test = stats.ttest_ind(second, first, equal_var=False)
    p_value = float(test.pvalue)
    return {"difference": difference, "t": float(test.statistic), "p_value": p_value,
            "exceeds_noise": p_value < SIGNIFICANCE}  # fmt: skip


def format_mean(summary: dict, scale: float = 100.0, unit: str = "%") -> str:
    """``94.01% ± 0.05``: the mean ± its standard error, in percent by default (the mean alone for one run)."""
    mean = f"{summary['mean'] * scale:.2f}{unit}"
    return mean if summary["se"] is None else f"{mean} ± {summary['se'] * scale:.2f}"
