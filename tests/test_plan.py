"""``gplflow run --plan``: the counts a config implies, a calibrated rate per stage, and nothing run or written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gplflow.flows.cli import app
from gplflow.flows.config import PipelineConfig
from gplflow.flows.plan import duration, make_plan

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
N_DOCS = 24


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    lines = (DEMO / "corpus.jsonl").read_text().splitlines()[:N_DOCS]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {
        "name": "plan-test",
        "profile": "tiny",
        "corpus": {"path": "corpus.jsonl"},
        "generate": {"queries_per_passage": 3, "batch_size": 4},
        "mine": {"negatives_per_query": 4, "batch_size": 16},
        "label": {"triples": 40},
        "train": {"steps": 7, "batch_size": 4, "max_seq_length": 64},
        "evaluate": {"heldout_fraction": 0},
    }
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_counts_follow_the_config_and_every_stage_gets_a_rate(config_file, tmp_path):
    cfg = PipelineConfig.load(config_file)
    plan = make_plan(cfg, str(tmp_path / "run"))
    stages = {s.stage: s for s in plan.stages}
    assert plan.passages == N_DOCS
    assert list(stages) == ["generate", "mine", "label", "train"]  # no pretrain, no qrels nor held-out: no evaluate
    assert stages["generate"].work == N_DOCS and f"= {N_DOCS * 3} queries" in stages["generate"].detail
    assert stages["mine"].work == N_DOCS + N_DOCS * 3  # one retriever: passages + queries
    # 40 triples over 72 queries: 40 negative pairs + at most 40 positive pairs
    assert stages["label"].work == 80 and "40 triples" in stages["label"].detail
    assert stages["train"].work == 7 and stages["train"].unit == "steps"
    for stage in plan.stages:
        assert stage.rate is not None and stage.rate > 0, (stage.stage, stage.note)
        assert stage.seconds == pytest.approx(stage.work / stage.rate)
    assert plan.seconds == pytest.approx(sum(s.seconds for s in plan.stages))
    assert not (tmp_path / "run").exists()  # a plan writes nothing into the run directory
    held_out = make_plan(PipelineConfig.load(config_file, ["evaluate.heldout_fraction=0.05"]), str(tmp_path / "run"),
                         calibrate=False)
    assert [s.stage for s in held_out.stages][-1] == "evaluate"  # held-out queries are evaluated without qrels


def test_a_model_that_cannot_load_leaves_its_stage_without_an_estimate(config_file, tmp_path):
    missing = tmp_path / "no-such-model"
    cfg = PipelineConfig.load(config_file, [f"models.cross_encoder={missing}"])
    stages = {s.stage: s for s in make_plan(cfg, str(tmp_path / "run")).stages}
    assert stages["label"].rate is None and "not calibrated" in stages["label"].note
    assert str(missing) in stages["label"].note
    assert stages["train"].rate is not None  # the other stages still calibrate
    assert duration(stages["label"].seconds) == "?"


def test_cli_plan_prints_the_table_and_runs_nothing(config_file, tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(config_file), "--plan", "--run-dir", str(run_dir),
                                      "--set", "train.steps=5"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    for words in ("plan for 'plan-test'", "generate", "mine", "label", "train", "total", "5 steps of batch 4"):
        assert words in result.output
    assert "train_runtime" not in result.output and "it/s" not in result.output  # calibration prints held back
    assert not run_dir.exists()


def test_gpl_paper_config_counts(tmp_path):
    """The paper's recipe: 140k steps x 32 = 4.48M triples; QPP 3 above 83,334 passages (counted, not run)."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"passage {i} about bees"}) + "\n"
                              for i in range(10)))
    cfg = PipelineConfig.from_dict({"corpus": {"path": str(corpus)}})
    plan = make_plan(cfg, str(tmp_path / "run"), calibrate=False)
    stages = {s.stage: s for s in plan.stages}
    assert stages["train"].work == 140_000
    assert "4480000 triples" in stages["label"].detail
    assert stages["generate"].detail.startswith("10 passages x 25000 = 250000 queries")
    assert plan.seconds is None and duration(None) == "?"


def test_generation_is_calibrated_at_the_runs_own_queries_per_passage(config_file, tmp_path, monkeypatch):
    """Sampling cost grows with QPP: `auto` over 24 passages with a 120-query budget samples 5 per passage."""
    from gplflow.tasks import generate

    seen: list[int] = []
    real = generate.t5_queries

    def recording(gen, cfg, qpp, *args, **kwargs):
        seen.append(qpp)
        return real(gen, cfg, qpp, *args, **kwargs)

    monkeypatch.setattr(generate, "t5_queries", recording)
    cfg = PipelineConfig.load(config_file, ["generate.queries_per_passage=auto", "generate.target_queries=120"])
    stages = {s.stage: s for s in make_plan(cfg, str(tmp_path / "run")).stages}
    assert "x 5 = 120 queries" in stages["generate"].detail and stages["generate"].rate
    assert seen and set(seen) == {5}


def test_only_mteb_is_named_as_untimed(config_file, tmp_path):  # the other evaluators: test_plan_evaluators.py
    plain = PipelineConfig.load(config_file, ["evaluate.heldout_fraction=0.05"])
    more = PipelineConfig.load(config_file, ["evaluate.heldout_fraction=0.05", "evaluate.embedding_map={sample: 10}",
                                             "evaluate.mteb={tasks: [SciFact]}"])
    details = [{s.stage: s.detail for s in make_plan(c, str(tmp_path / "run"), calibrate=False).stages}["evaluate"]
               for c in (plain, more)]
    assert "untimed" not in details[0]
    assert details[1].endswith("; untimed: MTEB SciFact (can take far longer)")


def test_the_plan_says_what_a_changed_config_recomputes_in_an_existing_run_directory(tmp_path):
    """Stages whose artifacts the run directory holds with this config's fingerprints are reused; a change
    recomputes its stage and everything after it (a train.steps change with label.triples auto relabels)."""
    from gplflow.flows.plan import reused_stages
    from gplflow.flows.stages import Run, planned

    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(f"Bees of hive {i} make honey. Honey is sweet food number {i}. "
                                          f"Hives hold many bees in summer {i}.")
    cfg = PipelineConfig.from_dict({"name": "reuse", "profile": "tiny", "corpus": {"path": str(corpus)},
                                    "generate": {"method": "extractive", "queries_per_passage": 2},
                                    "evaluate": {"heldout_fraction": 0}, "train": {"steps": 2, "batch_size": 4}})
    run_dir = str(tmp_path / "run")
    assert reused_stages(cfg, run_dir) == []  # no run directory yet: everything computes
    from prefect.logging import disable_run_logger

    run = Run(cfg, run_dir)
    with disable_run_logger():
        for stage in planned(cfg)[:4]:  # ingest, generate, mine and label, computed as the pipeline does
            run.record(stage, stage.task.fn(stage.inputs(run)))
    assert reused_stages(cfg, run_dir) == ["ingest", "generate", "mine", "label"]
    other_seed = PipelineConfig.from_dict({**cfg.to_dict(), "generate": {**cfg.generate.model_dump(), "seed": 9}})
    assert reused_stages(other_seed, run_dir) == ["ingest"]  # the queries change, and all after them
    more_steps = PipelineConfig.from_dict({**cfg.to_dict(), "train": {**cfg.train.model_dump(), "steps": 3}})
    assert reused_stages(more_steps, run_dir) == ["ingest", "generate", "mine"]  # auto triples: label reruns
