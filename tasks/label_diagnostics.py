"""Label diagnostics: does the teacher's labelling look like a teacher, or like noise?

Computed once from the labelled triples (``diagnostics`` in the triples manifest, shown in the report):

- ``margin``: quantiles (min, p05, p25, p50, p75, p95, max) and mean of margin = score(q, pos) - score(q, neg);
- ``negative_share``: the share of triples whose mined negative the teacher scores above the source passage;
- ``near_zero_share``: the share of margins within ``NEAR_ZERO`` x the spread of all scores (p95 - p05) of 0;
- ``scores``: min, mean and max of the scores per kind (``pos``, ``neg``);
- ``positive_rank``: per example, the teacher's rank of the source passage among it and the example's negatives
  (1 = above every negative; a tie counts in the positive's favour): the mean, and the share of examples at each
  rank (``shares``, rank 1 first);
- ``outscored_share``: the share of examples in which at least one negative outscores the source passage (with
  one negative per example, ``negative_share``);
- ``teacher_agreement``: the share of queries whose source passage the teacher ranks first among that query's
  labelled candidates (every margin of the query > 0). It is measured on the training queries' labelled
  negatives, which cost nothing more; the held-out queries are never mined, so the teacher never sees them.
- ``warnings``: set when the teacher looks random (more than ``MAX_NEGATIVE_SHARE`` of margins negative) or
  uncalibrated (more than ``MAX_NEAR_ZERO_SHARE`` of margins near zero).
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = {"min": 0.0, "p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}
NEAR_ZERO = 0.05  # a margin within 5% of the score spread of zero tells the student almost nothing
MAX_NEGATIVE_SHARE = 0.4  # a random teacher prefers the negative about half the time
MAX_NEAR_ZERO_SHARE = 0.5  # "most margins near zero"


def label_diagnostics(query: np.ndarray, pos_score: np.ndarray, neg_score: np.ndarray) -> dict[str, Any]:
    """The diagnostics (see the module docstring) of examples given as arrays: query index and positive score per
    example, and its negatives' scores (one per example, or examples x n)."""
    pos, neg = np.asarray(pos_score, np.float64), np.asarray(neg_score, np.float64)
    if pos.size == 0:
        raise ValueError("label diagnostics: no triples")
    neg = neg.reshape(len(pos), -1)
    rank = 1 + (neg > pos[:, None]).sum(axis=1)
    shares = np.bincount(rank - 1, minlength=neg.shape[1] + 1) / len(rank)
    query, pos = np.repeat(query, neg.shape[1]), np.repeat(pos, neg.shape[1])
    neg = neg.ravel()
    margin = pos - neg
    both = np.concatenate([pos, neg])
    spread = float(np.quantile(both, 0.95) - np.quantile(both, 0.05))
    near_zero = float(np.mean(np.abs(margin) <= NEAR_ZERO * spread))
    _, inverse = np.unique(query, return_inverse=True)
    all_positive = np.ones(inverse.max() + 1, dtype=bool)
    np.logical_and.at(all_positive, inverse, margin > 0)
    found = {
        "margin": {**{k: float(np.quantile(margin, q)) for k, q in QUANTILES.items()}, "mean": float(margin.mean())},
        "negative_share": float(np.mean(margin < 0)),
        "near_zero_share": near_zero,
        "score_spread": spread,
        "scores": {kind: {"min": float(s.min()), "mean": float(s.mean()), "max": float(s.max())}
                   for kind, s in (("pos", pos), ("neg", neg))},
        "positive_rank": {"mean": float(rank.mean()), "shares": [round(float(x), 6) for x in shares]},
        "outscored_share": float(np.mean(rank > 1)),
        "teacher_agreement": float(all_positive.mean()),
        "queries": int(all_positive.size),
    }
    found["warnings"] = teacher_warnings(found)
    return found


def teacher_warnings(found: dict[str, Any]) -> list[str]:
    """A line per sign that the teacher looks random or uncalibrated on this corpus."""
    warnings = []
    if found["negative_share"] > MAX_NEGATIVE_SHARE:
        warnings.append(f"the teacher scores the mined negative above the source passage in "
                        f"{found['negative_share']:.0%} of triples (more than {MAX_NEGATIVE_SHARE:.0%}): it looks "
                        "random on this corpus; the student will learn noise")
    if found["near_zero_share"] > MAX_NEAR_ZERO_SHARE:
        warnings.append(f"{found['near_zero_share']:.0%} of margins are near zero (within {NEAR_ZERO:.0%} of the "
                        f"score spread {found['score_spread']:.4g}): the teacher looks uncalibrated or barely "
                        "tells passages apart")
    return warnings


def summary_line(found: dict[str, Any]) -> str:
    """One line for logs and the CLI."""
    m = found["margin"]
    rank = found.get("positive_rank")
    ranked = "" if rank is None or len(rank["shares"]) <= 2 else (
        f"positive ranked first in {rank['shares'][0]:.1%} of examples (mean rank {rank['mean']:.2f} of "
        f"{len(rank['shares'])}), outscored in {found['outscored_share']:.1%}, ")
    return (f"{ranked}margin p05 {m['p05']:.4g} / p50 {m['p50']:.4g} / p95 {m['p95']:.4g}, negative "
            f"{found['negative_share']:.1%}, near zero {found['near_zero_share']:.1%}, teacher agreement "
            f"{found['teacher_agreement']:.1%} of {found['queries']} queries")
