"""The ``gplflow`` command line: ingest, run, demo, compare, status, export."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

# Prefect's temporary server logs a telemetry ERROR when its analytics cannot be sent; the Makefile sets this too.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # before prefect is imported
# Prefect waits 20 s for its temporary server; on a loaded machine (2 cores, a load average of 11) the start took
# longer and every run ended before its first stage
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import typer
from rich.console import Console
from rich.table import Table

from gplflow.adapters.errors import GplflowError, InputError
from gplflow.adapters.store import ArtifactStore
from gplflow.flows.logs import last_run_log, run_log, setup_terminal

if TYPE_CHECKING:  # the config imports every stage (torch, Prefect): --help and status do without it
    from gplflow.flows.config import PipelineConfig

app = typer.Typer(help="Adapt a dense retriever to your corpus without labels (GPL / GenQ) with Prefect flows.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


class _Terminal:
    """A rich console made when it prints, so its width follows COLUMNS and the terminal of that moment (one made
    at import keeps the width that held when the module was first imported, whoever imported it)."""

    def __init__(self, **options: Any):
        self._options = options

    def __getattr__(self, name: str) -> Any:
        return getattr(Console(**self._options), name)


console = _Terminal(soft_wrap=True)  # piped output keeps long lines (paths) whole; tables still fit the width
err_console = _Terminal(stderr=True, soft_wrap=True)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key: key=value.")]
PlanOption = Annotated[bool, typer.Option("--plan", help="Print what the config will do and each stage's estimated "
                                          "time on this device (a calibration of its models: seconds to minutes); "
                                          "run nothing.")]
RunDirOption = Annotated[str | None, typer.Option("--run-dir", help="Where the stage artifacts go "
                                                  "(default runs/<name>); a local path or an fsspec URL.")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A ``GplflowError`` (something the user can fix) becomes one line on stderr and exit code 2; any other
    exception is a bug and keeps its traceback (exit code 1). GPLFLOW_DEBUG=1 shows user errors' tracebacks too."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as err:
        message = user_message(err)
        log = last_run_log()
        if message is None or os.environ.get("GPLFLOW_DEBUG"):
            if log is not None and message is None:
                err_console.print(f"[bold red]internal error[/] (a bug; full log: {log}):", highlight=False,
                                  soft_wrap=True)
            raise
        where = f" (full log: {log})" if log is not None else ""
        err_console.print(f"[bold red]error:[/] {message}{where}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


_PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST)


def user_message(err: BaseException) -> str | None:
    """The one line for an error a user can fix (a ``GplflowError``, or a path the system refused), else None."""
    if isinstance(err, GplflowError):
        if getattr(err, "multiline", False):  # a list, a line per item (models the hub cannot serve)
            return str(err).strip()
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, OSError) and err.errno in _PATH_ERRNOS and err.filename:
        return f"{err.filename}: {err.strerror or type(err).__name__}"
    if isinstance(err, RuntimeError) and "ephemeral Prefect API server" in str(err):
        waited = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20")
        return (f"Prefect's temporary API server did not answer within {waited} s (a busy machine?): nothing ran; "
                "set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or PREFECT_API_URL to a running "
                "server (prefect server start)")
    return None


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    setup_terminal(verbose)


@app.command()
def ingest(
    src: Annotated[str, typer.Argument(help="Corpus file or folder (BEIR, JSONL, CSV, TSV, Parquet, .txt/.md "
                                       "folder, datasets folder).")],
    fmt: Annotated[str | None, typer.Option("--format", help="beir|jsonl|csv|tsv|parquet|textdir|hf "
                                            "(default: detected from the path).")] = None,
    run_dir: Annotated[str, typer.Option("--run-dir", help="Run directory; corpus/ is written in it.")] = "runs/ingest",
    id_field: Annotated[str, typer.Option(help="Field holding the document id.")] = "_id",
    title_field: Annotated[str | None, typer.Option(help="Field holding the title ('' for none).")] = "title",
    text_field: Annotated[str, typer.Option(help="Field holding the text.")] = "text",
    skip_empty: Annotated[bool, typer.Option("--skip-empty", help="Drop and count empty-text documents "
                                             "instead of failing.")] = False,
) -> None:
    """Read a corpus into the corpus/ artifact (doc_id, title, text), validated and whitespace-normalised."""
    from gplflow.tasks.ingest import IngestConfig, IngestInputs, run_ingest

    with user_errors(), _removed_if_left_empty(run_dir):
        cfg = IngestConfig(path=src, format=fmt, id_field=id_field, title_field=title_field or None,
                           text_field=text_field, skip_empty=skip_empty)
        artifact = run_ingest(IngestInputs(run_dir=run_dir, cfg=cfg))
    dropped = artifact.counters.get("empty_text", 0)
    console.print(f"corpus: {artifact.rows} documents → {artifact.url}" + (f" ({dropped} empty dropped)"
                                                                          if dropped else ""))


@app.command()
def init(
    corpus: Annotated[Path, typer.Argument(help="Your corpus: a folder of .txt/.md files, a BEIR folder, a "
                                           "JSONL/CSV/TSV/Parquet file or a datasets folder.")],
    out: Annotated[Path, typer.Option("--out", help="The config file to write.")] = Path("my-corpus.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    plan: Annotated[bool, typer.Option("--plan/--no-plan", help="Print the plan of the config written "
                                       "(a calibration of its models: seconds to minutes).")] = True,
) -> None:
    """Write a config for CORPUS (configs/my-corpus.yaml with corpus.path and the detected format filled in:
    offline models, no judgements needed), then print its plan."""
    from gplflow.adapters.corpus_readers import detect_format

    with user_errors():
        if out.exists() and not force:
            raise InputError(f"{out}: already exists; pass --force to replace it, or --out another file")
        fmt = detect_format(corpus)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(init_config(corpus, fmt, out), encoding="utf-8")
        console.print(f"wrote {out}: corpus {corpus} ({fmt}); run it with: gplflow run {out}", highlight=False)
        if fmt in ("jsonl", "csv", "tsv", "parquet"):
            console.print("its fields are read as corpus.id_field '_id', title_field 'title' and text_field 'text': "
                          f"edit {out} if your columns are named otherwise", highlight=False)
        if plan:
            _run(out, [], None, plan=True)


def init_config(corpus: Path, fmt: str, out: Path) -> str:
    """configs/my-corpus.yaml's text for ``corpus``: its name, path (relative to ``out``'s folder) and format."""
    import re

    text = (PROJECT_ROOT / "configs" / "my-corpus.yaml").read_text(encoding="utf-8")
    try:
        path = os.path.relpath(corpus.resolve(), out.resolve().parent)
    except ValueError:  # another drive (Windows): no relative path
        path = str(corpus.resolve())
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", corpus.resolve().stem).strip("-") or "my-corpus"
    edits = ((r"^name: .*$", f"name: {name}"), (r"^  path: \S+", f"  path: {json.dumps(path)}"),
             (r"^  # format: \S+", f"  format: {fmt}"))
    for pattern, value in edits:
        text, found = re.subn(pattern, lambda _m, v=value: v, text, count=1, flags=re.MULTILINE)
        if found != 1:
            raise RuntimeError(f"configs/my-corpus.yaml has no line matching {pattern!r}")
    return f"# Written by `gplflow init {corpus}` (format detected: {fmt}) from configs/my-corpus.yaml.\n" + text


@contextlib.contextmanager
def _removed_if_left_empty(run_dir: str) -> Iterator[None]:
    """A local run directory this command creates is removed again when the block fails and leaves it empty."""
    store = ArtifactStore(run_dir)
    path = Path(store.root) if store.is_local else None
    new = path is not None and not path.exists()
    try:
        yield
    except BaseException:
        if new and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML).")],
    overrides: SetOption = None,
    run_dir: RunDirOption = None,
    plan: PlanOption = False,
) -> None:
    """Run the GPL (or GenQ: flow=genq; fine-tuning on labelled pairs: flow=supervised; Augmented SBERT:
    flow=augmented_sbert) pipeline of CONFIG."""
    with user_errors():
        _run(config, overrides or [], run_dir, plan)


@app.command()
def demo(run_dir: RunDirOption = None, overrides: SetOption = None, plan: PlanOption = False) -> None:
    """Run configs/demo.yaml: the whole GPL pipeline on the bundled demo corpus, offline, in a few minutes."""
    with user_errors():
        _run(PROJECT_ROOT / "configs" / "demo.yaml", overrides or [], run_dir, plan)


def _run(config: Path, overrides: list[str], run_dir: str | None, plan: bool = False) -> None:
    from gplflow.adapters.runlock import check_free
    from gplflow.flows.config import PipelineConfig, default_run_dir
    from gplflow.flows.validate import validate_run

    cfg = PipelineConfig.load(config, overrides)  # fail fast, before Prefect starts
    run_dir = run_dir or default_run_dir(cfg)
    validate_run(cfg, run_dir, config, overrides)  # models, qrels, run directory: before hours of compute
    if plan:
        print_plan(cfg, run_dir)
        return
    check_free(run_dir)  # likewise a run directory another run holds (the flow takes the lock itself)
    from gplflow.flows.pipeline import augmented_sbert_pipeline, genq_pipeline, gpl_pipeline, supervised_pipeline

    # the flow's name is what the Prefect UI lists the run under
    pipeline = {"genq": genq_pipeline, "supervised": supervised_pipeline,
                "augmented_sbert": augmented_sbert_pipeline}.get(cfg.flow, gpl_pipeline)
    with flow_session(run_dir, cfg.name):
        summary = pipeline(config_path=str(config), overrides=overrides, run_dir=run_dir)
    print_summary(cfg, summary)


@contextlib.contextmanager
def flow_session(run_dir: str, name: str) -> Iterator[None]:
    """Around a flow the CLI runs: Prefect's tracebacks of a failed stage go to the run's log file, not to the
    terminal; Ctrl-C, SIGTERM and SIGHUP stop it within seconds (the stages done and the shards staged are kept)
    and stop the temporary Prefect server."""
    from gplflow.flows.interrupt import signal_of, stop_on_signals, temporary_server

    try:
        with run_log(run_dir, name), stop_on_signals(), temporary_server():
            yield
    except KeyboardInterrupt as err:
        signum = signal_of(err)
        err_console.print(f"[bold yellow]interrupted[/] ({signal.Signals(signum).name}): the run stopped; the same "
                          f"command resumes it (finished stages are reused; full log: {last_run_log()})",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(128 + signum) from None


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="A compare file: a base config and the methods to run on it "
                                           "(see configs/compare.yaml).")],
    run_root: Annotated[str | None, typer.Option("--run-root", help="Folder of the methods' run directories "
                                                 "(default runs/<name>).")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="Run each method once per seed, e.g. 1,2,3 (each sets "
                                              "the file's seed_keys: generate, label and train seeds by default) "
                                              "into <run root>/seed-<N>/<method>, and report mean and spread; "
                                              "replaces the file's seeds.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Check every method's config and list the runs and the "
                                        "stages each would adopt from an earlier one; run nothing.")] = False,
) -> None:
    """Run several methods on one corpus into sibling run directories and print one comparison table."""
    with user_errors():
        from gplflow.flows.compare import CompareConfig, check_compare, compare_pipeline

        found = CompareConfig.load(config)
        chosen = _seeds(seeds) if seeds is not None else None
        root = run_root or str(Path("runs") / found.name)
        if check:
            for run in check_compare(config, root, chosen):
                shared = (f"adopts {', '.join(run['adopts'])} from {run['adopts_from']}" if run["adopts"] else
                          "adopts nothing")
                console.print(f"{run['run']}: {run['run_dir']}: {shared}", highlight=False, soft_wrap=True)
            return
        found.runs(root, chosen)  # every method's config (at every seed), before Prefect starts
        with flow_session(root, found.name):
            result = compare_pipeline(str(config), root, None if chosen is None else list(chosen))
    console.print(seeds_table(result) if "seed_rows" in result else compare_table(found.name, result))
    if result.get("agreement"):
        console.print(agreement_table(result["agreement"]))
    console.print(f"table: {result['run_root']}/comparison.md", highlight=False)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        found = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--seeds {text!r}: expected seeds separated by commas, such as 1,2,3") from None
    if not found or len(set(found)) != len(found) or min(found) < 0:
        raise InputError(f"--seeds {text!r}: expected distinct non-negative seeds, such as 1,2,3")
    return found


def compare_table(name: str, result: dict[str, Any]) -> Table:
    from gplflow.flows.compare import COLUMNS, VERDICT_COLUMNS

    table = Table(title=f"compare '{name}' ({result['run_root']}/<method>)")
    for column in ("method", *COLUMNS, "training queries", *VERDICT_COLUMNS, "promoted"):
        table.add_column(column, justify="left" if column in ("method", "promoted", *VERDICT_COLUMNS) else "right")
    for row in result["rows"]:
        cells = [row.get(c) for c in COLUMNS[:-1]]
        seconds, queries = row.get("seconds"), row.get("training queries")
        table.add_row(row["method"], *("–" if v is None else f"{v:.4f}" for v in cells),
                      "–" if seconds is None else f"{seconds:.0f}", "–" if queries is None else str(queries),
                      *(row.get(c) or "–" for c in VERDICT_COLUMNS), row.get("promoted") or "")
    return table


def seeds_table(result: dict[str, Any]) -> Table:
    """Each method's mean ± sample standard deviation over the seeds (``flows/compare.py``)."""
    from gplflow.flows.compare import SEED_COLUMNS, mean_spread

    table = Table(title=f"compare over seeds {', '.join(map(str, result['seeds']))} "
                        f"({result['run_root']}/seed-<N>/<method>): mean ± sd")
    for column in ("method", "seeds", *SEED_COLUMNS, "verdicts: qrels", "verdicts: without qrels", "promoted"):
        table.add_column(column, justify="left" if column == "method" or column.startswith(("verdicts", "promoted"))
                         else "right")
    for row in result["seed_rows"]:
        table.add_row(row["method"], str(row["seeds"]),
                      *(mean_spread(row[c], 0 if c in ("training queries", "seconds") else 4) for c in SEED_COLUMNS),
                      row["verdicts qrels"] or "–", row["verdicts no_qrels"] or "–", row["promoted"] or "–")
    return table


