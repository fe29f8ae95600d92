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
from typing import Any, NamedTuple

import numpy as np
import yaml
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gplflow.flows.config import _PATH_KEYS, ConfigError, PipelineConfig
from gplflow.tasks.base import Seed

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


SEED_KEYS = ("generate.seed", "label.seed", "train.seed")  # what a seed of `seeds` sets: queries, triples, training


class CompareConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "compare"
    base: str  # the pipeline config every method starts from (relative to the compare file)
    methods: tuple[Method, ...] = Field(min_length=1)
    seeds: tuple[Seed, ...] = ()  # each method once per seed (empty: once, with the seeds its config has)
    seed_keys: tuple[str, ...] = Field(default=SEED_KEYS, min_length=1)  # the config keys a seed is set to

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct; got {', '.join(map(str, seeds))}")
        return seeds

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

    def method_configs(self, seed: int | None = None) -> Iterator[tuple[Method, PipelineConfig, list[str]]]:
        """Each method's pipeline config (named ``<compare name>-<method>``, with ``-seed<N>`` and every one of
        ``seed_keys`` set to ``seed`` when given, after the method's own overrides), checked before anything runs."""
        for method in self.methods:
            seeded = [f"{key}={seed}" for key in self.seed_keys] if seed is not None else []
            suffix = f"-seed{seed}" if seed is not None else ""
            overrides = [*method.set, *seeded, f"name={self.name}-{method.name}{suffix}"]
            try:
                yield method, PipelineConfig.load(self.base, overrides), overrides
            except ConfigError as err:
                raise ConfigError(f"method {method.name}{f' (seed {seed})' if seed is not None else ''}: "
                                  f"{err}") from err

    def runs(self, root: str, seeds: tuple[int, ...] | None = None) -> list[MethodRun]:
        """Every run, in the order they go: each seed in turn (all methods of a seed before the next seed), into
        ``<root>/seed-<N>/<method>``; without seeds, each method once into ``<root>/<method>``."""
        seeds = self.seeds if seeds is None else seeds
        if not seeds:
            return [MethodRun(m.name, None, cfg, o, f"{root}/{m.name}") for m, cfg, o in self.method_configs()]
        return [MethodRun(m.name, seed, cfg, o, f"{root}/seed-{seed}/{m.name}")
                for seed in seeds for m, cfg, o in self.method_configs(seed)]


class MethodRun(NamedTuple):
    """One pipeline run of a compare: a method, at a seed or as configured, and its run directory."""

    method: str
    seed: int | None
    cfg: PipelineConfig
    overrides: list[str]
    run_dir: str

    @property
    def label(self) -> str:
        return self.method if self.seed is None else f"{self.method} (seed {self.seed})"


def _resolved(item: str, folder: Path) -> str:
    """A path override (``pairs.path=../data/x.tsv``) is relative to the compare file, as paths in a config."""
    key, sep, value = item.partition("=")
    if sep and key.strip() in _PATH_KEYS and "://" not in value and not Path(value).is_absolute():
        return f"{key}={(folder / value).resolve()}"
    return item


COLUMNS = ("qrels nDCG@10", "held-out nDCG@10", "STS Spearman", "k-means V-measure", "seconds")
VERDICT_COLUMNS = ("qrels gain (95% CI), p", "verdict: qrels / without")
SIGNALS = {"heldout": "held-out", "heldout_low_overlap": "held-out low-overlap", "teacher": "teacher-judged"}
AGREEMENT_COLUMNS = ("signal", "models", "pairs ordered as qrels", "Kendall tau", "verdicts as qrels",
                     "opposite verdicts")
SEED_COLUMNS = (*COLUMNS[:-1], "training queries", "seconds")


