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
pretrains: that row is the pretraining method alone) and the adapted one, on every evaluation the runs made.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
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
    markdown = comparison_markdown(compare.name, rows)
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "comparison.md").write_text(markdown + "\n", encoding="utf-8")
    _publish(compare.name, markdown)
    return {"run_root": root, "rows": rows, "summaries": summaries}


COLUMNS = ("qrels nDCG@10", "held-out nDCG@10", "STS Spearman", "k-means V-measure", "seconds")


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
            rows.append({"method": name, **_values(metrics, label),
                         "seconds": summary.get("seconds") if label == "adapted" else None,
                         "promoted": (metrics.get("promotion") or {}).get("promoted") if label == "adapted" else None})
    return rows


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


def comparison_markdown(name: str, rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [f"## Comparison `{name}`", "", "| method | " + " | ".join(COLUMNS) + " | promoted |",
             "|---" + "|--:" * len(COLUMNS) + "|---|"]
    for row in rows:
        seconds = row.get("seconds")
        lines.append(f"| {row['method']} | " + " | ".join(cell(row.get(c)) for c in COLUMNS[:-1])
                     + f" | {'–' if seconds is None else f'{seconds:.0f}'} | {cell(row.get('promoted'))} |")
    lines += ["", "Each method's run directory holds its full report; the held-out queries are those of each run's "
              "own split (the flows that generate queries share it when their generate settings match)."]
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