def agreement_table(rows: list[dict[str, Any]]) -> Table:
    """How each no-qrels signal agrees with the qrels over the compared methods (``flows/compare.py``)."""
    from gplflow.flows.compare import AGREEMENT_COLUMNS

    table = Table(title="agreement of each signal without qrels with the qrels, over the compared models")
    for column in AGREEMENT_COLUMNS:
        table.add_column(column, justify="left" if column == "signal" else "right")
    for row in rows:
        table.add_row(*(row[c] for c in AGREEMENT_COLUMNS))
    return table


def print_plan(cfg: PipelineConfig, run_dir: str) -> None:
    """The stages, their work and their estimated time on this device; nothing is run or written."""
    from gplflow.flows.logs import quiet
    from gplflow.flows.plan import duration, estimated, make_plan

    console.print(f"calibrating each stage on this device with the models of '{cfg.name}' (seconds to minutes)…")
    with quiet():
        found = make_plan(cfg, run_dir)
    table = Table(title=f"plan for '{cfg.name}' on {found.device}: {found.passages} passages")
    here = ("run dir",) if found.reused else ()  # a run directory that holds some of this config's stages
    for column in ("stage", "work", "rate", "estimated time", *here):
        table.add_column(column, justify="right" if column in ("rate", "estimated time") else "left")
    for stage in found.stages:
        rate = f"{stage.rate:.3g} {stage.unit}/s" if stage.rate else (stage.note or "?")
        if stage.rate and stage.beside:
            rate += f" + {duration(stage.beside)} ({stage.beside_detail})"
        table.add_row(stage.stage, stage.detail, rate, estimated(stage.seconds, stage.spread),
                      *(("reuse" if stage.stage in found.reused else "compute",) if here else ()))
    table.add_row("total", "", "", estimated(found.seconds, found.spread), *([""] if here else []))
    console.print(table)
    if found.reused:
        console.print(f"{run_dir} already holds what this config makes in: {', '.join(sorted(found.reused))}; "
                      "the stages marked compute are what a run of it computes (the estimates count every stage).")
    console.print("± is the spread of the calibration's repeated timings (how noisy this machine was), not a bound: "
                  "model loading, checkpoints and other work on the machine are not in the estimate.")


