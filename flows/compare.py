"""``gplflow compare``: several methods on one corpus, in sibling run directories, judged by one evaluation.

A compare file names a base pipeline config and the methods, each a name and ``--set``-style overrides of
that config::

    name: compare-demo
    base: demo.yaml                 # relative to this file
    methods:
      - {name: gpl}
      - {name: genq, set: [flow=genq, train.loss=mnrl]}
      - {name: tsdae+gpl, set: [pretrain.method=tsdae]}

Each method runs the usual pipeline into ``<run root>/<method>`` (default run root: ``runs/<name>``). A stage
whose artifact an earlier method already published with the same fingerprint (the corpus, the queries, the
negatives and triples GPL variants share) is adopted from that sibling rather than computed again. The table
puts every method's models side by side: the base once, then per method the pretrained model (when the method
pretrains: that row is the pretraining method alone) and the adapted one, on every evaluation the runs made,
with each model's gain over the base on the qrels (interval, p-value) and its verdicts with and without qrels.

Below it, the agreement section: for each signal a run has without qrels (held-out queries, those of them with
little word overlap with their passage, teacher-judged), how well it agrees with the qrels over the compared
models: the share of model pairs it orders as the qrels do, Kendall's tau between the two rankings, and how
often its verdict against the base matches the qrels' (and how often it says the opposite: better for worse).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gplflow.flows.config import _PATH_KEYS, ConfigError, PipelineConfig

logger = logging.getLogger(__name__)


class Method(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    set: tuple[str, ...] = ()  # overrides of the base config, as `--set` takes them

    @field_validator("name")
    @classmethod
    def _plain(cls, name: str) -> str:
        if name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
            raise ValueError(f"{name!r} must be a plain folder name: it names the method's run directory")
        return name


class CompareConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "compare"
    base: str  # the pipeline config every method starts from (relative to the compare file)
    methods: tuple[Method, ...] = Field(min_length=1)

    @field_validator("methods")
    @classmethod
    def _unique(cls, methods: tuple[Method, ...]) -> tuple[Method, ...]:
        names = [m.name for m in methods]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"method names must be unique; repeated: {', '.join(dupes)}")
        return methods

    @classmethod
    def load(cls, path: str | Path) -> CompareConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: compare file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            found = cls.model_validate(data)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from err
        except ValidationError as err:
            raise ConfigError(f"{path}: " + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in err.errors())) from err
        base = Path(found.base)
        methods = tuple(m.model_copy(update={"set": tuple(_resolved(item, path.parent) for item in m.set)})
                        for m in found.methods)
        return found.model_copy(update={"base": str(base if base.is_absolute() else (path.parent / base).resolve()),
                                        "methods": methods})

    def method_configs(self) -> Iterator[tuple[Method, PipelineConfig, list[str]]]:
        """Each method's pipeline config (named ``<compare name>-<method>``), checked before anything runs."""
        for method in self.methods:
            overrides = [*method.set, f"name={self.name}-{method.name}"]
            try:
                yield method, PipelineConfig.load(self.base, overrides), overrides
            except ConfigError as err:
                raise ConfigError(f"method {method.name}: {err}") from err


def _resolved(item: str, folder: Path) -> str:
    """A path override (``pairs.path=../data/x.tsv``) is relative to the compare file, as paths in a config."""
    key, sep, value = item.partition("=")
    if sep and key.strip() in _PATH_KEYS and "://" not in value and not Path(value).is_absolute():
        return f"{key}={(folder / value).resolve()}"
    return item


def run_compare(config_path: str | Path, run_root: str | None = None) -> dict[str, Any]:
    """Run every method (later ones adopting the artifacts earlier ones share); returns the table and summaries."""
    from gplflow.flows.pipeline import run_pipeline
    from gplflow.flows.validate import validate_run

    compare = CompareConfig.load(config_path)
    root = run_root or str(Path("runs") / compare.name)
    methods = list(compare.method_configs())
    for method, cfg, overrides in methods:  # every method's models and files, before the first one computes
        validate_run(cfg, f"{root}/{method.name}", compare.base, overrides)
    summaries, done = {}, []
    for method, cfg, overrides in methods:
        logger.info("compare %s: method %s (%d of %d)", compare.name, method.name, len(done) + 1, len(methods))
        run_dir = f"{root}/{method.name}"
        summaries[method.name] = run_pipeline(cfg, run_dir, compare.base, overrides, reuse_from=list(done))
        done.append(run_dir)
    rows = comparison_rows(summaries)
    agreement = agreement_rows(rows)
    markdown = comparison_markdown(compare.name, rows, agreement)
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "comparison.md").write_text(markdown + "\n", encoding="utf-8")
    _publish(compare.name, markdown)
    return {"run_root": root, "rows": rows, "agreement": agreement, "summaries": summaries}


