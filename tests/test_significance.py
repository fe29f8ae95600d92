"""The paired test and the verdict (``tasks/significance.py``) on hand-made per-query metrics of known answer."""

from __future__ import annotations

import numpy as np
import pytest

from gplflow.tasks import significance as sig

N = 60


def _queries(shift: float, noise: float = 0.05, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A base's per-query nDCG and an adapted model's: the same plus ``shift`` and independent noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.8, N)
    return base, base + shift + rng.normal(0.0, noise, N)


def test_a_clear_gain_is_better_with_its_interval_around_it():
    base, adapted = _queries(0.10)
    found = sig.compare(base, adapted, resamples=2000, seed=3, on="nDCG@10 on the judged queries")
    assert found["verdict"] == "better" and found["n"] == N
    assert found["gain"] == pytest.approx(np.mean(adapted - base))
    low, high = found["ci"]
    assert 0.07 < low < found["gain"] < high < 0.13
    assert found["p_value"] == pytest.approx(1 / 2001)  # no sign pattern reaches the observed mean
    assert f"beats its base on nDCG@10 on the judged queries ({found['gain']:+.4f}, 95% CI" in found["reason"]


def test_a_clear_loss_is_worse():
    base, adapted = _queries(-0.08)
    found = sig.compare(base, adapted, resamples=2000, seed=3)
    assert found["verdict"] == "worse" and found["ci"][1] < 0 and found["p_value"] < 0.01
    assert found["reason"].startswith("the adapted model is worse than its base (-0.0")


def test_pure_noise_is_inconclusive_and_says_how_many_queries_would_resolve_it():
    base, adapted = _queries(0.0, noise=0.1, seed=5)
    found = sig.compare(base, adapted, resamples=2000, seed=3)
    low, high = found["ci"]
    assert found["verdict"] == "inconclusive" and low < 0 < high and found["p_value"] > 0.05
    gain, sd = found["gain"], found["sd"]
    expected = int(np.ceil(((1.959964 + 0.841621) * sd / gain) ** 2))  # z(0.975) + z(0.8)
    assert found["queries_needed"] == expected and expected > N
    assert f"about {expected} queries would resolve a gain of this size ({expected - N} more)" in found["reason"]


def test_the_same_seed_gives_the_same_numbers_and_another_seed_other_resamples():
    base, adapted = _queries(0.01, noise=0.1)
    first = sig.paired_test(base, adapted, resamples=500, seed=11)
    assert sig.paired_test(base, adapted, resamples=500, seed=11) == first
    other = sig.paired_test(base, adapted, resamples=500, seed=12)
    assert other["ci"] != first["ci"] and other["gain"] == first["gain"]


def test_small_sets_are_enumerated_exactly():
    # 4 queries all gaining 0.1: of the 16 sign patterns only all-plus and all-minus reach |mean| 0.1
    found = sig.paired_test([0.5, 0.4, 0.3, 0.2], [0.6, 0.5, 0.4, 0.3], resamples=1000)
    assert found["p_value"] == pytest.approx(2 / 16) and found["sd"] == pytest.approx(0.0, abs=1e-12)
    assert sig.verdict(found)[0] == "inconclusive"  # 4 queries cannot reach p < 0.05 whatever the gain
    assert found["queries_needed"] == 6  # the fewest queries whose sign-flip p-value can go below 0.05


def test_min_gain_and_edge_cases():
    base, adapted = _queries(0.03, noise=0.01)
    verdict, reason = sig.verdict(sig.paired_test(base, adapted, resamples=500), min_gain=0.05)
    assert verdict == "inconclusive" and "but by less than min_gain 0.05" in reason
    same = sig.compare([0.3, 0.6, 0.9], [0.3, 0.6, 0.9])
    assert (same["verdict"], same["p_value"], same["ci"]) == ("inconclusive", 1.0, [0.0, 0.0])
    assert "score the same on every query" in same["reason"]
    empty = sig.compare([], [])
    assert (empty["verdict"], empty["gain"]) == ("inconclusive", None) and "no queries" in empty["reason"]
    with pytest.raises(ValueError, match="one length"):
        sig.paired_test([0.1, 0.2], [0.1])


def _said(verdict: str) -> dict:
    return {"verdict": verdict, "reason": f"it is {verdict}", "base": 0.5, "adapted": 0.6, "gain": 0.1}


@pytest.mark.parametrize(("signals", "expected"), [
    ({"heldout": "inconclusive", "teacher": "better"}, "better"),
    ({"heldout": "worse", "heldout_low_overlap": "inconclusive"}, "worse"),
    ({"heldout": "worse", "teacher": "better"}, "inconclusive"),  # the signals disagree
    ({"heldout": "inconclusive", "teacher": "inconclusive"}, "inconclusive"),
])
def test_without_qrels_the_signals_decide_together(signals, expected):
    from gplflow.tasks import promote

    found = promote.consensus({name: _said(v) for name, v in signals.items()})
    assert found["verdict"] == expected and found["signals"] == signals and found["evaluation"] == "no_qrels"
    if expected == "inconclusive" and "better" in signals.values():
        assert found["reason"] == "the signals without qrels disagree (better on teacher-judged, worse on held-out)"
    verdicts = promote.verdicts({"qrels": {"comparisons": {"adapted": _said("better")}},
                                 **{name: {"comparisons": {"adapted": _said(v)}} for name, v in signals.items()}})
    assert promote.deciding(verdicts)["evaluation"] == "qrels"  # qrels, when given, decide


def test_the_gain_a_plan_says_its_queries_resolve_is_queries_needed_turned_round():
    from gplflow.tasks.significance import ASSUMED_SD, queries_needed, resolvable_gain

    gain = resolvable_gain(48, 0.05)
    assert 0.05 < gain < 0.07  # 48 held-out queries cannot tell ±0.016 from noise
    assert queries_needed(gain, ASSUMED_SD, 0.05) in (48, 49)
    assert resolvable_gain(192, 0.05) == pytest.approx(gain / 2)  # four times the queries, half the gain
    assert resolvable_gain(0, 0.05) is None


def test_the_plan_states_the_verdicts_power(tmp_path):
    from gplflow.flows.config import PipelineConfig
    from gplflow.tasks.evaluate import estimate

    cfg = PipelineConfig.from_dict({"corpus": {"path": str(tmp_path)}, "generate": {"queries_per_passage": 3},
                                    "evaluate": {"heldout_fraction": 0.05, "heldout_max": 2000}})
    detail = estimate(cfg, 320).detail  # 960 queries: 48 held out
    assert "resolves nDCG@10 gains above about ±0.061 with 48 held-out queries" in detail
    none = PipelineConfig.from_dict({"corpus": {"path": str(tmp_path)}, "evaluate": {"heldout_fraction": 0}})
    assert "no verdict" in estimate(none, 320).detail