def _ref(ref: str, path: str) -> str:
    """A model as configured, and the folder it resolved to when that differs."""
    return ref if ref == path else f"{ref} ({path})"


def print_summary(cfg: PipelineConfig, summary: dict[str, Any]) -> None:
    models, m = summary["models"], cfg.models
    console.rule(f"gplflow run '{cfg.name}' finished in {summary['seconds']} s")
    store = ArtifactStore(summary["run_dir"])
    if cfg.trains_on_pairs:
        _pairs(store)
    else:
        from gplflow.tasks.generate import summary_line as generator_line

        console.print(generator_line(cfg, models.get("generator", ""), store.read_manifest("queries")),
                      highlight=False, soft_wrap=True)
    if cfg.is_gpl:
        for (name, score), (path, _) in zip(((r.name, r.score) for r in m.retrievers), models["retrievers"],
                                            strict=True):
            console.print(f"miner: {_ref(name, path)}, {score}")
        console.print(f"teacher ({cfg.label.teacher}): {_ref(cfg.teacher_ref, models[cfg.teacher_slot])}")
    layers = f", first {m.base_layers} layer(s)" if m.base_layers else ""
    console.print(f"base model: {m.base}{layers} ({models['base']})")
    if cfg.pretrain.method != "none":
        console.print(f"pretraining: {cfg.pretrain.method}, {cfg.pretrain.steps} steps")
    from gplflow.tasks.filter import summary_line

    if (filtered := summary_line(cfg, store.read_manifest("queries-filtered"))) is not None:
        console.print(filtered, highlight=False)  # drops by reason
    _diagnostics((store.read_manifest("triples") or {}).get("diagnostics"))
    metrics = summary.get("metrics")
    if metrics and metrics["evaluations"]:
        console.print(metrics_table(metrics))
        _verdict(metrics)
    _evaluators(metrics, store)
    console.print(f"adapted model: {store.url('model')}  (SentenceTransformer(path) loads it)")
    _promoted((store.read_manifest("promoted") or {}).get("promotion"))
    from gplflow.flows.stages import artifact_names

    stages = [s for s in artifact_names() if store.read_manifest(s) is not None]
    console.print(f"artifacts: {summary['run_dir']}/{{{','.join(stages)}}}")


