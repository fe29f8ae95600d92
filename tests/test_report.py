"""The run report (markdown and stage table) and the progress artifacts: values, order, and update rate."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest
from artifact_rows import write_artifact
from stage_calls import GenerateJob, run_generate

from gplflow.adapters import artifacts
from gplflow.adapters.llm_prompts import build_prompt
from gplflow.adapters.store import ArtifactStore
from gplflow.flows import pipeline
from gplflow.flows import report as report_module
from gplflow.flows.config import PipelineConfig
from gplflow.flows.report import artifact_key, metrics_markdown, report_markdown, sample_passages, stage_rows
from gplflow.tasks import progress as progress_module
from gplflow.tasks.generate import GenerateConfig
from gplflow.tasks.progress import ProgressArtifact
from gplflow.tasks.train import progress_callback

KEY = re.compile(r"^[a-z0-9-]+$")  # what Prefect accepts as an artifact key
DOCS = [
    ("bees", "Bees", "Honey bees make honey from nectar. They store it in wax cells inside the hive."),
    ("volcano", "", "Volcanoes erupt when magma pressure builds up. Lava flows down the slopes afterwards."),
    ("tea", "Tea", "Green tea comes from unoxidised leaves. Black tea leaves are fully oxidised first."),
    ("chess", "", "Castling moves the king two squares. The rook jumps over to the other side."),
    ("moon", "Moon", "The Moon orbits the Earth every 27 days. Its phases follow the same cycle."),
    ("bread", "", "Sourdough rises with wild yeast. Lactic acid bacteria give it a sour taste."),
]
QRELS = {  # in the order evaluate happens to write them: the report must reorder the columns
    "models": {
        "adapted": {"ndcg@10": 0.5, "map@100": 0.4, "recall@100": 0.9, "mrr@10": 0.45},
        "base": {"ndcg@10": 0.3, "map@100": 0.2, "recall@100": 0.8, "mrr@10": 0.25},
        "pretrained": {"ndcg@10": 0.35, "map@100": 0.25, "recall@100": 0.85, "mrr@10": 0.3},
    },
    "delta": {"ndcg@10": 0.2, "map@100": 0.2, "recall@100": 0.1, "mrr@10": 0.2},
    "counts": {"queries": 12, "docs": 6},
}
HELDOUT = {
    "models": {"adapted": {"ndcg@10": 0.6, "map@100": 0.5, "recall@100": 1.0, "mrr@10": 0.55},
               "base": {"ndcg@10": 0.7, "map@100": 0.6, "recall@100": 1.0, "mrr@10": 0.65}},
    "delta": {"ndcg@10": -0.1, "map@100": -0.1, "recall@100": 0.0, "mrr@10": -0.1},
    "counts": {"queries": 4, "docs": 6},
}
VERDICTS = {"qrels": {"verdict": "better", "reason": "the adapted model beats its base on nDCG@10 (+0.2000)"},
            "no_qrels": {"verdict": "inconclusive", "reason": "no signal without qrels is conclusive"}}
METRICS = {"evaluations": {"heldout": HELDOUT, "qrels": QRELS}, "primary_evaluation": "qrels",
           "primary_metric": "ndcg@10", "verdicts": VERDICTS,
           "promotion": {"promoted": "adapted", "rule": "if_better", "reason": "the adapted model beats its base"}}
DIAGNOSTICS = {"margin": {"min": -1.0, "p05": -0.5, "p25": 0.1, "p50": 0.25, "p75": 0.5, "p95": 1.0, "max": 2.0,
                          "mean": 0.3},
               "negative_share": 0.45, "near_zero_share": 0.1, "score_spread": 3.0, "teacher_agreement": 0.5,
               "queries": 2, "scores": {"pos": {"min": 0.5, "mean": 1.0, "max": 2.0},
                                        "neg": {"min": -1.0, "mean": 0.7, "max": 1.5}},
               "warnings": ["the teacher looks random"]}
EXTRACTIVE = GenerateConfig(method="extractive", queries_per_passage=2, seed=3)


def make_corpus(run_dir) -> ArtifactStore:
    store = ArtifactStore(run_dir)
    write_artifact(store, "corpus", DOCS)
    return store


@pytest.fixture()
def run(tmp_path):
    """A run directory with a corpus, extractive queries in 3 shards, and a triples manifest made earlier."""
    store = make_corpus(tmp_path / "run")
    write_artifact(store, "triples", [("q1", "d1", f"d{k}", 2.0, 1.0, 1.0) for k in (2, 3, 4)],
                   counters={"triples": 3, "queries_without_negatives": 1}, extra={"diagnostics": DIAGNOSTICS})
    started = time.time()
    run_generate(EXTRACTIVE, store, store.require("corpus"), "", shard_size=2)
    return store, started


def config(tmp_path, **overrides: object) -> PipelineConfig:
    data = {"name": "Report Test_1", "corpus": {"path": str(tmp_path)},
            "models": {"base": "sentence-transformers/all-MiniLM-L6-v2"},
            "generate": {"method": "extractive", "queries_per_passage": 2},
            "train": {"steps": 30, "batch_size": 4}, "evaluate": {"qrels": "qrels/test.tsv"}}
    return PipelineConfig.from_dict({**data, **overrides})


def summary(store: ArtifactStore, started: float) -> dict:
    return {"run_dir": store.root_url, "started": started, "seconds": 12.5, "metrics": METRICS,
            "models": {"base": "/cache/minilm", "bi_encoder_teacher": "/cache/minilm",
                       "retrievers": [("/cache/minilm", "cos_sim")], "generator": "/cache/t5",
                       "cross_encoder": "/cache/ce"}}


def test_stage_rows_count_rows_shard_seconds_and_reuse(run):
    store, started = run
    rows = {r["stage"]: r for r in stage_rows(store, started)}
    assert list(rows) == ["ingest → corpus", "generate → queries", "label → triples"]  # pipeline order
    assert rows["generate → queries"]["rows"] == 12 and rows["label → triples"]["rows"] == 3
    assert rows["label → triples"]["counters"] == "queries_without_negatives=1, triples=3"
    assert "passages=6, queries_per_passage=2" in rows["generate → queries"]["counters"]
    manifest = store.read_manifest("queries")
    shard_seconds = [s["seconds"] for s in manifest["shards"]["shards"]]
    assert len(shard_seconds) == 3 and all(s >= 0 for s in shard_seconds)  # recorded per shard
    expected = round(manifest["timings"]["seconds"] + sum(shard_seconds), 1)
    assert rows["generate → queries"]["seconds"] == expected
    assert rows["generate → queries"]["this run"] == "computed"
    assert rows["label → triples"]["this run"] == rows["ingest → corpus"]["this run"] == "reused"


def test_a_model_stage_shows_its_training_instead_of_rows(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writer("model", config={}) as out:
        (out.local_dir() / "config.json").write_text("{}", encoding="utf-8")
        out.extra["train"] = {"steps": 30, "examples": 960, "loss_first": 0.5, "loss_last": 0.125,
                              "resumed_from_step": 20}
    [row] = stage_rows(store, run_started=0.0)
    assert row == {"stage": "train → model", "rows": None, "seconds": row["seconds"], "this run": "computed",
                   "counters": "steps=30, examples=960, loss 0.5000 → 0.1250, resumed at step 20"}


def test_metrics_side_by_side_qrels_then_heldout_each_base_pretrained_adapted_then_delta():
    lines = metrics_markdown(METRICS).splitlines()
    assert lines[0] == ("| metric | qrels base | qrels pretrained | qrels adapted | qrels adapted − base "
                        "| held-out base | held-out adapted | held-out adapted − base |")
    assert lines[2] == "| ndcg@10 | 0.3000 | 0.3500 | 0.5000 | +0.2000 | 0.7000 | 0.6000 | -0.1000 |"
    assert [line.split(" | ")[0] for line in lines[2:6]] == ["| ndcg@10", "| map@100", "| recall@100", "| mrr@10"]
    assert "- qrels: 12 judged queries over 6 passages" in lines
    assert "- held-out: 4 held-out synthetic queries, never trained on over 6 passages" in lines
    assert lines[-1] == "- primary: qrels ndcg@10"
    assert metrics_markdown(None).startswith("_No retrieval evaluation")
    from gplflow.tasks.significance import compare

    judged = {"models": {}, "comparisons": {"adapted": compare([0.5, 0.6, 0.7], [0.6, 0.7, 0.8], resamples=100)},
              "counts": {"judge": "my/teacher", "judge_kind": "bi_encoder", "judge_is_teacher": True, "depth": 10,
                         "heldout_queries": 3, "pooled_pairs": 40, "pairs_scored": 31, "reused_from_triples": 0}}
    lines = metrics_markdown({**METRICS, "evaluations": {**METRICS["evaluations"], "teacher": judged}}).splitlines()
    assert "| teacher | adapted | 3 | 0.6000 | 0.7000 | +0.1000 | +0.100..+0.100 | 0.25 | inconclusive " \
           "(~6 q) |" in lines
    assert lines[-1].startswith("- Teacher-judged: the run's teacher, bi-encoder my/teacher, graded the top 10 "
                                "passages of every model on 3 held-out queries (40 pooled pairs, 31 scored, 0 reused")
    assert lines[-1].endswith("it measures fidelity to that model, not truth: the adapted model was trained to "
                              "imitate the teacher.")


def test_diagnostics_and_promotion_markdown():
    lines = report_module.diagnostics_markdown(DIAGNOSTICS).splitlines()
    assert lines[0] == "**Warning: the teacher looks random.**"
    assert lines[3] == "| -1 | -0.5 | 0.1 | 0.25 | 0.5 | 1 | 2 | 45.0% | 10.0% | 50.0% |"
    assert "- neg scores: -1 to 1.5 (mean 0.7)" in lines
    assert report_module.diagnostics_markdown(None).startswith("_No label diagnostics")
    base = {"promoted": "base", "rule": "if_better", "reason": "the adapted model does not beat its base"}
    assert report_module.promotion_markdown(base) == ("**Promoted: the BASE model (not the adapted one)** "
                                                      "(`evaluate.promote: if_better`): the adapted model does not "
                                                      "beat its base.")


def test_sampled_passages_carry_every_query_generated_from_them(run):
    store, _ = run
    samples = sample_passages(store, n=4)
    assert [s.doc_id for s in samples] == ["bees", "tea", "chess", "moon"]  # spread over the 6 passages
    queries = store.require("queries").read_table(["doc_id", "text"]).to_pylist()
    by_id = {d: (t, x) for d, t, x in DOCS}
    for s in samples:
        assert (s.title, s.text) == by_id[s.doc_id]
        assert [q for q, _, _ in s.queries] == [q["text"] for q in queries if q["doc_id"] == s.doc_id]
        assert all(lp is None and fate == "trained on" and q in s.text for q, lp, fate in s.queries)  # extractive


def test_report_markdown_has_stages_metrics_samples_models_and_config(run, tmp_path):
    store, started = run
    cfg = config(tmp_path)
    text = report_markdown(cfg, store, summary(store, started))
    lines = text.splitlines()
    assert lines[0] == "# gplflow run `Report Test_1`"
    with_qrels = "**Verdict with qrels: BETTER: the adapted model beats its base on nDCG@10 (+0.2000).**"
    without = "**Verdict without qrels: INCONCLUSIVE: no signal without qrels is conclusive.**"
    assert lines[lines.index(with_qrels) + 2] == without  # one verdict function for the report and the CLI
    assert lines[lines.index(without) + 1].startswith("**Promoted: the adapted model** (`evaluate.promote: if_better`)")
    assert lines[lines.index("## Metrics") + 1].startswith("| metric | qrels base | qrels pretrained |")
    assert "**Warning: the teacher looks random.**" in lines
    sections = [line for line in lines if line.startswith("## ")]
    assert sections == ["## Metrics", "## Label diagnostics", "## Sample of generated queries", "## Stages",
                        "## Models", "## Configuration"]
    first = store.require("queries").read_table(["doc_id", "text"]).to_pylist()[:2]
    assert [q["doc_id"] for q in first] == ["bees", "bees"]
    at = lines.index(f"1. **Bees** · {DOCS[0][2]} (`bees`)")  # the passage, then its queries below it
    assert lines[at + 1: at + 3] == [f"   - **{q['text']}**: trained on" for q in first]
    assert sum(bool(re.match(r"\d\. ", line)) for line in lines) == 4
    assert "## Generation prompt" not in lines  # extractive: no prompt
    assert any(re.fullmatch(r"\| generate → queries \| 12 \| [\d.]+ \| computed \|", line) for line in lines)
    assert any(re.fullmatch(r"\| label → triples \| 3 \| [\d.]+ \| reused \|", line) for line in lines)
    assert r"- label → triples: queries\_without\_negatives=1, triples=3" in lines
    # models: as configured, then what they resolved to; the teacher defaults to the first retriever
    assert "- **base (student)**: `sentence-transformers/all-MiniLM-L6-v2` → `/cache/minilm`" in lines
    assert "- **miner (cos_sim)**: `sentence-transformers/msmarco-distilbert-base-v3` → `/cache/minilm`" in lines
    assert "- **teacher (cross-encoder)**: `cross-encoder/ms-marco-MiniLM-L-6-v2` → `/cache/ce`" in lines
    assert not any(line.startswith("- **query generator") for line in lines)  # extractive: no generator
    assert "| train | 30 steps of batch 4, lr 2e-05, max length 350, seed 42 |" in lines
    assert "| label | 120 triples (auto), cross_encoder teacher, seed 42 |" in lines
    assert ("| evaluate | qrels `qrels/test.tsv`; 5% of the queries held out (at most 2000, seed 42); promote "
            "if_better (min gain 0); paired tests at alpha 0.05 |") in lines


def test_report_of_a_genq_run_without_evaluation(run, tmp_path):
    store, started = run
    cfg = config(tmp_path, flow="genq", train={"loss": "mnrl", "steps": 5}, evaluate={})
    text = report_markdown(cfg, store, {**summary(store, started), "metrics": None})
    assert "_Not evaluated._" in text and "_No retrieval evaluation (set `evaluate.qrels` or" in text
    assert "GenQ (MNRL)" in text and "miner" not in text and "| label |" not in text
    layered = config(tmp_path, models={"base": "my/base", "base_layers": 2})
    text = report_markdown(layered, store, {**summary(store, started), "models": {"base": "my/base"}})
    assert "- **base (student, its first 2 layers)**: `my/base`" in text.splitlines()  # resolved to itself: no arrow


def test_an_llm_run_reports_its_prompt_its_queries_by_passage_and_what_the_filter_dropped(tmp_path):
    store = make_corpus(tmp_path / "run")
    queries = [(f"{d}-q{k}", d, f"what about {d} number {k}", -0.5 - k) for d, _, _ in DOCS for k in range(2)]
    prompt = build_prompt("few_shot")
    llm = {"backend": "endpoint", "base_url": "http://127.0.0.1:8000/v1", "model": "tiny-chat",
           "prompt": prompt.record()}
    write_artifact(store, "queries", queries, schema=artifacts.queries_schema(logprob=True), extra={"llm": llm},
                   counters={"empty_queries": 2, "copied_passage": 1, "too_long_queries": 0, "duplicate_queries": 3})
    held = [q for q in queries if q[1] == "moon"]
    write_artifact(store, "heldout", held, schema=artifacts.queries_schema(logprob=True))
    train = [q for q in queries if q[1] != "moon"]
    write_artifact(store, "queries-train", train, schema=artifacts.queries_schema(logprob=True))
    dropped = {"tea-q0": ("too_long", 9), "bees-q1": ("copies_passage", 1.0)}
    write_artifact(store, "queries-filtered", [(*q, None, None, None) for q in train if q[0] not in dropped],
                   schema=artifacts.filtered_schema(logprob=True),
                   counters={"queries_in": 10, "kept": 8, "dropped_too_long": 1, "dropped_copies_passage": 1},
                   extra={"rules": ["length", "copy"], "examples": {
                       reason: [{"query_id": i, "doc_id": i.split("-")[0], "text": f"what about {i}", "value": v}]
                       for i, (reason, v) in dropped.items()}})
    cfg = config(tmp_path, generate={"method": "llm", "queries_per_passage": 2},
                 filter={"max_words": 8, "max_overlap": 0.9})
    lines = report_markdown(cfg, store, summary(store, time.time())).splitlines()
    sections = [line for line in lines if line.startswith("## ")]
    assert sections[2:5] == ["## Generation prompt", "## Filtered training queries", "## Sample of generated queries"]
    at = lines.index("## Generation prompt")
    assert lines[at + 1].startswith("Queries generated by the OpenAI-compatible endpoint `http://127.0.0.1:8000/v1`, "
                                    "model `tiny-chat` with the prompt `few\\_shot`")
    text = "\n".join(lines)
    assert f"```text\n{prompt.system}\n```" in text and f"```text\n{prompt.template}\n```" in text
    assert "The 3 examples, in place of `{examples}`:" in lines and prompt.examples[0].query in text
    assert ("Answers parsing dropped: empty queries 2, copied passage 1, too long queries 0, duplicate queries 3."
            in lines)
    at = lines.index("## Filtered training queries")
    assert lines[at + 1] == "Filter: kept 8 of 10 training queries; dropped too_long 1, copies_passage 1."  # as applied
    assert lines[at + 2:at + 4] == ["- copies_passage: “what about bees-q1” (bees, 1)",  # the manifest's order
                                    "- too_long: “what about tea-q0” (tea, 9)"]
    at = lines.index("1. **Bees** · " + DOCS[0][2] + " (`bees`)")  # bees, tea, chess, moon: spread over 6
    assert lines[at + 1:at + 3] == ["   - **what about bees number 0** (log-prob -0.5): trained on",
                                    "   - **what about bees number 1** (log-prob -1.5): dropped by the filter"]
    assert lines[lines.index("2. **Tea** · " + DOCS[2][2] + " (`tea`)") + 1].endswith("(log-prob -0.5): dropped by "
                                                                                      "the filter")
    moon = lines.index("4. **Moon** · " + DOCS[4][2] + " (`moon`)")
    assert lines[moon + 1:moon + 3] == [f"   - **what about moon number {k}** (log-prob {-0.5 - k:.3g}): held out"
                                        for k in range(2)]


def test_publish_report_uses_valid_keys_and_a_stage_table(run, tmp_path, monkeypatch):
    store, started = run
    made = {}
    monkeypatch.setattr(report_module, "create_markdown_artifact", lambda **kw: made.setdefault("markdown", kw))
    monkeypatch.setattr(report_module, "create_table_artifact", lambda **kw: made.setdefault("table", kw))
    report_module.publish_report(config(tmp_path), store, summary(store, started))
    assert made["markdown"]["key"] == "gplflow-report-report-test-1"
    assert made["table"]["key"] == "gplflow-stages-report-test-1"
    assert [r["stage"] for r in made["table"]["table"]] == ["ingest → corpus", "generate → queries", "label → triples"]
    assert made["table"]["table"][1]["rows"] == 12


@pytest.mark.parametrize("parts, key", [(("gplflow-report", "demo"), "gplflow-report-demo"),
                                        (("gplflow-report", "Café run_2 "), "gplflow-report-caf-run-2"),
                                        (("--",), "gplflow")])
def test_artifact_keys_are_valid(parts, key):
    assert artifact_key(*parts) == key and KEY.match(key)


def test_flow_run_name_is_config_name_and_date(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(f"name: Nightly SciFact\ncorpus: {{path: {tmp_path}}}\n", encoding="utf-8")
    params = {"config_path": str(path), "overrides": ["name=nightly_scifact"]}
    monkeypatch.setattr(pipeline, "runtime", SimpleNamespace(flow_run=SimpleNamespace(parameters=params)))
    assert re.fullmatch(r"nightly-scifact-\d{4}-\d\d-\d\d-\d{4}", pipeline.flow_run_name())
    params["overrides"] = ["train.steps=zero"]  # a broken config still names the run (after its file)
    assert re.fullmatch(r"c-\d{4}-\d\d-\d\d-\d{4}", pipeline.flow_run_name())


# --- progress artifacts ---------------------------------------------------------------------------------------

class FakePrefect:
    """Stands in for create_progress_artifact / update_progress_artifact and records the calls."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.updates: list[float] = []

    def create(self, progress: float, key: str, description: str) -> str:
        assert KEY.match(key), key
        self.created.append({"progress": progress, "key": key, "description": description})
        return "artifact-1"

    def update(self, artifact_id: str, progress: float) -> None:
        assert artifact_id == "artifact-1"
        self.updates.append(progress)

    def progress(self, total: int, step: float = 5.0) -> ProgressArtifact:
        return ProgressArtifact("some-stage", total, "what it does", step, create=self.create, update=self.update)


