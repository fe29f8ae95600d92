"""UKPLab gpl folder format: export -> import round trip, the exact bytes written, and named errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from artifact_rows import write_artifact

from gplflow.adapters.gpl_format import GplFormatError, export_gpl, import_gpl
from gplflow.adapters.store import ArtifactStore

DOCS = [("d1", "Bees", "Honey bees make honey from nectar."),
        ("d2", "", 'A "quoted" word and café crème.'),
        ("d3", "Volcanoes", "Magma rises through the crust."),
        ("d4", "Chess", "Castling moves the king two squares."),
        ("d5", "Tea", "Green tea is unoxidised.")]
QUERIES = [("genQ1", "d1", "how do bees make honey"), ("genQ2", "d1", "what do bees collect"),
           ("genQ3", "d3", "why do volcanoes erupt"), ("genQ4", "d2", "café crème?")]
# A query's rows are split over two parts (one per miner), as a miner writing per retriever would.
NEGATIVES = [[("genQ1", "bm25", ["d3", "d5"]), ("genQ3", "bm25", ["d4"]), ("genQ4", "bm25", [])],
             [("genQ1", "msmarco-MiniLM-L-6-v3", ["d5", "d2", "d4"]), ("genQ2", "msmarco-MiniLM-L-6-v3", ["d2"])]]
MARGINS = np.array([18.465141, 13.6840515, 0.1, -3.4028235e38, 1e-45, 1 / 3, -0.0, 7.277392], dtype=np.float32)


def _by_hand(store: ArtifactStore) -> None:
    write_artifact(store, "corpus", DOCS)
    write_artifact(store, "queries", QUERIES)
    write_artifact(store, "negatives", [(*row, [0.5] * len(row[2])) for part in NEGATIVES for row in part],
                   parts=[len(part) for part in NEGATIVES])
    rng = np.random.default_rng(0)
    margins = np.concatenate([MARGINS, rng.standard_normal(200).astype(np.float32) * 10])
    write_artifact(store, "triples", [(QUERIES[i % 4][0], QUERIES[i % 4][1], "d5" if i % 2 else "d4", m + 1, 1.0, m)
                                      for i, m in enumerate(margins)])


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_trip_is_exact(tmp_path):
    original, imported = ArtifactStore(tmp_path / "a"), ArtifactStore(tmp_path / "b")
    _by_hand(original)

    counts = export_gpl(original, str(tmp_path / "gpl"))
    assert counts == {"corpus.jsonl": 5, "qgen-queries.jsonl": 4, "qgen-qrels/train.tsv": 4,
                      "hard-negatives.jsonl": 4, "gpl-training-data.tsv": 208}
    fps = import_gpl(str(tmp_path / "gpl"), imported)
    assert set(fps) == {"corpus", "queries", "negatives", "triples"}
    assert all(imported.load(stage, expect_fingerprint=fp) is not None for stage, fp in fps.items())

    def table(store, stage, columns):
        return store.require(stage).read_table(columns).to_pylist()

    assert table(imported, "corpus", None) == table(original, "corpus", None)
    cols = ["query_id", "doc_id", "text"]
    assert table(imported, "queries", cols) == table(original, "queries", cols)
    cols = ["query_id", "retriever", "doc_ids"]
    key = lambda row: (row["query_id"], row["retriever"])  # noqa: E731
    assert sorted(table(imported, "negatives", cols), key=key) == sorted(table(original, "negatives", cols), key=key)
    new, old = imported.require("triples").read_table(), original.require("triples").read_table()
    for column in ("query_id", "pos_doc_id", "neg_doc_id"):
        assert new.column(column).to_pylist() == old.column(column).to_pylist()
    margins_new = new.column("margin").to_numpy()
    assert margins_new.dtype == np.float32
    assert margins_new.view(np.uint32).tolist() == old.column("margin").to_numpy().view(np.uint32).tolist()

    export_gpl(imported, str(tmp_path / "gpl2"))
    assert _files(tmp_path / "gpl2") == _files(tmp_path / "gpl")


def test_exported_files_match_the_reference_layout(tmp_path):
    store = ArtifactStore(tmp_path / "a")
    _by_hand(store)
    export_gpl(store, str(tmp_path / "gpl"))
    out = tmp_path / "gpl"
    assert json.loads((out / "corpus.jsonl").read_text().splitlines()[1]) == {
        "_id": "d2", "title": "", "text": 'A "quoted" word and café crème.'}
    assert (out / "qgen-queries.jsonl").read_text().splitlines()[0] == \
        '{"_id": "genQ1", "text": "how do bees make honey", "metadata": {}}'
    assert (out / "qgen-qrels" / "train.tsv").read_text().splitlines()[:2] == [
        "query-id\tcorpus-id\tscore", "genQ1\td1\t1"]
    assert (out / "hard-negatives.jsonl").read_text().splitlines()[0] == (
        '{"qid": "genQ1", "pos": ["d1"], "neg": {"bm25": ["d3", "d5"], "msmarco-MiniLM-L-6-v3": ["d5", "d2", "d4"]}}')
    lines = (out / "gpl-training-data.tsv").read_text().splitlines()
    assert lines[:3] == ["genQ1\td1\td4\t18.465141", "genQ2\td1\td5\t13.6840515", "genQ3\td3\td4\t0.1"]
    assert [line.split("\t")[3] for line in lines[3:7]] == ["-3.4028235e+38", "1e-45", "0.33333334", "-0.0"]


def test_import_marks_unknown_scores_nan_and_drops_positives(tmp_path):
    folder = tmp_path / "gpl"
    (folder / "qgen-qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": f"passage {d}"}) + "\n"
                                                 for d in ("1", "2", "3")))
    (folder / "qgen-queries.jsonl").write_text('{"_id": "q1", "text": "a", "metadata": {}}\n'
                                               '{"_id": "q2", "text": "b", "metadata": {}}\n')
    (folder / "qgen-qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t1\t1\n")
    (folder / "hard-negatives.jsonl").write_text('{"qid": "q1", "pos": ["1"], "neg": {"bm25": ["2", "1", "3"]}}\n')
    (folder / "gpl-training-data.tsv").write_text("q1\t1\t2\t5.5\n")
    store = ArtifactStore(tmp_path / "run")
    import_gpl(str(folder), store)

    assert store.require("queries").read_table().to_pylist() == [{"query_id": "q1", "doc_id": "1", "text": "a"}]
    assert store.require("queries").counters == {"queries_without_positive": 1}
    negatives = store.require("negatives")
    row = negatives.read_table().to_pylist()[0]
    assert row["doc_ids"] == ["2", "3"] and len(row["scores"]) == 2 and all(math.isnan(s) for s in row["scores"])
    assert negatives.counters == {"positives_removed": 1}
    triple = store.require("triples").read_table().to_pylist()[0]
    assert triple["margin"] == 5.5 and math.isnan(triple["pos_score"]) and math.isnan(triple["neg_score"])


def test_import_only_what_is_present_and_keeps_unchanged_artifacts(tmp_path):
    folder = tmp_path / "gpl"
    folder.mkdir()
    (folder / "gpl-training-data.tsv").write_text("genQ5\t257122\t460230\t18.465141\n")
    store = ArtifactStore(tmp_path / "run")
    first = import_gpl(str(folder), store)
    assert list(first) == ["triples"] and store.load("corpus") is None
    started = store.require("triples").manifest["timings"]["started"]
    assert import_gpl(str(folder), store) == first
    assert store.require("triples").manifest["timings"]["started"] == started


@pytest.mark.parametrize(("name", "content", "message"), [
    ("gpl-training-data.tsv", "q1\t1\t2\t0.5\nq1\t1\t2\n", r"gpl-training-data\.tsv line 2: expected 4 tab-separated"),
    ("gpl-training-data.tsv", "q1\t1\t2\tbig\n", r"gpl-training-data\.tsv line 1: margin 'big' is not a number"),
    ("hard-negatives.jsonl", '{"qid": "q1", "pos": [], "neg": {}}\n{"qid": \n',
     r"hard-negatives\.jsonl line 2: not valid"),
    ("hard-negatives.jsonl", '{"qid": "q1", "pos": [], "neg": {"bm25": "1"}}\n',
     r"hard-negatives\.jsonl line 1: 'neg'.'bm25' must be a list of ids"),
    ("corpus.jsonl", '{"_id": "1", "text": "x"}\n{"_id": "2"}\n', r"corpus\.jsonl.*line 2"),
])
def test_malformed_lines_are_named(tmp_path, name, content, message):
    folder = tmp_path / "gpl"
    folder.mkdir()
    (folder / name).write_text(content)
    store = ArtifactStore(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        import_gpl(str(folder), store)
    stage = {"gpl-training-data.tsv": "triples", "hard-negatives.jsonl": "negatives", "corpus.jsonl": "corpus"}[name]
    assert store.load(stage) is None and not list((tmp_path / "run").glob(".*tmp*"))


def test_ids_are_checked_across_files(tmp_path):
    folder = tmp_path / "gpl"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text('{"_id": "1", "title": "", "text": "x"}\n')
    (folder / "gpl-training-data.tsv").write_text("q1\t1\t1\t0.5\nq1\t1\t9\t0.5\n")
    with pytest.raises(GplFormatError, match=r"gpl-training-data\.tsv line 2: passage id '9' is not in corpus"):
        import_gpl(str(folder), ArtifactStore(tmp_path / "run"))


def test_export_leaves_the_held_out_queries_out_and_names_miners_by_model_name(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    write_artifact(store, "corpus", DOCS)
    write_artifact(store, "queries", QUERIES)
    write_artifact(store, "heldout", [q for q in QUERIES if q[0] == "genQ3"])
    write_artifact(store, "queries-train", [q for q in QUERIES if q[0] != "genQ3"])
    snapshot = tmp_path / "hf" / "models--sentence-transformers--msmarco-MiniLM-L-6-v3" / "snapshots" / "abc123"
    mine = tmp_path / "venv" / "my-miner"
    for folder in (snapshot, mine):
        folder.mkdir(parents=True)
    write_artifact(store, "negatives", [("genQ1", str(snapshot), ["d5"], [0.5]), ("genQ1", str(mine), ["d4"], [0.4]),
                                        ("genQ2", "bm25", ["d2"], [1.0])])
    counts = export_gpl(store, str(tmp_path / "gpl"))
    out = tmp_path / "gpl"
    assert counts["qgen-queries.jsonl"] == 3 and counts["qgen-qrels/train.tsv"] == 3
    assert "genQ3" not in (out / "qgen-queries.jsonl").read_text()
    assert "genQ3" not in (out / "qgen-qrels" / "train.tsv").read_text()
    negatives = [json.loads(line) for line in (out / "hard-negatives.jsonl").read_text().splitlines()]
    assert negatives[0]["neg"] == {"sentence-transformers/msmarco-MiniLM-L-6-v3": ["d5"], "my-miner": ["d4"]}
    assert negatives[1]["neg"] == {"bm25": ["d2"]}
    assert str(tmp_path) not in (out / "hard-negatives.jsonl").read_text()


def test_export_writes_the_queries_training_read_the_filters_output_when_the_run_filtered(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    write_artifact(store, "corpus", DOCS)
    write_artifact(store, "queries", QUERIES)
    write_artifact(store, "heldout", [q for q in QUERIES if q[0] == "genQ3"])
    train = write_artifact(store, "queries-train", [q for q in QUERIES if q[0] != "genQ3"])
    kept = [q for q in QUERIES if q[0] in ("genQ1", "genQ4")]
    filtered = write_artifact(store, "queries-filtered", [(*q, 0.5, None, None) for q in kept])
    negatives = [("genQ1", "bm25", ["d3"], [1.0]), ("genQ4", "bm25", ["d5"], [1.0])]
    write_artifact(store, "negatives", negatives, inputs={"queries": filtered.fingerprint})
    export_gpl(store, str(tmp_path / "gpl"))
    lines = (tmp_path / "gpl" / "qgen-queries.jsonl").read_text().splitlines()
    assert [json.loads(line)["_id"] for line in lines] == ["genQ1", "genQ4"]  # genQ2: dropped by the filter
    assert (tmp_path / "gpl" / "qgen-qrels" / "train.tsv").read_text().splitlines()[1:] == ["genQ1\td1\t1",
                                                                                           "genQ4\td2\t1"]
    # a queries-filtered/ that mining did not read (left by an earlier config that filtered) is not exported
    write_artifact(store, "negatives", negatives, inputs={"queries": train.fingerprint})
    export_gpl(store, str(tmp_path / "gpl"), force=True)
    lines = (tmp_path / "gpl" / "qgen-queries.jsonl").read_text().splitlines()
    assert [json.loads(line)["_id"] for line in lines] == ["genQ1", "genQ2", "genQ4"]