def _evaluators(metrics: dict[str, Any] | None, store: ArtifactStore) -> None:
    """STS and clustering per model, one line each, and where the embedding map is."""
    from gplflow.flows.report import ordered_models

    if not metrics:
        return

    def num(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.4f}"

    if agreement := metrics.get("teacher_agreement"):
        console.print(f"teacher agreement on the held-out queries: {agreement['share']:.1%} of "
                      f"{agreement['queries']} (source passage above the base model's {agreement['candidates']} "
                      "candidates)", highlight=False)
    if sts := metrics.get("sts"):
        console.print(f"STS ({sts['pairs']} pairs), Spearman: " + ", ".join(
            f"{m} {num(sts['models'][m]['spearman'])}" for m in ordered_models(sts)), highlight=False)
    if clustering := metrics.get("clustering"):
        console.print(f"clustering ({clustering['items']} passages, {clustering['labels']} labels), V-measure "
                      "k-means/HDBSCAN: " + ", ".join(
                          f"{m} {num(found['kmeans']['v_measure'])}/{num(found['hdbscan']['v_measure'])}"
                          for m in ordered_models(clustering) for found in [clustering["models"][m]]),
                      highlight=False)
    if found := metrics.get("mteb"):
        console.print(f"MTEB: {found['skipped']}" if "skipped" in found else "MTEB main scores: " + "; ".join(
            f"{t}: " + ", ".join(f"{m} {num(found['models'][m].get(t))}" for m in ordered_models(found))
            for t in found["tasks"]), highlight=False)
    if found := metrics.get("embedding_map"):
        console.print(f"embedding map: {store.url('evaluate')}/{found['file']}", highlight=False)


