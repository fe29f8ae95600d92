"""The stages called the way unit tests find handiest: with a store and the artifacts in hand.

Product code calls a stage with its one typed inputs object (``tasks/base.py`` ``StageInputs``), built by the
registry from a run. A unit test usually holds an ``ArtifactStore`` and the input ``Artifact``s it just wrote;
these helpers build the inputs object from them, so the tests read as before and exercise the same code path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gplflow.adapters.store import Artifact, ArtifactStore, Ref
from gplflow.tasks import augment, evaluate, generate, ingest, label, mine, pairs, pretrain, split, train


def _run_dir(store: ArtifactStore) -> str:
    return store.root_url


def _ref(name: str, fp: str) -> Ref:
    return Ref(name, fp)


def _in(run_dir: str, name: str, found: Artifact | str | None) -> Ref | None:
    """An input as a ``Ref`` of ``run_dir``: a fingerprint as it is, an artifact of another run directory copied
    in first (a stage reads its inputs from its own run directory)."""
    if found is None or isinstance(found, str):
        return None if found is None else _ref(name, found)
    if run_dir and found.store.root_url != run_dir:
        ArtifactStore(run_dir).adopt(found)
    return found.ref


# --- ingest, pairs, split -------------------------------------------------------------------------------------

def run_ingest(cfg: ingest.IngestConfig, store: ArtifactStore) -> Artifact:
    return ingest.run_ingest(ingest.IngestInputs(run_dir=_run_dir(store), cfg=cfg))


def run_pairs(cfg: pairs.PairsConfig, store: ArtifactStore) -> Artifact:
    return pairs.run_pairs(pairs.PairsInputs(run_dir=_run_dir(store), cfg=cfg))


def split_inputs(cfg: evaluate.EvaluateConfig, store: ArtifactStore | str, queries: Artifact | str) -> Any:
    run_dir = store if isinstance(store, str) else _run_dir(store)
    return split.SplitInputs(run_dir=run_dir, cfg=cfg, queries=_in(run_dir, "queries", queries))


def run_split(cfg: evaluate.EvaluateConfig, store: ArtifactStore, queries: Artifact) -> dict[str, Artifact]:
    return split.run_split(split_inputs(cfg, store, queries))


def split_fingerprints(cfg: evaluate.EvaluateConfig, queries_fp: str) -> dict[str, str]:
    return split_inputs(cfg, "", queries_fp).fingerprints()


# --- generate, mine, label ------------------------------------------------------------------------------------

def generate_inputs(cfg: generate.GenerateConfig, store: ArtifactStore | str, corpus: Artifact | str,
                    generator: str = "", shard_size: int = generate.DEFAULT_SHARD_SIZE) -> generate.GenerateInputs:
    run_dir = store if isinstance(store, str) else _run_dir(store)
    return generate.GenerateInputs(run_dir=run_dir, cfg=cfg, corpus=_in(run_dir, "corpus", corpus), generator=generator,
                                   shard_size=shard_size)


def run_generate(cfg: generate.GenerateConfig, store: ArtifactStore, corpus: Artifact, generator: str,
                 shard_size: int = generate.DEFAULT_SHARD_SIZE, on_progress: Any = None) -> Artifact:
    return generate.run_generate(generate_inputs(cfg, store, corpus, generator, shard_size), on_progress)


def GenerateJob(cfg: generate.GenerateConfig, store: ArtifactStore, corpus: Artifact, generator: str,
                shard_size: int = generate.DEFAULT_SHARD_SIZE) -> generate.GenerateJob:
    return generate.GenerateJob(generate_inputs(cfg, store, corpus, generator, shard_size))


def generate_fingerprint(cfg: generate.GenerateConfig, corpus_fp: str, generator: str) -> str:
    return generate_inputs(cfg, "", corpus_fp, generator).fingerprint()


def mine_inputs(cfg: mine.MineConfig, store: ArtifactStore | str, corpus: Artifact | str, queries: Artifact | str,
                retrievers: Sequence[Sequence[str]], shard_size: int = mine.DEFAULT_SHARD_SIZE) -> mine.MineInputs:
    run_dir = store if isinstance(store, str) else _run_dir(store)
    return mine.MineInputs(run_dir=run_dir, cfg=cfg, corpus=_in(run_dir, "corpus", corpus),
                           queries=_in(run_dir, "queries", queries),
                           retrievers=tuple(tuple(r) for r in retrievers), shard_size=shard_size)


def run_mine(cfg: mine.MineConfig, store: ArtifactStore, corpus: Artifact, queries: Artifact,
             retrievers: Sequence[Sequence[str]], shard_size: int = mine.DEFAULT_SHARD_SIZE,
             on_progress: Any = None) -> Artifact:
    return mine.run_mine(mine_inputs(cfg, store, corpus, queries, retrievers, shard_size), on_progress)


def MineJob(cfg: mine.MineConfig, store: ArtifactStore, corpus: Artifact, queries: Artifact,
            retrievers: Sequence[Sequence[str]], shard_size: int = mine.DEFAULT_SHARD_SIZE) -> mine.MineJob:
    return mine.MineJob(mine_inputs(cfg, store, corpus, queries, retrievers, shard_size))


def mine_fingerprint(cfg: mine.MineConfig, corpus_fp: str, queries_fp: str,
                     retrievers: Sequence[Sequence[str]]) -> str:
    return mine_inputs(cfg, "", corpus_fp, queries_fp, retrievers).fingerprint()


def label_inputs(cfg: label.LabelConfig, store: ArtifactStore | str, corpus: Artifact | str,
                 queries: Artifact | str, negatives: Artifact | str, teacher: str, n_triples: int,
                 shard_size: int = label.DEFAULT_SHARD_SIZE) -> label.LabelInputs:
    run_dir = store if isinstance(store, str) else _run_dir(store)
    refs = [_in(run_dir, name, a) for name, a in (("corpus", corpus), ("queries", queries), ("negatives", negatives))]
    return label.LabelInputs(run_dir=run_dir, cfg=cfg, triples=n_triples, corpus=refs[0], queries=refs[1],
                             negatives=refs[2], teacher=teacher, shard_size=shard_size)


def run_label(cfg: label.LabelConfig, store: ArtifactStore, corpus: Artifact, queries: Artifact,
              negatives: Artifact, teacher: str, n_triples: int, shard_size: int = label.DEFAULT_SHARD_SIZE,
              on_progress: Any = None) -> Artifact:
    return label.run_label(label_inputs(cfg, store, corpus, queries, negatives, teacher, n_triples, shard_size),
                           on_progress)


def LabelJob(cfg: label.LabelConfig, store: ArtifactStore, corpus: Artifact, queries: Artifact,
             negatives: Artifact, teacher: str, n_triples: int,
             shard_size: int = label.DEFAULT_SHARD_SIZE) -> label.LabelJob:
    return label.LabelJob(label_inputs(cfg, store, corpus, queries, negatives, teacher, n_triples, shard_size))


def label_fingerprint(cfg: label.LabelConfig, n_triples: int, corpus_fp: str, queries_fp: str, negatives_fp: str,
                      teacher: str) -> str:
    return label_inputs(cfg, "", corpus_fp, queries_fp, negatives_fp, teacher, n_triples).fingerprint()


# --- pretrain, train --------------------------------------------------------------------------------------------

def pretrain_inputs(cfg: pretrain.PretrainConfig, store: ArtifactStore | str, corpus: Artifact | str,
                    base_model: str) -> pretrain.PretrainInputs:
    run_dir = store if isinstance(store, str) else _run_dir(store)
    return pretrain.PretrainInputs(run_dir=run_dir, cfg=cfg, corpus=_in(run_dir, "corpus", corpus),
                                   base_model=base_model)


def run_pretrain(cfg: pretrain.PretrainConfig, store: ArtifactStore, corpus: Artifact, base_model: str,
                 on_progress: Any = None) -> Artifact:
    return pretrain.run_pretrain(pretrain_inputs(cfg, store, corpus, base_model), on_progress)


def pretrain_fingerprint(cfg: pretrain.PretrainConfig, corpus_fp: str, base_model: str) -> str:
    return pretrain_inputs(cfg, "", corpus_fp, base_model).fingerprint()


def train_inputs(cfg: train.TrainConfig, store: ArtifactStore | str, base_model: str, corpus: Artifact | str,
                 queries: Artifact | str, triples: Artifact | str | None) -> train.TrainInputs:
    run_dir = store if isinstance(store, str) else _run_dir(store)
    refs = [_in(run_dir, name, a) for name, a in (("corpus", corpus), ("queries", queries), ("triples", triples))]
    return train.TrainInputs(run_dir=run_dir, cfg=cfg, base_model=base_model, corpus=refs[0], queries=refs[1],
                             triples=refs[2])


def run_train(cfg: train.TrainConfig, store: ArtifactStore, base_model: str, corpus: Artifact, queries: Artifact,
              triples: Artifact | None, callbacks: Sequence[Any] = ()) -> Artifact:
    return train.run_train(train_inputs(cfg, store, base_model, corpus, queries, triples), callbacks)


def train_fingerprint(cfg: train.TrainConfig, base_model: str, data_fp: str, corpus_fp: str) -> str:
    """``data_fp``: the triples' fingerprint for margin_mse, the queries' for mnrl."""
    return train_inputs(cfg, "", base_model, corpus_fp, data_fp, data_fp).fingerprint()


def run_train_pairs(cfg: train.TrainConfig, store: ArtifactStore, base_model: str, pairs: Artifact,
                    callbacks: Sequence[Any] = (), silver: Artifact | None = None) -> Artifact:
    run_dir = _run_dir(store)
    inputs = train.TrainPairsInputs(run_dir=run_dir, cfg=cfg, base_model=base_model,
                                    pairs=_in(run_dir, "pairs", pairs), silver=_in(run_dir, "silver", silver))
    return train.run_train_pairs(inputs, callbacks)


# --- augmented SBERT ------------------------------------------------------------------------------------------

def run_cross_encoder(cfg: augment.AugmentConfig, store: ArtifactStore, start: str, pairs: Artifact) -> Artifact:
    run_dir = _run_dir(store)
    return augment.run_cross_encoder(augment.CrossEncoderInputs(run_dir=run_dir, cfg=cfg, start=start,
                                                                pairs=_in(run_dir, "pairs", pairs)))


def run_sample(cfg: augment.AugmentConfig, store: ArtifactStore, corpus: Artifact, pairs: Artifact,
               bi_encoder: str) -> Artifact:
    run_dir = _run_dir(store)
    return augment.run_sample(augment.SampleInputs(run_dir=run_dir, cfg=cfg, corpus=_in(run_dir, "corpus", corpus),
                                                   pairs=_in(run_dir, "pairs", pairs), bi_encoder=bi_encoder))


def run_silver(cfg: augment.AugmentConfig, store: ArtifactStore, candidates: Artifact,
               cross_encoder: Artifact) -> Artifact:
    run_dir = _run_dir(store)
    return augment.run_silver(augment.SilverInputs(run_dir=run_dir, cfg=cfg,
                                                   candidates=_in(run_dir, "silver-candidates", candidates),
                                                   cross_encoder=_in(run_dir, "cross-encoder", cross_encoder)))


# --- evaluate -----------------------------------------------------------------------------------------------

def evaluate_inputs(cfg: evaluate.EvaluateConfig, store: ArtifactStore | str, corpus: Artifact | str,
                    models: Mapping[str, str], adapted_fp: str | None = None, heldout: Artifact | str | None = None,
                    teacher: Any = None) -> evaluate.EvaluateInputs:
    run_dir = store if isinstance(store, str) else _run_dir(store)
    return evaluate.EvaluateInputs(run_dir=run_dir, cfg=cfg, corpus=_in(run_dir, "corpus", corpus),
                                   models=dict(models), adapted_fp=adapted_fp,
                                   heldout=_in(run_dir, "heldout", heldout), teacher=teacher)


def run_evaluate(cfg: evaluate.EvaluateConfig, store: ArtifactStore, corpus: Artifact, models: dict[str, str],
                 adapted_fp: str | None = None, heldout: Artifact | None = None, teacher: Any = None) -> Artifact:
    return evaluate.run_evaluate(evaluate_inputs(cfg, store, corpus, models, adapted_fp, heldout, teacher))


def fingerprint_for(cfg: evaluate.EvaluateConfig, corpus_fp: str, model_refs: Mapping[str, str],
                    adapted_fp: str | None = None, heldout_fp: str | None = None, teacher: Any = None) -> str:
    return evaluate_inputs(cfg, "", corpus_fp, model_refs, adapted_fp, heldout_fp, teacher).fingerprint()
