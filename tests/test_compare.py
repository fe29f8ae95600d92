"""`gplflow compare`: methods side by side in sibling run directories, shared stages adopted, one table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from artifact_rows import write_artifact

from gplflow.adapters.store import ArtifactStore
from gplflow.flows import compare as compare_module
from gplflow.flows.compare import (
    CompareConfig,
    agreement_rows,
    check_compare,
    compare_pipeline,
    comparison_markdown,
    comparison_rows,
    rank_agreement,
    run_compare,
    seed_rows,
)
from gplflow.flows.config import ConfigError
from gplflow.tasks.filter import RULE_KEYS

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
N_DOCS = 30
SHARED = ("corpus", "queries", "heldout", "queries-train", "negatives", "triples")


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def compare_file(tmp_path) -> Path:
    docs = [json.loads(line) for line in (DEMO / "corpus.jsonl").read_text().splitlines()[:N_DOCS]]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    base = {"name": "base", "profile": "tiny", "corpus": {"path": "corpus.jsonl"},
            "generate": {"method": "extractive", "queries_per_passage": 2, "seed": 1},
            "mine": {"negatives_per_query": 3, "batch_size": 16},
            "label": {"teacher": "bi_encoder", "triples": 32, "seed": 1},
            "train": {"steps": 2, "batch_size": 4, "max_seq_length": 32, "warmup_steps": 0},
            "evaluate": {"heldout_fraction": 0.2, "max_seq_length": 32}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    compare = {"name": "cmp", "base": "base.yaml",
               "methods": [{"name": "gpl"}, {"name": "gpl-4-steps", "set": ["train.steps=4"]}]}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(compare))
    return tmp_path / "compare.yaml"


@pytest.mark.slow
def test_compare_runs_each_method_adopting_the_stages_they_share(prefect_api, compare_file, tmp_path):
    root = tmp_path / "runs"
    found = compare_pipeline(str(compare_file), str(root))

    first, second = ArtifactStore(root / "gpl"), ArtifactStore(root / "gpl-4-steps")
    for stage in SHARED:  # adopted, not recomputed: the same manifest, the same bytes (hard links here)
        assert (root / "gpl-4-steps" / stage / "manifest.json").read_bytes() == \
            (root / "gpl" / stage / "manifest.json").read_bytes()
        part = next(p.name for p in (root / "gpl" / stage).iterdir() if p.name.startswith("part-"))
        assert os.path.samefile(root / "gpl" / stage / part, root / "gpl-4-steps" / stage / part)
    assert first.require("model").fingerprint != second.require("model").fingerprint
    assert second.require("model").manifest["train"]["steps"] == 4

    assert [row["method"] for row in found["rows"]] == ["base", "gpl", "gpl-4-steps"]
    heldout = [row["held-out nDCG@10"] for row in found["rows"]]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in heldout)
    table = (root / "comparison.md").read_text()
    assert "| gpl-4-steps | – | " in table
    assert table.split("### Agreement")[0].count("\n|") == 5  # header, rule and three rows


def test_a_compare_file_is_checked_before_anything_runs(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"corpus": {"path": "c.jsonl"}}))
    (tmp_path / "dupes.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "methods": [{"name": "a"},
                                                                                         {"name": "a"}]}))
    with pytest.raises(ConfigError, match="repeated: a"):
        CompareConfig.load(tmp_path / "dupes.yaml")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "methods": [
        {"name": "ok"}, {"name": "bad", "set": ["train.stepz=3"]}]}))
    with pytest.raises(ConfigError, match=r"method bad: .*train.stepz"):
        list(CompareConfig.load(tmp_path / "typo.yaml").method_configs())


def test_the_comparison_table_shows_a_missing_value_as_a_dash():
    rows = [{"method": "base", "qrels nDCG@10": 0.5, "held-out nDCG@10": None, "STS Spearman": None,
             "k-means V-measure": 0.25, "seconds": None, "promoted": None}]
    assert "| base | 0.5000 | – | – | 0.2500 | – | – | – | – | – |" in comparison_markdown("x", rows)


def test_rank_agreement_counts_pairs_ordered_alike_and_kendall_tau():
    assert rank_agreement([0.1, 0.2, 0.3], [1.0, 2.0, 3.0]) == (1.0, 1.0)
    assert rank_agreement([0.1, 0.2, 0.3], [3.0, 2.0, 1.0]) == (0.0, -1.0)
    ordered, tau = rank_agreement([0.1, 0.2, 0.3, 0.4], [0.1, 0.3, 0.2, 0.4])  # one pair of six swapped
    assert ordered == 5 / 6 and tau == (5 - 1) / 6
    assert rank_agreement([0.5], [0.5]) == (None, None)


def _metrics(qrels: dict, heldout: dict, verdicts: dict) -> dict:
    def comparison(verdict: str) -> dict:
        return {"n": 20, "verdict": verdict, "gain": 0.01, "ci": [-0.01, 0.03], "p_value": 0.2, "reason": verdict,
                "base": 0.5, "adapted": 0.51}

    return {"evaluations": {
        name: {"models": {label: {"ndcg@10": v} for label, v in values.items()},
               "comparisons": {"adapted": comparison(verdicts[name])}}
        for name, values in (("qrels", qrels), ("heldout", heldout))}, "promotion": {"promoted": "adapted"}}


def test_the_agreement_section_compares_each_signal_with_the_qrels_over_the_methods():
    summaries = {"a": {"metrics": _metrics({"base": 0.5, "adapted": 0.6}, {"base": 0.8, "adapted": 0.9},
                                           {"qrels": "better", "heldout": "better"})},
                 "b": {"metrics": _metrics({"base": 0.5, "adapted": 0.4}, {"base": 0.8, "adapted": 0.85},
                                           {"qrels": "worse", "heldout": "inconclusive"})},
                 "c": {"metrics": _metrics({"base": 0.5, "adapted": 0.55}, {"base": 0.8, "adapted": 0.82},
                                           {"qrels": "better", "heldout": "worse"})}}
    rows = comparison_rows(summaries)
    assert [r["method"] for r in rows] == ["base", "a", "b", "c"]
    assert rows[1]["verdict: qrels / without"] == "better / better"
    assert rows[1]["qrels gain (95% CI), p"] == "+0.0100 (-0.010, +0.030), p 0.2"
    held, verdict = agreement_rows(rows)
    # qrels: a .6 > c .55 > base .5 > b .4; held-out: a .9 > b .85 > c .82 > base .8: b is misplaced (2 of 6 pairs)
    assert held == {"signal": "held-out", "models": "4", "pairs ordered as qrels": "67%", "Kendall tau": "+0.33",
                    "verdicts as qrels": "1 of 3", "opposite verdicts": "1"}
    assert verdict["signal"] == "verdict without qrels" and verdict["verdicts as qrels"] == "1 of 3"
    assert "### Agreement with the qrels, without them" in comparison_markdown("x", rows, [held, verdict])


def test_the_demo_compare_file_has_each_filter_rule_alone_and_together_sharing_gpls_queries_and_split(tmp_path):
    found = {run["run"]: run for run in check_compare(ROOT / "configs" / "compare.yaml", str(tmp_path / "runs"))}
    methods = {m.name: m for m in CompareConfig.load(ROOT / "configs" / "compare.yaml").methods}
    filters = {name: {item.split("=")[0].removeprefix("filter.") for item in m.set}
               for name, m in methods.items() if name.startswith("gpl-filter-")}
    alone = {next(iter(keys)) for keys in filters.values() if len(keys) == 1}
    # every rule that applies to the demo's extractive queries: the copy and log-prob rules do not
    assert alone == set(RULE_KEYS) - {"min_words", "max_overlap", "logprob_fraction"}
    assert filters["gpl-filter-all"] == {"max_words", "dedup", "round_trip_k", "teacher_fraction"}
    for name in filters:  # the same queries and held-out split as plain GPL: adopted, so evaluated alike
        assert found[name]["adopts_from"] == "gpl"
        assert found[name]["adopts"] == ["corpus", "queries", "heldout", "queries-train"]
        assert found[name]["run_dir"] == f"{tmp_path}/runs/{name}"
    assert found["gpl"]["adopts"] == []


def _fake_summary(run_dir: str, qrels: float, heldout: float, verdict: str) -> dict:
    return {"run_dir": run_dir, "seconds": 10.0, "metrics": _metrics({"base": 0.5, "adapted": qrels},
                                                                      {"base": 0.8, "adapted": heldout},
                                                                      {"qrels": verdict, "heldout": verdict})}


def test_compare_runs_each_method_once_per_seed_and_reports_mean_and_spread(compare_file, tmp_path, monkeypatch):
    calls = []
    scores = {("gpl", 1): 0.60, ("gpl", 2): 0.64, ("gpl-4-steps", 1): 0.50, ("gpl-4-steps", 2): 0.54}

    def run_pipeline(cfg, run_dir, base, overrides, reuse_from=()):
        calls.append((run_dir, list(reuse_from), cfg.generate.seed, cfg.label.seed, cfg.train.seed, cfg.name))
        method, seed = Path(run_dir).name, int(Path(run_dir).parent.name.removeprefix("seed-"))
        store = ArtifactStore(run_dir)  # the training queries the row counts
        write_artifact(store, "queries-train", [(f"q{i}", "d", "x") for i in range(seed * 10)])
        qrels = scores[method, seed]
        return _fake_summary(run_dir, qrels, 0.85, "better" if qrels > 0.55 else "worse")

    monkeypatch.setattr("gplflow.flows.pipeline.run_pipeline", run_pipeline)
    monkeypatch.setattr("gplflow.flows.validate.validate_run", lambda *a, **k: None)
    monkeypatch.setattr(compare_module, "_publish", lambda name, markdown: None)
    root = tmp_path / "runs"
    found = run_compare(compare_file, str(root), seeds=(1, 2))
    dirs = [f"{root}/seed-{s}/{m}" for s in (1, 2) for m in ("gpl", "gpl-4-steps")]
    assert [c[0] for c in calls] == dirs  # seed by seed, each method in turn
    assert [c[1] for c in calls] == [dirs[:i] for i in range(4)]  # each adopts from every run before it
    assert [c[2:5] for c in calls] == [(1, 1, 1), (1, 1, 1), (2, 2, 2), (2, 2, 2)]  # generate, label, train seeds
    assert calls[3][5] == "cmp-gpl-4-steps-seed2"
    rows = {row["method"]: row for row in found["seed_rows"]}
    assert list(rows) == ["base", "gpl", "gpl-4-steps"]
    mean, sd, n = rows["gpl-4-steps"]["qrels nDCG@10"]
    assert (round(mean, 6), round(sd, 6), n) == (0.52, round(0.04 / 2 ** 0.5, 6), 2)
    assert rows["gpl"]["verdicts qrels"] == "better 2" and rows["gpl-4-steps"]["verdicts qrels"] == "worse 2"
    assert rows["base"]["qrels nDCG@10"][:2] == (0.5, 0.0)
    assert rows["gpl"]["training queries"][:2] == (15.0, 50 ** 0.5)  # 10 and 20
    table = (root / "comparison.md").read_text()
    assert "| gpl-4-steps | 2 | 0.5200 ± 0.0283 | 0.8500 ± 0.0000 | – | – | 15 ± 7 | 10 ± 0 | worse 2 | " in table
    assert "## Comparison `cmp, seed 2`" in (root / "seed-2" / "comparison.md").read_text()


def test_seeds_are_checked(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"corpus": {"path": "c.jsonl"}}))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "methods": [{"name": "a"}],
                                                     "seeds": [1, 1]}))
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        CompareConfig.load(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "methods": [{"name": "a"}],
                                                     "seed_keys": ["train.sed"]}))
    with pytest.raises(ConfigError, match=r"method a \(seed 3\): .*train.sed"):
        CompareConfig.load(tmp_path / "c.yaml").runs("r", (3,))
    assert seed_rows({1: [{"method": "x", "qrels nDCG@10": 0.5}]})[0]["qrels nDCG@10"] == (0.5, None, 1)