def _pairs(store: ArtifactStore) -> None:
    """The labelled pairs a supervised or augmented_sbert run trained on: how many, which kind, the score spread,
    the silver pairs (augmented_sbert), and the loss."""
    pairs, model = store.read_manifest("pairs") or {}, store.read_manifest("model") or {}
    scores = pairs.get("scores")
    spread = (f", scores {scores['min']:.2f}-{scores['max']:.2f} (mean {scores['mean']:.2f}, per fifth "
              f"{'/'.join(map(str, scores['histogram']))})" if scores else "")
    console.print(f"labelled pairs: {pairs.get('rows')} {pairs.get('kind', '')} pairs from "
                  f"{pairs.get('config', {}).get('path')}{spread}", highlight=False)
    if (silver := store.read_manifest("silver")) is not None:
        _silver(silver, (store.read_manifest("cross-encoder") or {}).get("train", {}).get("gold_fit", {}))
    info = model.get("train", {})
    if info.get("loss_first") is not None:
        data = f" on {info.get('examples')} pairs (gold + silver)" if silver is not None else ""
        console.print(f"training: {model.get('config', {}).get('loss')}{data}, {info.get('steps')} steps, loss "
                      f"{info['loss_first']:.4f} → {info['loss_last']:.4f}", highlight=False)


