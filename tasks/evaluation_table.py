"""``metrics.json`` as tables: the metrics side by side (``metrics_table``) and each model's paired comparison with
the base (``significance_rows``), which the CLI summary (rich), the run report (markdown) and the evaluate stage's
Prefect table artifact only render, so all show the same numbers in the same order. The verdict in words is
``tasks/promote.py``'s ``verdict_lines``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from gplflow.adapters import metrics as trec

SHOWN = ("ndcg@10", "map@100", "recall@100", "mrr@10")  # the rows of the CLI summary and the report
# evaluation -> (its label in a column title, what its queries are); in the order the columns show them
LABELS = {"qrels": ("qrels", "judged queries"), "heldout": ("held-out", "held-out synthetic queries, never trained on")}
# every evaluation with a comparison, in the order the significance table lists them, with its label there
COMPARED = {"qrels": "qrels", "heldout": "held-out", "heldout_low_overlap": "low-overlap", "teacher": "teacher"}
SIGNIFICANCE_COLUMNS = ("evaluation", "model", "n", "base", "nDCG@10", "gain", "CI", "p", "verdict")
BRIEF = (0, 1, 2, 5, 6, 7, 8)  # the columns a narrow terminal shows (the metrics table above has the nDCG values)
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
    model and one for adapted − base, a row per metric of ``shown``, and the primary evaluation."""
    found = {name: metrics["evaluations"][name] for name in LABELS if name in metrics.get("evaluations", {})}
    columns = [Column(name, model) for name, results in found.items() for model in [*ordered_models(results), None]]
    rows = [(metric, [_value(found[c.evaluation], c.model, metric) for c in columns]) for metric in shown]
    evaluated = [Evaluated(*LABELS[name], r.get("counts", {}).get("queries", "?"), r.get("counts", {}).get("docs", "?"))
                 for name, r in found.items()]
    name = metrics.get("primary_evaluation")
    primary = f"{LABELS[name][0]} {metrics.get('primary_metric', trec.PRIMARY)}" if name in found else None
    return MetricsTable(columns, rows, evaluated, primary)


def significance_rows(metrics: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row of text per (evaluation, model compared with the base), in ``SIGNIFICANCE_COLUMNS`` order: the
    queries compared, base and model nDCG@10, the gain, its interval (at ``evaluate.alpha``: 95% by default), the
    p-value and the verdict (with the queries a resolving test would need when inconclusive)."""
    rows = []
    for name, label in COMPARED.items():
        results = (metrics.get("evaluations") or {}).get(name) or {}
        for model in ordered_models({"models": results.get("comparisons", {})}):
            c = results["comparisons"][model]
            if not c.get("n"):
                continue
            more = f" (~{c['queries_needed']} q)" if c["verdict"] == "inconclusive" and (
                c.get("queries_needed") or 0) > c["n"] else ""
            rows.append((label, model, str(c["n"]), f"{c['base']:.4f}", f"{c['adapted']:.4f}", f"{c['gain']:+.4f}",
                         f"{c['ci'][0]:+.3f}..{c['ci'][1]:+.3f}", f"{c['p_value']:.2g}",
                         c["verdict"] + more))
    return rows


def _value(results: dict[str, Any], model: str | None, metric: str) -> float | None:
    return results["models"][model].get(metric) if model else results.get("delta", {}).get(metric)


def judged_note(metrics: dict[str, Any]) -> str | None:
    """What the teacher-judged evaluation is and what it is not, in one sentence (None when it did not run)."""
    found = ((metrics.get("evaluations") or {}).get("teacher") or {}).get("counts")
    if not found:
        return None
    who = "the run's teacher" if found.get("judge_is_teacher") else "the judge (evaluate.judge)"
    return (f"teacher-judged: {who}, {found['judge_kind'].replace('_', '-')} {found['judge']}, graded the top "
            f"{found['depth']} passages of every model on {found['heldout_queries']} held-out queries "
            f"({found['pooled_pairs']} pooled pairs, {found['pairs_scored']} scored, {found['reused_from_triples']} "
            "reused from labelling); it measures fidelity to that model, not truth: the adapted model was trained "
            "to imitate the teacher")
