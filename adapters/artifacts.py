"""The artifact contract (DESIGN.md): each artifact's folder name and the Parquet columns of its parts.

One module at the bottom layer, so the stage that writes an artifact, the stages and adapters that read it (the
UKPLab gpl interop), ``gplflow status`` and the tests name the same folders and the same columns.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gplflow.adapters.metrics import METRICS

# Folders under a run directory, one per artifact.
CORPUS = "corpus"                # ingest (or import)
PAIRS = "pairs"                  # flow supervised: a user's labelled pairs
PRETRAIN = "pretrain"            # a sentence-transformers model folder
QUERIES = "queries"              # generate
HELDOUT = "heldout"              # split: the held-out queries
QUERIES_TRAIN = "queries-train"  # split: the queries mining, labelling and training read
QUERIES_FILTERED = "queries-filtered"  # filter: the training queries its rules kept (then read in their place)
NEGATIVES = "negatives"          # mine
TRIPLES = "triples"              # label
MODEL = "model"                  # train: a sentence-transformers model folder
EVALUATE = "evaluate"            # metrics.json and per-query metrics
PROMOTED = "promoted"            # promoted.json: which model the run publishes
CROSS_ENCODER = "cross-encoder"  # flow augmented_sbert: a CrossEncoder folder trained on the gold pairs
SILVER_CANDIDATES = "silver-candidates"  # flow augmented_sbert: unlabelled pairs sampled with BM25 / the bi-encoder
SILVER = "silver"                # flow augmented_sbert: the candidates scored by the cross-encoder

TRAINED = (PRETRAIN, MODEL)  # model folders written by a training loop that keeps checkpoints
ROUNDS = (NEGATIVES, TRIPLES)  # what a re-mining round (train.remine_every) writes again, as <artifact>-round-<r>
_ROUND = re.compile(rf"^(?P<artifact>{'|'.join(ROUNDS)})-round-(?P<round>[0-9]+)$")


def round_artifact(name: str, number: int) -> str:
    """The folder of re-mining round ``number``'s ``negatives`` or ``triples``: ``triples-round-2``."""
    return f"{name}-round-{number}"


def round_of(name: str) -> int | None:
    """The round of a re-mining round's artifact name (``triples-round-2``: 2); None for any other name."""
    match = _ROUND.match(name)
    return int(match["round"]) if match else None

CORPUS_SCHEMA = pa.schema([("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string())])
# doc_id: the passage a query was generated from (its positive)
QUERIES_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("text", pa.string())])
# generate.method llm adds the generator's mean token log-prob of each query (null when the server gave none);
# split carries it into heldout/ and queries-train/. Readers select the columns they need, so both layouts read.
QUERIES_LOGPROB = pa.field("logprob", pa.float32(), nullable=True)
# filter: the queries' columns, then the filter's scores of each kept query (null where that rule is off): the
# share of its words in its source passage, the rank (1 = first) of that passage in the round-trip retriever's
# top K, and the teacher's raw score of (query, source passage), which labelling reuses instead of rescoring
FILTER_SCORES = (pa.field("overlap", pa.float32(), nullable=True),
                 pa.field("round_trip_rank", pa.int32(), nullable=True),
                 pa.field("teacher_score", pa.float32(), nullable=True))
# doc_ids ranked by the retriever, the query's positive removed; scores: the retriever's, in the same order
NEGATIVES_SCHEMA = pa.schema([("query_id", pa.string()), ("retriever", pa.string()),
                              ("doc_ids", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))])
# raw teacher scores; margin = pos_score - neg_score
TRIPLES_SCHEMA = pa.schema([("query_id", pa.string()), ("pos_doc_id", pa.string()), ("neg_doc_id", pa.string()),
                            ("pos_score", pa.float32()), ("neg_score", pa.float32()), ("margin", pa.float32())])
# label.negatives_per_example n > 1: one row per training example, its n negatives and their raw teacher scores in
# the same order (``triples/`` holds TRIPLES_SCHEMA rows when n = 1, so runs made before n existed stay valid)
TUPLES_SCHEMA = pa.schema([("query_id", pa.string()), ("pos_doc_id", pa.string()),
                           ("neg_doc_ids", pa.list_(pa.string())), ("pos_score", pa.float32()),
                           ("neg_scores", pa.list_(pa.float32()))])