def _silver(silver: dict[str, Any], fit: dict[str, Any]) -> None:
    """augmented_sbert: how well its cross-encoder fits the gold pairs, and how the silver pairs it labelled score."""
    before, after = fit.get("before", {}), fit.get("after", {})
    if after:
        console.print(f"cross-encoder on the gold pairs: BCE {before.get('bce')} → {after.get('bce')}, Spearman "
                      f"{before.get('spearman')} → {after.get('spearman')}", highlight=False)

    from gplflow.tasks.augment import distribution_value

    def quantile(found: dict[str, Any], name: str) -> Any:
        value = distribution_value(found, name)
        return f"{value:.3f}" if isinstance(value, float) else value

    scores = silver.get("scores", {})
    samplers = ", ".join(f"{name} {found.get('count')}" for name, found in sorted(silver.get("by_sampler", {}).items()))
    console.print(f"silver pairs: {silver.get('rows')} ({samplers}), scores p05 {quantile(scores, 'p05')} / p50 "
                  f"{quantile(scores, 'p50')} / p95 {quantile(scores, 'p95')}, mean {quantile(scores, 'mean')}, per "
                  f"fifth {'/'.join(map(str, scores.get('histogram', [])))}", highlight=False)


def metrics_table(metrics: dict[str, Any]) -> Table:
    """The evaluations side by side (``tasks/evaluation_table.py``) as a rich table."""
    from gplflow.tasks.evaluation_table import metrics_table as evaluation_table

    found = evaluation_table(metrics)
    table = Table(title="retrieval: " + "; ".join(f"{e.label} = {e.queries} {e.what}" for e in found.evaluated))
    rows = list(found.text_rows())
    widest = max((len(metric) for metric, _ in rows), default=6)
    table.add_column("metric", no_wrap=True, min_width=widest)  # "recall@100" whole on an 80-column terminal
    for column in found.columns:
        table.add_column(column.title, justify="right")
    for metric, cells in rows:
        table.add_row(metric, *cells)
    return table


