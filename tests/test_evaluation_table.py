"""metrics.json as one table (``tasks/evaluation_table.py``): the CLI, the report and the Prefect table render it."""

from __future__ import annotations

from gplflow.adapters import metrics as trec
from gplflow.tasks.evaluation_table import metrics_table


def _results(base: float, adapted: float, **more: float) -> dict:
    models = {"base": {m: base for m in trec.METRICS}, "adapted": {m: adapted for m in trec.METRICS},
              **{label: {m: value for m in trec.METRICS} for label, value in more.items()}}
    return {"models": models, "delta": trec.delta(models["adapted"], models["base"]),
            "counts": {"queries": 5, "docs": 9}}


METRICS = {"evaluations": {"heldout": _results(0.7, 0.6), "qrels": _results(0.3, 0.5, pretrained=0.35, zeta=0.1)},
           "primary_evaluation": "qrels", "primary_metric": "ndcg@10"}


def test_columns_rows_and_notes_in_one_order():
    table = metrics_table(METRICS)
    assert [c.title for c in table.columns] == [
        "qrels base", "qrels pretrained", "qrels adapted", "qrels zeta", "qrels adapted − base",
        "held-out base", "held-out adapted", "held-out adapted − base"]
    assert [metric for metric, _ in table.rows] == ["ndcg@10", "map@100", "recall@100", "mrr@10"]
    assert table.text_rows()[0] == ("ndcg@10", ["0.3000", "0.3500", "0.5000", "0.1000", "+0.2000",
                                                "0.7000", "0.6000", "-0.1000"])
    assert [tuple(e) for e in table.evaluated] == [("qrels", "judged queries", 5, 9),
                                                   ("held-out", "held-out synthetic queries, never trained on", 5, 9)]
    assert table.primary == "qrels ndcg@10"


def test_verdict_on_the_primary_evaluation():
    table = metrics_table(METRICS)
    assert (table.verdict, table.beats) == ("The adapted model beats its base on qrels nDCG@10 (+0.2000).", True)
    heldout = metrics_table({**METRICS, "primary_evaluation": "heldout"})
    assert (heldout.verdict, heldout.beats) == (
        "The adapted model does NOT beat its base on held-out nDCG@10 (-0.1000).", False)
    only_sts = metrics_table({"evaluations": {}, "primary_evaluation": None})
    assert (only_sts.columns, only_sts.verdict, only_sts.primary) == ([], None, None)


def test_records_are_the_prefect_table_rows():
    rows = metrics_table({**METRICS, "evaluations": {"qrels": _results(0.3, 0.5)}}, shown=trec.METRICS).records()
    assert [(r["evaluation"], r["model"]) for r in rows] == [("qrels", "base"), ("qrels", "adapted"),
                                                             ("qrels", "adapted − base")]
    assert rows[2] == {"evaluation": "qrels", "model": "adapted − base", **{trec.DISPLAY[m]: 0.2 for m in trec.METRICS}}


def test_the_cli_table_keeps_metric_names_whole_on_an_80_column_terminal():
    from rich.console import Console

    from gplflow.flows.cli import metrics_table as cli_table

    two = {**METRICS, "evaluations": {"qrels": _results(0.3, 0.5), "heldout": _results(0.7, 0.6)}}
    console = Console(width=80, record=True)
    console.print(cli_table(two))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert {line.split()[1] for line in lines if line.startswith("│ ")} == {"ndcg@10", "map@100", "recall@100",
                                                                          "mrr@10"}
    assert len(cli_table({"evaluations": {}, "primary_evaluation": None}).columns) == 1  # no retrieval: no rows