COLUMNS = ("qrels nDCG@10", "held-out nDCG@10", "STS Spearman", "k-means V-measure", "seconds")
VERDICT_COLUMNS = ("qrels gain (95% CI), p", "verdict: qrels / without")
SIGNALS = {"heldout": "held-out", "heldout_low_overlap": "held-out low-overlap", "teacher": "teacher-judged"}
AGREEMENT_COLUMNS = ("signal", "models", "pairs ordered as qrels", "Kendall tau", "verdicts as qrels",
                     "opposite verdicts")


def comparison_rows(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: the base once (from the first method that evaluated it), then each method's
    pretrained model (when it has one) and adapted model."""
    rows: list[dict[str, Any]] = []
    for method, summary in summaries.items():
        metrics = summary.get("metrics") or {}
        labels = ["base"] if not rows else []
        labels += [label for label in ("pretrained", "adapted") if _has(metrics, label)]
        for label in labels:
            name = "base" if label == "base" else f"{method} (pretraining only)" if label == "pretrained" else method
            rows.append({"method": name, **_values(metrics, label), **_verdicts(metrics, label),
                         "seconds": summary.get("seconds") if label == "adapted" else None,
                         "promoted": (metrics.get("promotion") or {}).get("promoted") if label == "adapted" else None})
    return rows


def _verdicts(metrics: dict[str, Any], label: str) -> dict[str, Any]:
    """A model's nDCG@10 on each evaluation (``ndcg``), its verdict against the base on each (``verdicts``, with
    ``no_qrels``: the consensus of the held-out signals) and the two text columns; nothing more for the base."""
    from gplflow.tasks.promote import consensus

    evaluations = metrics.get("evaluations") or {}
    ndcg = {name: (found.get("models", {}).get(label) or {}).get("ndcg@10") for name, found in evaluations.items()}
    if label == "base":
        return {"ndcg": ndcg, "verdicts": {}}
    compared = {name: found["comparisons"][label] for name, found in evaluations.items()
                if label in found.get("comparisons", {}) and found["comparisons"][label].get("n")}
    verdicts = {name: c["verdict"] for name, c in compared.items()}
    signals = {name: c for name, c in compared.items() if name in SIGNALS}
    if signals:
        verdicts["no_qrels"] = consensus(signals)["verdict"]
    q = compared.get("qrels")
    gain = f"{q['gain']:+.4f} ({q['ci'][0]:+.3f}, {q['ci'][1]:+.3f}), p {q['p_value']:.2g}" if q else None
    said = f"{verdicts.get('qrels', '–')} / {verdicts.get('no_qrels', '–')}" if verdicts else None
    return {"ndcg": ndcg, "verdicts": verdicts, VERDICT_COLUMNS[0]: gain, VERDICT_COLUMNS[1]: said}


def agreement_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """For each no-qrels signal (and the no-qrels verdict), its agreement with the qrels over the models that
    have both (text cells of ``AGREEMENT_COLUMNS``); signals no model has are left out."""
    found = []
    for name, label in [*SIGNALS.items(), ("no_qrels", "verdict without qrels")]:
        pairs = [(r["ndcg"]["qrels"], r["ndcg"][name]) for r in rows
                 if r.get("ndcg", {}).get("qrels") is not None and r.get("ndcg", {}).get(name) is not None]
        said = [(r["verdicts"]["qrels"], r["verdicts"][name]) for r in rows
                if "qrels" in r.get("verdicts", {}) and name in r.get("verdicts", {})]
        if len(pairs) < 2 and not said:
            continue
        ordered, tau = rank_agreement([p[0] for p in pairs], [p[1] for p in pairs])
        matching = sum(a == b for a, b in said)
        opposite = sum({a, b} == {"better", "worse"} for a, b in said)
        found.append({"signal": label, "models": str(len(pairs)) if pairs else "–",
                      "pairs ordered as qrels": "–" if ordered is None else f"{ordered:.0%}",
                      "Kendall tau": "–" if tau is None else f"{tau:+.2f}",
                      "verdicts as qrels": f"{matching} of {len(said)}" if said else "–",
                      "opposite verdicts": str(opposite) if said else "–"})
    return found


def rank_agreement(reference: list[float], other: list[float]) -> tuple[float | None, float | None]:
    """The share of pairs ``other`` orders as ``reference`` does (a tie in either counts as not ordered alike),
    and Kendall's tau-b between them; (None, None) with fewer than two items."""
    concordant = discordant = ties_ref = ties_other = 0
    for i, j in combinations(range(len(reference)), 2):
        a, b = reference[i] - reference[j], other[i] - other[j]
        ties_ref += a == 0
        ties_other += b == 0
        concordant += a * b > 0
        discordant += a * b < 0
    total = len(reference) * (len(reference) - 1) // 2
    if not total:
        return None, None
    denominator = math.sqrt((total - ties_ref) * (total - ties_other))
    return concordant / total, (concordant - discordant) / denominator if denominator else None


