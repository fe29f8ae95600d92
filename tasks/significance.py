"""Is a gain real? A paired test of two models on the same queries, and the three-way verdict a run acts on.

Given one metric value per query for a ``base`` and an ``adapted`` model (the same queries, in the same order),
``paired_test`` measures the mean per-query difference ``adapted - base`` and how sure we can be of it:

- the **p-value** comes from a paired sign-flip permutation test: under the null hypothesis that the two models
  are interchangeable, each query's difference is as likely to have either sign, so flipping signs at random
  gives the null distribution of the mean difference. It is exact (every sign pattern enumerated) when 2^n is
  at most ``resamples``, else a seeded Monte Carlo estimate, (1 + hits) / (1 + resamples), which never
  reports 0. We chose it over a bootstrap p-value because it needs no assumption about the shape of the
  differences beyond symmetry under the null, and holds its level on small query sets, where a bootstrap
  p-value (shifting the resampled mean to 0) is too liberal;
- the **confidence interval** of the gain comes from a paired bootstrap (queries resampled with replacement,
  the percentile interval of the resampled mean difference at level 1 - ``alpha``), since a permutation test
  gives no interval;
- a rough **power estimate**: how many queries a two-sided test at ``alpha`` with 80% power would need to
  resolve a gain of the observed size, by the normal approximation n = ((z(1 - alpha/2) + z(0.8)) sd / gain)^2
  with sd the observed standard deviation of the per-query differences.

``verdict`` turns a test into one of three words and a sentence saying why: ``better`` (significant at
``alpha`` and at least ``min_gain``), ``worse`` (significantly below 0), ``inconclusive`` (the interval spans
0, or the gain is significant but smaller than ``min_gain``). Significant means both that p < alpha and that
the interval excludes 0, so the number shown and the words never disagree. Pure numpy: no I/O, no models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

VERDICTS = ("better", "worse", "inconclusive")
POWER = 0.8  # the power the queries-needed estimate asks for
_CHUNK = 2_000_000  # resampled values held at once (resamples x queries), bounding memory on large query sets


def paired_test(before: Sequence[float], after: Sequence[float], *, alpha: float = 0.05, resamples: int = 10_000,
                seed: int = 0) -> dict[str, Any]:
    """The paired comparison of ``after`` against ``before`` (one value per query, aligned): means, gain, the
    bootstrap interval, the sign-flip p-value, the sd of the differences and the queries a resolving test needs."""
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D sequences of one length; got {b.shape} and {a.shape}")
    if not 0 < alpha < 1 or resamples < 1:
        raise ValueError(f"alpha must be in (0, 1) and resamples at least 1; got {alpha}, {resamples}")
    n = len(a)
    found: dict[str, Any] = {"n": n, "alpha": alpha, "resamples": resamples, "seed": seed}
    if n == 0:
        return {**found, "base": None, "adapted": None, "gain": None, "ci": None, "p_value": None, "sd": None,
                "queries_needed": None}
    diff = a - b
    gain = float(diff.mean())
    sd = float(diff.std(ddof=1)) if n > 1 else 0.0
    low, high = bootstrap_interval(diff, alpha, resamples, seed)
    return {**found, "base": float(b.mean()), "adapted": float(a.mean()), "gain": gain, "ci": [low, high],
            "p_value": sign_flip_p(diff, resamples, seed), "sd": sd, "queries_needed": queries_needed(gain, sd, alpha)}


def bootstrap_interval(diff: np.ndarray, alpha: float, resamples: int, seed: int) -> tuple[float, float]:
    """The percentile interval (level 1 - ``alpha``) of the mean of ``diff`` over seeded resamples of its rows."""
    rng = np.random.default_rng(seed)
    n = len(diff)
    means = np.concatenate([diff[rng.integers(0, n, size=(rows, n))].mean(axis=1)
                            for rows in _chunks(resamples, n)])
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def sign_flip_p(diff: np.ndarray, resamples: int, seed: int) -> float:
    """Two-sided p-value of the mean of ``diff`` under random sign flips: exact when 2^n <= ``resamples``."""
    n = len(diff)
    observed = abs(float(diff.mean())) - 1e-12  # a tie with the observed mean counts as at least as extreme
    if n == 0 or observed <= 0:
        return 1.0
    if n <= math.log2(resamples):
        patterns = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        means = ((1 - 2 * patterns) * diff).mean(axis=1)
        return float(np.mean(np.abs(means) >= observed))
    rng = np.random.default_rng(seed)
    hits = sum(int(np.sum(np.abs((rng.choice((-1.0, 1.0), size=(rows, n)) * diff).mean(axis=1)) >= observed))
               for rows in _chunks(resamples, n))
    return (1 + hits) / (1 + resamples)


def _chunks(total: int, width: int) -> list[int]:
    rows = max(1, _CHUNK // max(width, 1))
    return [min(rows, total - start) for start in range(0, total, rows)]


def queries_needed(gain: float, sd: float, alpha: float, power: float = POWER) -> int | None:
    """Queries a two-sided paired test at ``alpha`` would need to detect ``gain`` with ``power`` (normal
    approximation; at least the few a sign-flip test needs to reach ``alpha`` at all); None when gain is 0."""
    if gain == 0 or not math.isfinite(gain):
        return None
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    floor = math.ceil(math.log2(2 / alpha))  # with n queries a sign-flip p-value is at least 2 / 2^n
    return max(floor, math.ceil((z * sd / gain) ** 2))


ASSUMED_SD = 0.15  # per-query sd of nDCG@10 differences, for plans made before any run: the demo's measured 0.14-0.19


def resolvable_gain(n: int, alpha: float, sd: float = ASSUMED_SD, power: float = POWER) -> float | None:
    """The smallest gain ``n`` paired queries resolve at ``alpha`` with ``power`` (``queries_needed`` turned round;
    normal approximation); None without queries."""
    if n < 1:
        return None
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return z * sd / math.sqrt(n)


def verdict(test: dict[str, Any], min_gain: float = 0.0, names: tuple[str, str] = ("adapted", "base"),
            on: str = "") -> tuple[str, str]:
    """``better`` | ``worse`` | ``inconclusive`` for a ``paired_test``, and why, in one sentence (``names``: the
    compared model and its reference; ``on``: what was measured, e.g. "nDCG@10 on the judged queries")."""
    model, reference = names
    where = f" on {on}" if on else ""
    n = test["n"]
    if not n:
        return "inconclusive", f"no queries to compare {model} and {reference}{where}"
    gain, (low, high), p = test["gain"], test["ci"], test["p_value"]
    level = round(100 * (1 - test["alpha"]))
    numbers = f"{gain:+.4f}, {level}% CI {low:+.4f} to {high:+.4f}, p = {p:.3g}, {n} queries"
    significant = p < test["alpha"]
    if significant and low > 0 and gain >= min_gain:
        return "better", f"the {model} model beats its {reference}{where} ({numbers})"
    if significant and high < 0:
        return "worse", f"the {model} model is worse than its {reference}{where} ({numbers})"
    if significant and low > 0:
        return "inconclusive", (f"the {model} model beats its {reference}{where} ({numbers}), but by less than "
                                f"min_gain {min_gain:g}")
    if test["sd"] == 0 and gain == 0:
        return "inconclusive", f"the {model} model and its {reference} score the same on every query{where}"
    needed = test["queries_needed"]
    more = (f"; about {needed} queries would resolve a gain of this size ({needed - n} more)" if needed and needed > n
            else "")
    return "inconclusive", (f"cannot tell the {model} model from its {reference}{where}: the gain is within "
                            f"noise ({numbers}){more}")


def compare(before: Sequence[float], after: Sequence[float], *, alpha: float = 0.05, resamples: int = 10_000,
            seed: int = 0, min_gain: float = 0.0, names: tuple[str, str] = ("adapted", "base"),
            on: str = "") -> dict[str, Any]:
    """``paired_test`` with its ``verdict`` and ``reason``: one comparison as ``metrics.json`` stores it."""
    test = paired_test(before, after, alpha=alpha, resamples=resamples, seed=seed)
    found, reason = verdict(test, min_gain, names, on)
    return {**test, "min_gain": min_gain, "verdict": found, "reason": reason}