def run_compare(config_path: str | Path, run_root: str | None = None,
                seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Run every method (later ones adopting the artifacts earlier ones share), once or once per seed (``seeds``:
    the compare file's ``seeds`` when None); returns the table and summaries.

    With seeds, each seed's runs make a comparison of their own (``<root>/seed-<N>/comparison.md``) and
    ``<root>/comparison.md`` shows each method's mean and spread over the seeds."""
    from gplflow.flows.pipeline import run_pipeline
    from gplflow.flows.validate import validate_run

    compare = CompareConfig.load(config_path)
    root = run_root or str(Path("runs") / compare.name)
    runs = compare.runs(root, seeds)
    for run in runs:  # every method's models and files, before the first one computes
        validate_run(run.cfg, run.run_dir, compare.base, run.overrides)
    summaries: dict[tuple[int | None, str], dict[str, Any]] = {}
    done: list[str] = []
    for run in runs:
        logger.info("compare %s: %s (%d of %d)", compare.name, run.label, len(done) + 1, len(runs))
        summaries[run.seed, run.method] = run_pipeline(run.cfg, run.run_dir, compare.base, run.overrides,
                                                       reuse_from=list(done))
        done.append(run.run_dir)
    by_seed: dict[int | None, dict[str, dict[str, Any]]] = {}
    for (seed, method), summary in summaries.items():
        by_seed.setdefault(seed, {})[method] = summary
    results = {}
    for seed, found in by_seed.items():
        rows = comparison_rows(found)
        for row in rows:
            row["training queries"] = _training_queries(found, row["method"])
        agreement = agreement_rows(rows)
        folder = Path(root) if seed is None else Path(root) / f"seed-{seed}"
        title = compare.name if seed is None else f"{compare.name}, seed {seed}"
        markdown = comparison_markdown(title, rows, agreement)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "comparison.md").write_text(markdown + "\n", encoding="utf-8")
        results[seed] = {"rows": rows, "agreement": agreement, "markdown": markdown}
    if None in results:
        _publish(compare.name, results[None]["markdown"])
        return {"run_root": root, "rows": results[None]["rows"], "agreement": results[None]["agreement"],
                "summaries": by_seed[None]}
    spread = seed_rows({seed: found["rows"] for seed, found in results.items()})
    markdown = seeds_markdown(compare.name, list(results), spread)
    (Path(root) / "comparison.md").write_text(markdown + "\n", encoding="utf-8")
    _publish(compare.name, markdown)
    return {"run_root": root, "seeds": list(results), "seed_rows": spread,
            "per_seed": {seed: found["rows"] for seed, found in results.items()},
            "summaries": {f"{method}@{seed}": s for (seed, method), s in summaries.items()}}


def _training_queries(summaries: dict[str, dict[str, Any]], row_method: str) -> int | None:
    """How many queries the adapted model of a method was trained on (what the filter kept, when it filtered)."""
    from gplflow.adapters.gpl_format import training_queries
    from gplflow.adapters.store import ArtifactStore

    if row_method not in summaries:  # the base, and a pretrained model alone
        return None
    store = ArtifactStore(summaries[row_method]["run_dir"])
    found = store.load(training_queries(store))
    return None if found is None else found.rows


def check_compare(config_path: str | Path, run_root: str | None = None,
                  seeds: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    """Without computing anything: each run of the compare checked as a run is before its first stage
    (``validate_run``), its run directory, and the artifacts it would adopt
    from an earlier run (the same fingerprint), as far as fingerprints are known before any model is loaded
    (``known_fingerprints``): the corpus, the queries of a method that loads no generator, the split, a filter
    that uses no model; what is made from a model (a pretrained start, negatives, labels) is not listed."""
    from gplflow.flows.validate import validate_run

    compare = CompareConfig.load(config_path)
    root = run_root or str(Path("runs") / compare.name)
    found, earlier = [], []
    for run in compare.runs(root, seeds):
        validate_run(run.cfg, run.run_dir, compare.base, run.overrides)
        fps = known_fingerprints(run.cfg, run.run_dir)
        shared = [(label, [n for n, fp in fps.items() if other.get(n) == fp]) for label, other in earlier]
        donor = max(shared, key=lambda found: len(found[1]), default=None)  # the earliest of those sharing most
        donor = donor if donor and donor[1] else None
        found.append({"run": run.label, "run_dir": run.run_dir, "known": list(fps),
                      "adopts_from": donor[0] if donor else None, "adopts": donor[1] if donor else []})
        earlier.append((run.label, fps))
    return found


class _ModelsUnknown(dict):
    """The models of a run that has not resolved them: a stage whose inputs need one is not fingerprinted."""

    def __getitem__(self, key: str) -> Any:
        raise LookupError(key)


UNKNOWN = "?"  # the fingerprint of an artifact the check cannot know without loading models


def known_fingerprints(cfg: PipelineConfig, run_dir: str) -> dict[str, str]:
    """The fingerprints of the artifacts a run of ``cfg`` makes that are known without resolving a model
    (resolving one may build tiny models or reach the hub: the check does neither): those of the stages whose
    inputs need no model and read no artifact of a stage that does."""
    from gplflow.adapters.errors import MissingInputError
    from gplflow.flows.stages import Run, planned
    from gplflow.tasks.base import Ref

    run = Run(cfg, run_dir, resolved=_ModelsUnknown(), planning=True)
    for stage in planned(cfg):
        try:
            inputs = stage.inputs(run)
        except (LookupError, MissingInputError):  # a model, or an artifact the check does not know
            run.fps.update(dict.fromkeys(stage.makes, UNKNOWN))
            continue
        unknown = any(isinstance(v, Ref) and v.fingerprint == UNKNOWN for v in vars(inputs).values())
        run.fps.update(dict.fromkeys(stage.makes, UNKNOWN) if unknown else inputs.fingerprints())
    return {name: fp for name, fp in run.fps.items() if fp != UNKNOWN}


def seed_rows(per_seed: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per compared model (in the first seed's order): how many seeds, and the mean and sample standard deviation
    over them of each column of ``COLUMNS`` and of the training queries; the verdicts counted by kind."""
    order = list(dict.fromkeys(row["method"] for rows in per_seed.values() for row in rows))
    out = []
    for method in order:
        rows = [row for rows in per_seed.values() for row in rows if row["method"] == method]
        found: dict[str, Any] = {"method": method, "seeds": len(rows)}
        for column in (*COLUMNS, "training queries"):
            values = [float(row[column]) for row in rows if row.get(column) is not None]
            found[column] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None,
                             len(values)) if values else None
        for kind in ("qrels", "no_qrels"):
            said = [row["verdicts"][kind] for row in rows if kind in row.get("verdicts", {})]
            found[f"verdicts {kind}"] = ", ".join(f"{v} {said.count(v)}" for v in ("better", "inconclusive", "worse")
                                                  if v in said) or None
        promoted = [row.get("promoted") for row in rows if row.get("promoted")]
        found["promoted"] = f"adapted {promoted.count('adapted')} of {len(promoted)}" if promoted else None
        out.append(found)
    return out


def mean_spread(found: tuple[float, float | None, int] | None, digits: int = 4) -> str:
    """``0.6050 ± 0.0123`` (mean ± sample sd over the seeds; no ± from a single value), ``–`` for none."""
    if found is None:
        return "–"
    mean, sd, _ = found
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def seeds_markdown(name: str, seeds: list[int], rows: list[dict[str, Any]]) -> str:
    digits = {"training queries": 0, "seconds": 0}
    lines = [f"## Comparison `{name}` over seeds {', '.join(map(str, seeds))}", "",
             "| method | seeds | " + " | ".join(SEED_COLUMNS)
             + " | verdicts: qrels | verdicts: without qrels | promoted |",
             "|---|--:" + "|--:" * len(SEED_COLUMNS) + "|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['seeds']} | "
                     + " | ".join(mean_spread(row[c], digits.get(c, 4)) for c in SEED_COLUMNS)
                     + f" | {row['verdicts qrels'] or '–'} | {row['verdicts no_qrels'] or '–'} | "
                       f"{row['promoted'] or '–'} |")
    lines += ["", "Each cell is the mean ± the sample standard deviation over the seeds (each seed sets "
              "the config keys of `seed_keys` in every method). Within a seed the methods share their queries and "
              "held-out split where their settings match, so a method's gain over another is best read seed by "
              "seed: each seed's own comparison, with gains, p-values and the agreement section, is in "
              "`seed-<N>/comparison.md`. Training queries: what the adapted model trained on (after the filter)."]
    return "\n".join(lines)


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
             "| method | " + " | ".join((*COLUMNS, "training queries", *VERDICT_COLUMNS)) + " | promoted |",
             "|---" + "|--:" * (len(COLUMNS) + 1) + "|---" * len(VERDICT_COLUMNS) + "|---|"]
    for row in rows:
        seconds = row.get("seconds")
        lines.append(f"| {row['method']} | " + " | ".join(cell(row.get(c)) for c in COLUMNS[:-1])
                     + f" | {'–' if seconds is None else f'{seconds:.0f}'} | {cell(row.get('training queries'))} | "
                     + " | ".join(cell(row.get(c)) for c in VERDICT_COLUMNS) + f" | {cell(row.get('promoted'))} |")
    lines += ["", "Each method's run directory holds its full report; the held-out queries are those of each run's "
              "own split (the flows that generate queries share it when their generate settings match). Gains and "
              "verdicts are against the base on per-query nDCG@10 (paired bootstrap interval, sign-flip p-value); "
              "a verdict is better, worse or inconclusive. Training queries: those the adapted model was trained "
              "on (what the filter kept, when the method filters)."]
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
def compare_pipeline(config_path: str, run_root: str | None = None,
                     seeds: list[int] | None = None) -> dict[str, Any]:
    """Run several methods on one corpus into sibling run directories (once, or once per seed) and publish one
    comparison table."""
    return run_compare(config_path, run_root, None if seeds is None else tuple(seeds))