def _has(metrics: dict[str, Any], label: str) -> bool:
    return any(label in found.get("models", {}) for found in
               [*metrics.get("evaluations", {}).values(), *(metrics.get(k) or {} for k in ("sts", "clustering"))])


def _values(metrics: dict[str, Any], label: str) -> dict[str, float | None]:
    def retrieval(name: str) -> float | None:
        return ((metrics.get("evaluations") or {}).get(name, {}).get("models", {}).get(label) or {}).get("ndcg@10")

    sts = ((metrics.get("sts") or {}).get("models") or {}).get(label) or {}
    clustering = ((metrics.get("clustering") or {}).get("models") or {}).get(label) or {}
    return {"qrels nDCG@10": retrieval("qrels"), "held-out nDCG@10": retrieval("heldout"),
            "STS Spearman": sts.get("spearman"), "k-means V-measure": (clustering.get("kmeans") or {}).get("v_measure")}


def comparison_markdown(name: str, rows: list[dict[str, Any]], agreement: list[dict[str, str]] = ()) -> str:
    def cell(value: Any) -> str:
        return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [f"## Comparison `{name}`", "",
             "| method | " + " | ".join((*COLUMNS, *VERDICT_COLUMNS)) + " | promoted |",
             "|---" + "|--:" * len(COLUMNS) + "|---" * len(VERDICT_COLUMNS) + "|---|"]
    for row in rows:
        seconds = row.get("seconds")
        lines.append(f"| {row['method']} | " + " | ".join(cell(row.get(c)) for c in COLUMNS[:-1])
                     + f" | {'–' if seconds is None else f'{seconds:.0f}'} | "
                     + " | ".join(cell(row.get(c)) for c in VERDICT_COLUMNS) + f" | {cell(row.get('promoted'))} |")
    lines += ["", "Each method's run directory holds its full report; the held-out queries are those of each run's "
              "own split (the flows that generate queries share it when their generate settings match). Gains and "
              "verdicts are against the base on per-query nDCG@10 (paired bootstrap interval, sign-flip p-value); "
              "a verdict is better, worse or inconclusive."]
    if agreement:
        lines += ["", "### Agreement with the qrels, without them", "",
                  "| " + " | ".join(AGREEMENT_COLUMNS) + " |", "|---" + "|--:" * (len(AGREEMENT_COLUMNS) - 1) + "|",
                  *("| " + " | ".join(row[c] for c in AGREEMENT_COLUMNS) + " |" for row in agreement), "",
                  "Over the compared models (the base once, each method's pretrained and adapted models): the share "
                  "of model pairs a signal orders as the qrels do, Kendall's tau-b of the two rankings, and how often "
                  "its verdict against the base is the qrels' verdict (opposite: one says better, the other worse). "
                  "Each run judges its own pool of passages, so teacher-judged figures of different runs are "
                  "compared across slightly different pools."]
    return "\n".join(lines)


def _publish(name: str, markdown: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    from gplflow.flows.report import artifact_key

    create_markdown_artifact(markdown=markdown, key=artifact_key("gplflow-compare", name),
                             description=f"gplflow compare {name}: every method on one evaluation")


@flow(name="gplflow-compare", flow_run_name="compare-{config_path}")
def compare_pipeline(config_path: str, run_root: str | None = None) -> dict[str, Any]:
    """Run several methods on one corpus into sibling run directories and publish one comparison table."""
    return run_compare(config_path, run_root)