SCORED_PAIRS_SCHEMA = pa.schema([("sentence1", pa.string()), ("sentence2", pa.string()), ("score", pa.float32())])
RANKING_PAIRS_SCHEMA = pa.schema([("anchor", pa.string()), ("positive", pa.string()), ("negative", pa.string())])
# sampler: how the pair was found ("bm25" or "semantic"): sentence2 is among sentence1's nearest neighbours
SILVER_CANDIDATES_SCHEMA = pa.schema([("sentence1", pa.string()), ("sentence2", pa.string()),
                                      ("sampler", pa.string())])
# score: the cross-encoder's probability (sigmoid of its logit) in [0, 1], the scale of the gold scores
SILVER_SCHEMA = pa.schema([("sentence1", pa.string()), ("sentence2", pa.string()), ("score", pa.float32()),
                           ("sampler", pa.string())])
# one row per (evaluation, query, model), one column per metric
EVALUATE_SCHEMA = pa.schema([("evaluation", pa.string()), ("query_id", pa.string()), ("model", pa.string()),
                             *[(name, pa.float64()) for name in METRICS]])

SCHEMAS = {CORPUS: CORPUS_SCHEMA, QUERIES: QUERIES_SCHEMA, HELDOUT: QUERIES_SCHEMA, QUERIES_TRAIN: QUERIES_SCHEMA,
           QUERIES_FILTERED: pa.schema([*QUERIES_SCHEMA, *FILTER_SCORES]),
           NEGATIVES: NEGATIVES_SCHEMA, TRIPLES: TRIPLES_SCHEMA, EVALUATE: EVALUATE_SCHEMA,
           SILVER_CANDIDATES: SILVER_CANDIDATES_SCHEMA, SILVER: SILVER_SCHEMA}  # pairs: pairs_schema


def triples_schema(negatives_per_example: int = 1) -> pa.Schema:
    """The ``triples/`` columns: (query, positive, negative) triples for 1 negative per example, n-tuples above."""
    return TRIPLES_SCHEMA if negatives_per_example == 1 else TUPLES_SCHEMA


def negatives_per_example(manifest: dict) -> int:
    """How many negatives each row of a ``triples/`` artifact holds (its manifest says; 1 for triples)."""
    return int(manifest.get("negatives_per_example", 1))


def check_triples(table: pa.Table, negatives_per_example: int, where: str) -> pa.Table:
    """``table`` (read from ``triples/``) with the columns and types its ``negatives_per_example`` calls for, each
    row holding that many negatives and scores; else a ValueError naming the first problem."""
    schema = triples_schema(negatives_per_example)
    found = {f.name: f.type for f in table.schema}
    for field in schema:
        if field.name in found and found[field.name] != field.type:
            raise ValueError(f"{where}: column {field.name} is {found[field.name]}, expected {field.type}")
    if missing := [name for name in table.column_names if name not in schema.names]:
        raise ValueError(f"{where}: unexpected columns {missing} for {negatives_per_example} negative(s) per example")
    if negatives_per_example > 1:
        for name in ("neg_doc_ids", "neg_scores"):
            if name in found:
                lengths = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
                if (bad := np.flatnonzero(lengths != negatives_per_example)).size:
                    raise ValueError(f"{where}: row {int(bad[0])} holds {int(lengths[bad[0]])} {name}, expected "
                                     f"{negatives_per_example} (label.negatives_per_example)")
    return table


def queries_schema(logprob: bool = False) -> pa.Schema:
    """The ``queries/`` columns (and ``heldout/``, ``queries-train/``): with the ``logprob`` column or without."""
    return QUERIES_SCHEMA.append(QUERIES_LOGPROB) if logprob else QUERIES_SCHEMA


def filtered_schema(logprob: bool = False) -> pa.Schema:
    """The ``queries-filtered/`` columns: those of the queries it read (with or without ``logprob``), then the
    filter's scores."""
    return pa.schema([*queries_schema(logprob), *FILTER_SCORES])


def pairs_schema(kind: str, with_negative: bool = True) -> pa.Schema:
    """The ``pairs/`` columns: scored pairs, or ranking pairs with (or without) the negative column."""
    if kind == "scored":
        return SCORED_PAIRS_SCHEMA
    return RANKING_PAIRS_SCHEMA if with_negative else pa.schema(list(RANKING_PAIRS_SCHEMA)[:2])
