"""``--plan`` times what evaluate does beside retrieval and says how far off its estimates may be (issue 20,
item 8: on the demo the plan said 4 s for evaluate, which took 64 s in UMAP, HDBSCAN and STS)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from gplflow.adapters import embedding_eval
from gplflow.flows.config import PipelineConfig
from gplflow.flows.plan import Plan, estimated, make_plan
from gplflow.tasks.planning import StagePlan, StepClock, clock, timings

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
N_DOCS = 24
STS_PAIRS = 5


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan-evaluators")
    lines = (DEMO / "corpus.jsonl").read_text().splitlines()[:N_DOCS]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    pairs = (DEMO / "pairs.tsv").read_text().splitlines()[: STS_PAIRS + 1]
    (root / "sts.tsv").write_text("\n".join(pairs) + "\n")
    labels = (DEMO / "labels.tsv").read_text().splitlines()
    (root / "labels.tsv").write_text("\n".join(labels) + "\n")
    cfg = {
        "name": "plan-evaluators", "profile": "tiny", "flow": "genq",
        "corpus": {"path": "corpus.jsonl"},
        "generate": {"method": "extractive", "queries_per_passage": 2},
        "train": {"loss": "mnrl", "steps": 5, "batch_size": 4, "max_seq_length": 32},
        "evaluate": {"heldout_fraction": 0.25, "max_seq_length": 32, "sts": {"path": "sts.tsv"},
                     "clustering": {"labels": "labels.tsv"}, "embedding_map": {"sample": 10}},
    }
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _slow(seconds: float):
    def run(*args, **kwargs):
        time.sleep(seconds)

    return run


def test_clustering_and_the_embedding_map_are_timed_and_the_sts_sentences_counted(config_file, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr(embedding_eval, "cluster_scores", _slow(0.2))  # per model: 2 models -> 0.4 s
    monkeypatch.setattr(embedding_eval, "embedding_map", _slow(0.1))  # per model: 0.2 s
    plan = make_plan(PipelineConfig.load(config_file), str(tmp_path / "run"))
    evaluate = {s.stage: s for s in plan.stages}["evaluate"]
    held = int(0.25 * N_DOCS * 2)
    assert evaluate.work == 2 * (N_DOCS + held + 2 * STS_PAIRS)  # base and adapted encode each text
    assert f"{held} held-out queries" in evaluate.detail and f"{2 * STS_PAIRS} STS sentences" in evaluate.detail
    assert "untimed" not in evaluate.detail
    assert evaluate.rate and 0.6 <= evaluate.beside < 1.2, evaluate.beside
    assert evaluate.beside_detail == f"clustering {N_DOCS} items, embedding map of {10 + held * 10 // N_DOCS} points"
    assert evaluate.seconds == pytest.approx(evaluate.work / evaluate.rate + evaluate.beside)
    for stage in plan.stages:  # every calibrated stage says how noisy its timings were
        assert stage.spread is not None and stage.spread >= 0, stage.stage
    assert plan.spread is not None and min(s.spread for s in plan.stages) <= plan.spread <= max(
        s.spread for s in plan.stages)


def test_the_real_evaluators_run_at_plan_time(config_file, tmp_path):
    """No fakes: k-means, HDBSCAN and UMAP on the calibration embeddings, at the run's sizes."""
    cfg = PipelineConfig.load(config_file, ["evaluate.embedding_map=null"])
    evaluate = {s.stage: s for s in make_plan(cfg, str(tmp_path / "run")).stages}["evaluate"]
    assert evaluate.beside > 0 and evaluate.beside_detail == f"clustering {N_DOCS} items"


def test_clock_takes_the_median_of_repeated_calls_and_notes_their_spread():
    durations = iter([0.0, 0.01, 0.03, 0.02])  # the warm-up call, then three timed ones

    with timings() as spreads:
        seconds = clock(lambda: time.sleep(next(durations)))
    assert seconds == pytest.approx(0.02, abs=0.008)
    assert len(spreads) == 1 and spreads[0] == pytest.approx(0.5, abs=0.25)  # (0.03 - 0.01) / 2 / 0.02
    steps = StepClock()
    steps.stamps = [0.0, 1.0, 2.5]  # at the end of steps 1, 2 and 3: the first (setup) step is not timed
    with timings() as spreads:
        assert steps.rate() == pytest.approx(1 / 1.25)
    assert spreads == [pytest.approx((1.5 - 1.0) / 2 / 1.25)]
    assert clock(lambda: None) > 0  # outside ``timings`` nothing is noted, nothing fails


def test_the_total_spread_weighs_each_stage_by_its_seconds():
    stages = [StagePlan(100, "texts", "", rate=10.0, spread=0.1), StagePlan(30, "steps", "", rate=1.0, spread=0.5,
                                                                            beside=0.0)]
    plan = Plan("cpu", 10, stages)
    assert plan.seconds == pytest.approx(40.0)
    assert plan.spread == pytest.approx((10 * 0.1 + 30 * 0.5) / 40)
    assert estimated(plan.seconds, plan.spread) == "40 s ±40%"
    assert estimated(90.0, None) == "1.5 min" and estimated(None, 0.2) == "?"
    assert Plan("cpu", 10, [*stages, StagePlan(5, "texts", "")]).spread is None  # a stage not calibrated


def test_a_rate_two_stages_measure_alike_is_measured_once_per_plan(monkeypatch):
    """label's teacher and evaluate's judge are one model scoring the same pairs: one calibration in a plan."""
    import numpy as np

    from gplflow.adapters import scoring
    from gplflow.tasks.planning import calibration, score_rate

    loads: list[str] = []

    class Scorer:
        def score(self, queries, texts, left, right):
            return np.zeros(len(left))

    def load(kind, ref, **settings):
        loads.append(ref)
        return Scorer()

    monkeypatch.setattr(scoring, "load_scorer", load)
    texts = [f"passage {i} about bees and their hives" for i in range(8)]
    with calibration():
        with timings() as first:
            pairs = score_rate("cross_encoder", "/teacher", texts, 32, 8)
        with timings() as second:
            assert score_rate("cross_encoder", "/teacher", texts, 32, 8, per_text=True) == pytest.approx(2 * pairs)
        score_rate("cross_encoder", "/judge", texts, 32, 8)
    assert loads == ["/teacher", "/judge"] and first == second and len(first) == 1
    score_rate("cross_encoder", "/teacher", texts, 32, 8)  # outside a plan's calibration: measured again
    assert loads == ["/teacher", "/judge", "/teacher"]