def test_progress_updates_every_few_percent_not_every_batch():
    fake = FakePrefect()
    bar = fake.progress(total=10_000)
    for _ in range(10_000):
        bar.advance(1)
    bar.finish()
    assert len(fake.created) == 1 and fake.created[0]["progress"] == 0.0
    assert len(fake.updates) == 20  # 5 %, 10 %, … 100 %: one per 5 points, never per batch
    assert fake.updates[0] == 5.0 and fake.updates[-1] == 100.0
    assert all(b - a >= 5.0 for a, b in zip(fake.updates, fake.updates[1:], strict=False))


def test_progress_reaches_100_once_even_off_the_grid():
    fake = FakePrefect()
    bar = fake.progress(total=7)
    for _ in range(7):
        bar.advance(1)  # 14.3 %, 28.6 %, … : every step moves more than 5 points
    bar.finish()
    bar.finish()
    assert fake.updates == [14.3, 28.6, 42.9, 57.1, 71.4, 85.7, 100.0]
    empty = FakePrefect()
    empty.progress(total=0).finish()  # a stage with nothing to do still ends at 100 %
    assert empty.updates == [100.0]


def test_progress_outside_a_task_run_sends_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no Prefect call outside a task run")

    monkeypatch.setattr(progress_module, "create_progress_artifact", refuse)
    monkeypatch.setattr(progress_module, "update_progress_artifact", refuse)
    assert not progress_module.in_task_run()
    bar = ProgressArtifact.start("generate-queries", 10, "nothing")
    bar.advance(5)
    bar.finish()
    assert bar.done == 10


def test_train_callback_updates_at_a_bounded_rate_and_resumes_at_its_step():
    fake = FakePrefect()
    callback = progress_callback(fake.progress(total=600))
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
    for step in range(1, 601):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert len(fake.updates) == 20 and fake.updates[-1] == 100.0
    resumed = FakePrefect()
    callback = progress_callback(resumed.progress(total=600))
    callback.on_train_begin(None, SimpleNamespace(global_step=300), None)  # from a checkpoint at step 300
    callback.on_step_end(None, SimpleNamespace(global_step=301), None)
    assert resumed.updates == [50.0]


def test_shard_job_progress_counts_all_work_also_when_resuming(tmp_path):
    store = make_corpus(tmp_path)
    job = GenerateJob(EXTRACTIVE, store, store.require("corpus"), "", shard_size=4)
    job.prepare()
    job.run_shard(0)  # a killed run finished shard 0 (4 of 6 passages)
    seen: list[int] = []
    GenerateJob(EXTRACTIVE, store, store.require("corpus"), "", shard_size=4).run(seen.append)
    assert job.work == 6 and seen == [4, 2]  # the skipped shard counts as done, then the rest
