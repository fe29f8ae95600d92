"""Retrieval metrics with ``pytrec_eval``, computed as BEIR's ``EvaluateRetrieval`` does.

- nDCG@k, MAP@100 and Recall@100 are trec_eval's ``ndcg_cut``, ``map_cut`` and ``recall``: graded
  relevance with linear gain (DCG@k = sum over ranks i <= k of rel_i / log2(i + 1)), a document is relevant
  when its judged score is >= 1, and ties in the run are broken by document id, descending (trec_eval's
  order).
- MRR@10 is trec_eval's ``recip_rank`` over the run cut to its top 10 in that same order: 1 / rank of the
  first relevant document within the top 10, else 0. This equals BEIR's ``custom_metrics.mrr``.
- Like BEIR (``ignore_identical_ids=True``), a retrieved document whose id equals the query id is dropped
  before scoring.

Scores are per query; ``mean_metrics`` averages over every judged query. A judged query with no retrieved
document scores 0 on every metric (pytrec_eval would leave it out of its output; BEIR then divides by the
number of queries it did return).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytrec_eval

# Our name -> trec_eval's measure name in the evaluator output.
_FULL_RUN = {"ndcg@1": "ndcg_cut_1", "ndcg@5": "ndcg_cut_5", "ndcg@10": "ndcg_cut_10",
             "map@100": "map_cut_100", "recall@100": "recall_100"}
_FULL_RUN_MEASURES = {"ndcg_cut.1,5,10", "map_cut.100", "recall.100"}
MRR_DEPTH = 10
METRICS = ("ndcg@10", "map@100", "recall@100", "mrr@10", "ndcg@1", "ndcg@5")
PRIMARY = "ndcg@10"
DISPLAY = {"ndcg@10": "nDCG@10", "map@100": "MAP@100", "recall@100": "Recall@100", "mrr@10": "MRR@10",
           "ndcg@1": "nDCG@1", "ndcg@5": "nDCG@5"}

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def evaluate_run(qrels: Qrels, run: Run, ignore_identical_ids: bool = True) -> dict[str, dict[str, float]]:
    """``{query_id: {metric: value}}`` for every judged query (see the module docstring)."""
    qrels = {qid: {did: int(s) for did, s in docs.items()} for qid, docs in qrels.items()}
    run = {
        qid: {did: float(s) for did, s in docs.items() if not (ignore_identical_ids and did == qid)}
        for qid, docs in run.items()
        if qid in qrels
    }
    full = pytrec_eval.RelevanceEvaluator(qrels, _FULL_RUN_MEASURES).evaluate(run)
    top = {qid: dict(trec_order(docs)[:MRR_DEPTH]) for qid, docs in run.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top)
    out = {}
    for qid in qrels:
        scores = full.get(qid, {})
        row = {name: float(scores.get(measure, 0.0)) for name, measure in _FULL_RUN.items()}
        row["mrr@10"] = float(mrr.get(qid, {}).get("recip_rank", 0.0))
        out[qid] = {name: row[name] for name in METRICS}
    return out


def trec_order(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """A run's documents in trec_eval's order: score descending, ties by document id descending."""
    return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The mean of each metric over the queries."""
    if not per_query:
        raise ValueError("no queries to average metrics over")
    return {name: float(np.mean([row[name] for row in per_query.values()])) for name in METRICS}


def delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """``after - before`` for each metric both have."""
    return {name: float(after[name] - before[name]) for name in METRICS if name in after and name in before}

