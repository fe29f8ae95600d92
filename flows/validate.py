"""Checks of a whole run before its first stage: what would otherwise fail hours later, after the GPU work.

A missing qrels file is otherwise found after training and a missing base model after labelling. Every check
here is cheap (file names, a model folder's config, the qrels and queries parsed, the Hugging Face cache
looked up) and runs before any Prefect server starts. Problems are reported together in one ``ConfigError``
line, each prefixed by where its key came from: ``--set KEY=VALUE``, the config file, or a default.

Hub models come first: when a model slot names a hub id, one request with a short timeout (``HUB_TIMEOUT_S``)
tells whether the hub answers. When it is off or unreachable and a model is not in the cache, the error has
one line per such model with its fix (``HubUnavailableError``), in seconds rather than after minutes of
retries per file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec

from gplflow.adapters.model_refs import HubUnavailableError, hub_problem, use_cache_only
from gplflow.flows import local_devices
from gplflow.flows.config import ConfigError, KeyOrigins, PipelineConfig
from gplflow.flows.stages import models_used

logger = logging.getLogger(__name__)

_TRUE = {"1", "on", "yes", "true"}
_CONFIG_FILES = ("config.json", "modules.json")  # a transformers or a sentence-transformers model folder


_PASSED: dict[tuple[str, str], float] = {}  # (config, run directory) -> when validate_run last passed it, here
RECHECK_AFTER_S = 60.0  # a run checked this recently in this process is not checked again


def validate_run(cfg: PipelineConfig, run_dir: str, config_path: str | Path | None = None,
                 overrides: Sequence[str] = ()) -> None:
    """Raise a one-line ``ConfigError`` naming every problem of the run ``cfg`` would start in ``run_dir``.

    Once per run: the CLI checks before Prefect starts and the flow checks again when it begins (a deployment's
    run has no CLI before it), so the same config and run directory passed in this process within
    ``RECHECK_AFTER_S`` are not checked twice (an LLM endpoint is asked ``GET /models`` once, not twice)."""
    key = (cfg.model_dump_json(), str(run_dir))
    if time.monotonic() - _PASSED.get(key, -math.inf) < RECHECK_AFTER_S:
        return
    _check(cfg, run_dir, config_path, overrides)
    _PASSED[key] = time.monotonic()


def _check(cfg: PipelineConfig, run_dir: str, config_path: str | Path | None, overrides: Sequence[str]) -> None:
    origins = KeyOrigins.of(config_path, overrides)
    hub = _hub_lines(cfg, origins)  # first: one request, seconds at most, before any model is looked for
    problems = [f"{origins.prefix(key)}: '{key}': {problem}" for key, problem in _problems(cfg)]
    if (problem := run_dir_problem(run_dir)) is not None:
        problems.append(problem)
    if hub:
        raise HubUnavailableError("\n".join([*hub, *problems]))
    if problems:
        raise ConfigError("; ".join(problems))


def _hub_lines(cfg: PipelineConfig, origins: KeyOrigins) -> list[str]:
    """The models that need the Hugging Face Hub when it is off (``HF_HUB_OFFLINE``) or unreachable (checked
    once, with a short timeout): a header, a line per model with its fix, and the general fix; [] when none.

    When the hub is unreachable but holds nothing the run needs (every hub model is in the cache), the process
    loads from the cache alone: without that, each file of each model would be retried before the cache is used.
    """
    names: dict[str, list[str]] = {}
    for key, ref in _model_slots(cfg):
        if (name := _hub_name(ref)) is not None:
            names.setdefault(name, []).append(key)
    if not names:
        return []
    if offline():
        cause = "HF_HUB_OFFLINE=1 keeps the hub off"
    elif (problem := hub_problem()) is not None:
        cause = f"the Hugging Face Hub is unreachable ({problem})"
    else:
        return []
    missing = {name: keys for name, keys in names.items() if not _cached(name)}
    if not missing:
        if not offline():
            use_cache_only()
            logger.info("%s: loading %d model(s) from the Hugging Face cache only", cause, len(names))
        return []
    lines = [f"{len(missing)} model(s) cannot be loaded: {cause}"]
    for name, keys in missing.items():
        where = ", ".join(f"'{k}'" for k in keys)
        lines.append(f"  {origins.prefix(keys[0])}: {where}: {name!r} is not a local folder and not in the Hugging "
                     f"Face cache: put a saved model folder there (--set {keys[0]}=FOLDER)")
    lines.append("  fix: a local model folder in each slot above, or download the models once where the hub is "
                 "reachable (then HF_HUB_OFFLINE=1 loads them from the cache)")
    return lines


def _hub_name(ref: str) -> str | None:
    """``ref`` as a hub id when loading it needs the hub or its cache (not ``tiny``, a local folder or a path)."""
    from gplflow.adapters.model_refs import TINY, ModelUnavailableError, resolve

    if ref == TINY:
        return None
    try:
        name = resolve(ref)
    except ModelUnavailableError:
        return None
    if Path(name).expanduser().exists() or name.count("/") > 1 or name.startswith(("/", ".", "~")):
        return None
    return name


def _problems(cfg: PipelineConfig) -> Iterator[tuple[str, str]]:
    yield from _name(cfg.name)
    if cfg.corpus is not None and (problem := _missing(cfg.corpus.path, "file or folder")) is not None:
        yield "corpus.path", problem
    if cfg.import_.gpl_dir and (problem := _missing(cfg.import_.gpl_dir, "folder")) is not None:
        yield "import.gpl_dir", problem
    if cfg.pairs is not None and (problem := _missing(cfg.pairs.path, "file", folder_ok=False)) is not None:
        yield "pairs.path", problem
    yield from _retrievers(cfg)
    for key, ref in _model_slots(cfg):
        if (problem := model_problem(ref)) is not None:
            yield key, problem
    yield from _evaluation(cfg)
    if cfg.execution.mode == "local" and (problem := local_devices.problem(cfg.execution.devices)) is not None:
        yield "execution.devices", problem
    if cfg.generate.method == "llm" and cfg.uses_queries and not cfg.import_.gpl_dir:
        yield from _llm(cfg)
    if cfg.uses_queries:
        from gplflow.tasks.filter import problems as filter_problems

        yield from filter_problems(cfg)  # settings of the filter that do not fit the rest of the config


def _llm(cfg: PipelineConfig) -> Iterator[tuple[str, str]]:
    """generate.method llm: the prompt files, and an endpoint that answers and serves the model (one GET /models,
    seconds at most; the openai package is imported only here and only then)."""
    from gplflow.tasks.generate import llm_problems

    yield from llm_problems(cfg.generate)


def _name(name: str) -> Iterator[tuple[str, str]]:
    """The name makes the default run directory runs/<name>: it must stay one folder inside runs/."""
    if not name.strip() or name in (".", "..") or ".." in name or any(sep in name for sep in ("/", "\\", "\0")):
        yield "name", f"{name!r} must be a plain folder name (no '/', '\\' or '..'): it names runs/<name>"


def _retrievers(cfg: PipelineConfig) -> Iterator[tuple[str, str]]:
    if not cfg.is_gpl or cfg.models.retrievers or cfg.import_.gpl_dir:
        return
    if not cfg.mine.bm25:
        yield "models.retrievers", "empty: list at least one dense retriever, or set mine.bm25: true to mine " \
                                   "with BM25 only"
    if cfg.label.teacher == "bi_encoder" and not cfg.models.bi_encoder_teacher:
        yield "models.bi_encoder_teacher", "not set, and models.retrievers is empty (its default is the first " \
                                           "retriever): name the bi-encoder teacher, or use label.teacher: " \
                                           "cross_encoder"


def _model_slots(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """The model references this run loads, by key, each once (the base first): what the registry's stages say
    they load."""
    uses = sorted(models_used(cfg), key=lambda use: use.key != "models.base")
    return list({use.key: use.ref for use in uses}.items())


def model_problem(ref: str) -> str | None:
    """Why ``ref`` cannot be loaded here, or None: a local folder needs a model config (hub names are checked
    together, by ``_hub_lines``)."""
    from gplflow.adapters.model_refs import TINY, ModelUnavailableError, resolve

    if ref == TINY:
        return None
    try:
        name = resolve(ref)
    except ModelUnavailableError as err:
        return str(err)
    path = Path(name).expanduser()
    if path.exists():
        return _folder_problem(path)
    if name.count("/") > 1 or name.startswith(("/", ".", "~")):  # not a hub id (org/name) either
        return f"{name}: no such model folder"
    return None  # a hub name: _hub_lines says when the hub cannot serve it


def _folder_problem(path: Path) -> str | None:
    if not path.is_dir():
        return f"{path}: is a file, expected a model folder"
    found = [path / name for name in _CONFIG_FILES if (path / name).is_file()]
    if not found:
        return f"{path}: no {' or '.join(_CONFIG_FILES)} in this folder; it is not a saved model"
    for file in found:
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"{file}: unreadable model config ({str(err).splitlines()[0]})"
        if not isinstance(config, dict | list):
            return f"{file}: not a model config (holds {type(config).__name__})"
    return None


def offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _cached(name: str) -> bool:
    """Whether the Hugging Face cache holds ``name`` (sentence-transformers' short names too)."""
    from gplflow.adapters.model_refs import cached_revision

    return cached_revision(name) is not None


def _evaluation(cfg: PipelineConfig) -> Iterator[tuple[str, str]]:
    """The qrels and queries files exist, are files, and parse (every judged query has a text)."""
    from gplflow.adapters.beir_io import BeirFormatError, default_queries_path, load_eval_set

    for key, path, what in (("evaluate.sts.path", cfg.evaluate.sts and cfg.evaluate.sts.path, "STS pairs file"),
                            ("evaluate.clustering.labels", cfg.evaluate.clustering and cfg.evaluate.clustering.labels,
                             "labels file")):
        if path and (problem := _missing(path, what, folder_ok=False)) is not None:
            yield key, problem
    if cfg.evaluate.mteb is not None:
        yield from _mteb(cfg)
    qrels = cfg.evaluate.qrels
    if not qrels:
        return
    queries = cfg.evaluate.queries or default_queries_path(qrels)
    missing = [(key, problem) for key, path, what in (("evaluate.qrels", qrels, "qrels TSV file"),
                                                      ("evaluate.queries", queries, "queries.jsonl file"))
               if (problem := _missing(path, what, folder_ok=False)) is not None]
    if missing:
        yield from missing
        return
    try:
        load_eval_set(qrels, queries)
    except (BeirFormatError, OSError) as err:
        key = "evaluate.queries" if str(err).startswith(queries) else "evaluate.qrels"
        yield key, str(err).splitlines()[0]


def _mteb(cfg: PipelineConfig) -> Iterator[tuple[str, str]]:
    """Every MTEB task named resolves (when mteb is installed; without it the evaluation skips them)."""
    from gplflow.adapters.errors import InputError
    from gplflow.tasks.evaluators import mteb_tasks, mteb_version

    if mteb_version() is None:
        return
    try:
        mteb_tasks(cfg.evaluate.mteb)
    except InputError as err:
        yield "evaluate.mteb.tasks", str(err).removeprefix("evaluate.mteb.tasks: ")


def _missing(path: str, what: str, folder_ok: bool = True) -> str | None:
    """Why ``path`` (local or fsspec URL) is not there as ``what``, or None."""
    try:
        fs, root = fsspec.core.url_to_fs(path)
        if not fs.exists(root):
            return f"{path}: no such {what}"
        if not folder_ok and fs.isdir(root):
            return f"{path}: is a folder, expected a {what}"
    except (OSError, ValueError, ImportError) as err:  # an unknown protocol, unreachable storage
        return f"{path}: cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def run_dir_problem(run_dir: str) -> str | None:
    """Why a local run directory cannot be written (a file, or no write permission), or None.

    A directory that does not exist yet must be creatable: its nearest existing parent is a writable folder.
    Remote (fsspec URL) run directories are not checked here.
    """
    fs, root = fsspec.core.url_to_fs(str(run_dir))
    if "file" not in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)):
        return None
    path = Path(root)
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        return f"run directory {run_dir}: {where}, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f"cannot be created: {existing} "
        return f"run directory {run_dir}: {where}not writable (permission denied)"
    return None
