"""``metrics.json`` as one table: its columns, rows, notes and verdict, which the CLI summary (rich), the run
report (markdown) and the evaluate stage's Prefect table artifact only render, so all three show the same numbers
in the same order and say the same thing about them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from gplflow.adapters import metrics as trec

SHOWN = ("ndcg@10", "map@100", "recall@100", "mrr@10")  # the rows of the CLI summary and the report
# evaluation -> (its label in a column title, what its queries are); in the order the columns show them
LABELS = {"qrels": ("qrels", "judged queries"), "heldout": ("held-out", "held-out synthetic queries, never trained on")}
MODEL_ORDER = ("base", "pretrained", "adapted")  # then any other model label, sorted
DELTA = "adapted − base"


def ordered_models(results: dict[str, Any]) -> list[str]:
    """The models of one evaluation in column order: base, pretrained, adapted, then any other label (sorted)."""
    return sorted(results.get("models", {}), key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else 9, m))


class Column(NamedTuple):
    evaluation: str  # qrels | heldout
    model: str | None  # a model label; None: adapted − base

    @property
    def title(self) -> str:
        return f"{LABELS[self.evaluation][0]} {self.model or DELTA}"


class Evaluated(NamedTuple):
    """What one evaluation ran on."""

    label: str  # qrels | held-out
    what: str  # judged queries | held-out synthetic queries, never trained on
    queries: Any  # a count ('?' when metrics.json does not say)
    docs: Any


@dataclass(frozen=True)
class MetricsTable:
    columns: list[Column]
    rows: list[tuple[str, list[float | None]]]  # (metric, its value in each column; None: not measured)
    evaluated: list[Evaluated]
    primary: str | None  # "qrels ndcg@10": the evaluation and metric that decide the verdict and the promotion
    verdict: str | None  # "The adapted model beats its base on qrels nDCG@10 (+0.0507)."; None: no delta
    beats: bool  # whether the verdict is good news

    def text_rows(self) -> list[tuple[str, list[str]]]:
        """The rows as the CLI and the report print them: a signed delta, a plain metric, or – when missing."""
        return [(metric, ["–" if v is None else f"{v:+.4f}" if c.model is None else f"{v:.4f}"
                          for c, v in zip(self.columns, values, strict=True)]) for metric, values in self.rows]

    def records(self) -> list[dict[str, Any]]:
        """One dict per column (a model or the delta of one evaluation), metrics under their display names,
        rounded: the rows of a Prefect table artifact."""
        return [{"evaluation": column.evaluation, "model": column.model or DELTA,
                 **{trec.DISPLAY[metric]: round(values[i], 4) for metric, values in self.rows
                    if values[i] is not None}}
                for i, column in enumerate(self.columns)]


def metrics_table(metrics: dict[str, Any], shown: tuple[str, ...] = SHOWN) -> MetricsTable:
    """The table of a ``metrics.json`` (``tasks/evaluate.py``): per evaluation (qrels, then held-out) a column per
    model and one for adapted − base, a row per metric of ``shown``, and the verdict on the primary evaluation."""
    found = {name: metrics["evaluations"][name] for name in LABELS if name in metrics.get("evaluations", {})}
    columns = [Column(name, model) for name, results in found.items() for model in [*ordered_models(results), None]]
    rows = [(metric, [_value(found[c.evaluation], c.model, metric) for c in columns]) for metric in shown]
    evaluated = [Evaluated(*LABELS[name], r.get("counts", {}).get("queries", "?"), r.get("counts", {}).get("docs", "?"))
                 for name, r in found.items()]
    name = metrics.get("primary_evaluation")
    primary = f"{LABELS[name][0]} {metrics.get('primary_metric', trec.PRIMARY)}" if name in found else None
    delta = found[name].get("delta", {}).get(trec.PRIMARY) if name in found else None
    verdict = None if delta is None else (
        f"The adapted model {'beats' if delta > 0 else 'does NOT beat'} its base on {LABELS[name][0]} "
        f"{trec.DISPLAY[trec.PRIMARY]} ({delta:+.4f}).")
    return MetricsTable(columns, rows, evaluated, primary, verdict, delta is not None and delta > 0)


def _value(results: dict[str, Any], model: str | None, metric: str) -> float | None:
    return results["models"][model].get(metric) if model else results.get("delta", {}).get(metric)