def significance_table(metrics: dict[str, Any]) -> Table | None:
    """Each model against the base on each evaluation (``tasks/evaluation_table.py``): the paired test and verdict."""
    from rich import box

    from gplflow.tasks.evaluation_table import BRIEF, SIGNIFICANCE_COLUMNS, significance_rows

    rows = significance_rows(metrics)
    if not rows:
        return None
    table = Table(title="nDCG@10 gain over the base: paired bootstrap CI, sign-flip p", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    for column in (SIGNIFICANCE_COLUMNS[i] for i in BRIEF):
        table.add_column(column, justify="left" if column in ("evaluation", "model", "verdict") else "right",
                         no_wrap=column != "verdict", min_width=12 if column == "verdict" else None)
    for row in rows:
        table.add_row(*(row[i] for i in BRIEF))
    return table


_VERDICT_STYLE = {"better": "green", "worse": "bold red", "inconclusive": "bold yellow"}


def _verdict(metrics: dict[str, Any]) -> None:
    from gplflow.tasks.promote import verdict_lines

    if (table := significance_table(metrics)) is not None:
        console.print(table)
    from gplflow.tasks.evaluation_table import judged_note

    if note := judged_note(metrics):
        console.print(note, highlight=False)
    for verdict, line in verdict_lines(metrics):
        console.print(f"[{_VERDICT_STYLE[verdict]}]{line}[/]", highlight=False)


def _promoted(promotion: dict[str, Any] | None) -> None:
    if not promotion:
        return
    style = "green" if promotion["promoted"] == "adapted" else "bold yellow"
    console.print(f"[{style}]promoted: the {promotion['promoted']} model ({promotion['ref']})[/]", highlight=False)
    console.print(f"  why: {promotion['reason']}", highlight=False)


def _diagnostics(diagnostics: dict[str, Any] | None) -> None:
    """The teacher's label diagnostics in a line, and its warnings."""
    if not diagnostics:
        return
    from gplflow.tasks.label_diagnostics import summary_line

    console.print(f"label diagnostics: {summary_line(diagnostics)}", highlight=False)
    for warning in diagnostics.get("warnings", []):
        console.print(f"[bold yellow]warning: {warning}[/]", highlight=False)


@app.command()
def status(
    run_dir: Annotated[str, typer.Argument(help="A run directory.")],
    verify: Annotated[bool, typer.Option("--verify", help="Hash every file against its manifest (reads all the "
                                         "bytes); without it, sizes and modification times are checked.")] = False,
) -> None:
    """Show each stage of a run as complete, partial (k of n shards), corrupted or missing, and what a rerun does."""
    from gplflow.flows.stages import condition
    from gplflow.flows.status import hashed, run_status, shown

    store = ArtifactStore(run_dir)
    with user_errors():
        rows = run_status(store, verify)
    listed, unused = shown(rows)
    table = Table(title=f"run {run_dir}")
    for column in ("stage", "state", "rows", "shards", "fingerprint", "a rerun would"):
        table.add_column(column, no_wrap=column in ("stage", "state", "fingerprint"), overflow="fold")
    for row in listed:
        table.add_row(row.stage, row.state, "" if row.rows is None else str(row.rows), row.shards, row.fingerprint,
                      row.rerun)
    console.print(table)
    if unused:
        console.print("not listed: missing, and computed only when the config asks: " + "; ".join(
            f"{row.stage} (if {condition(row.stage)})" for row in unused), highlight=False)
    files, size = hashed(store)
    console.print(f"verified: hashed {files} files ({size / 1e6:.1f} MB) of the published stages against the sha256 "
                  "in their manifests" if verify else f"checked sizes and modification times of {files} files "
                  "(--verify hashes them)", highlight=False)
    promotion = (ArtifactStore(run_dir).read_manifest("promoted") or {}).get("promotion")
    if promotion:
        console.print(f"promoted: the {promotion['promoted']} model ({promotion['ref']}): {promotion['reason']}",
                      highlight=False)


@app.command()
def export(
    run_dir: Annotated[str, typer.Argument(help="A run directory.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write.")],
    fmt: Annotated[str, typer.Option("--format", help="Only 'gpl' (UKPLab gpl's folder format).")] = "gpl",
    force: Annotated[bool, typer.Option("--force", help="Replace the content of a non-empty --out folder "
                                        "(all of it: no stale file is left).")] = False,
) -> None:
    """Export a run's artifacts in UKPLab gpl's folder format (corpus.jsonl, qgen-queries.jsonl, …).

    The folder is written beside --out under a temporary name and renamed into place when complete.
    """
    from gplflow.adapters.gpl_format import export_gpl, queries_file, training_queries

    with user_errors():
        if fmt != "gpl":
            raise InputError(f"--format {fmt!r}: only 'gpl' is supported")
        store = ArtifactStore(run_dir)
        queries = training_queries(store)
        counts = export_gpl(store, str(out), queries_stage=queries, force=force)
    for name, count in counts.items():
        console.print(f"{out / name}: {count}" + (f" (from {queries}/: the training queries)"
                                                   if name == queries_file() else ""), highlight=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
