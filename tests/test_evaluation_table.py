"""metrics.json as one table (``tasks/evaluation_table.py``): the CLI, the report and the Prefect table render it."""

from __future__ import annotations

from gplflow.adapters import metrics as trec
from gplflow.tasks.evaluation_table import judged_note, metrics_table, significance_rows
from gplflow.tasks.significance import compare


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


def test_significance_rows_list_each_compared_model_per_evaluation_in_order():
    gain = compare([0.2, 0.4, 0.6, 0.8] * 5, [0.3, 0.5, 0.7, 0.9] * 5, resamples=200)
    noise = compare([0.5, 0.6, 0.7], [0.6, 0.5, 0.7], resamples=200)
    metrics = {"evaluations": {"teacher": {"comparisons": {"adapted": noise}},
                               "qrels": {"comparisons": {"adapted": gain, "pretrained": noise}},
                               "heldout_low_overlap": {"comparisons": {"adapted": compare([], [])}}}}
    rows = significance_rows(metrics)
    assert [row[:3] for row in rows] == [("qrels", "pretrained", "3"), ("qrels", "adapted", "20"),
                                         ("teacher", "adapted", "3")]  # the empty subset is left out
    assert rows[1][3:] == ("0.5000", "0.6000", "+0.1000", "+0.100..+0.100", f"{gain['p_value']:.2g}", "better")
    assert rows[0][-1].startswith("inconclusive")
    only_sts = metrics_table({"evaluations": {}, "primary_evaluation": None})
    assert (only_sts.columns, only_sts.primary, significance_rows({"evaluations": {}})) == ([], None, [])
    assert judged_note(metrics) is None  # no counts: the teacher-judged evaluation did not run


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
