"""``write_artifact``: publish rows as a valid artifact of any stage, with the columns of ``adapters/artifacts.py``.

Tests that need an input artifact (a corpus, queries, negatives, triples) write it with this instead of
opening a ``store.writer`` by hand, so they follow the one artifact contract the stages follow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from gplflow.adapters import artifacts
from gplflow.adapters.store import Artifact, ArtifactStore, canonical_json

Row = Mapping[str, Any] | Sequence[Any]


def write_artifact(store: ArtifactStore, stage: str, rows: Sequence[Row], *, parts: int | Sequence[int] = 1,
                   config: Mapping[str, Any] | None = None, counters: Mapping[str, int] | None = None,
                   extra: Mapping[str, Any] | None = None, schema: pa.Schema | None = None,
                   inputs: Mapping[str, str] | None = None) -> Artifact:
    """Publish ``rows`` as ``stage``'s artifact and return it.

    A row is a dict, or a tuple in the schema's column order. ``parts``: how many parts to split the rows into
    (evenly), or the size of each part. The config defaults to a digest of the rows, so the same rows give the
    same fingerprint and other rows another. ``schema``: another layout the stage allows (queries with ``logprob``);
    ``inputs``: the fingerprints of the artifacts it was made from, as its manifest names them.
    """
    schema = schema or schema_of(stage, rows)
    table = pa.Table.from_pylist([_as_dict(row, schema) for row in rows], schema=schema)
    sizes = [len(c) for c in np.array_split(np.arange(len(rows)), parts)] if isinstance(parts, int) else parts
    if sum(sizes) != len(rows):
        raise ValueError(f"parts {list(sizes)} do not add up to the {len(rows)} rows")
    if config is None:
        config = {"rows": hashlib.sha256(canonical_json(table.to_pylist()).encode()).hexdigest()[:16]}
    with store.writer(stage, config=config, inputs=inputs) as out:
        start = 0
        for size in sizes:
            out.write_part([table.slice(start, size)], schema)
            start += size
        for name, value in (counters or {}).items():
            out.count(name, value)
        out.extra.update(extra or {})
    return store.require(stage)


def schema_of(stage: str, rows: Sequence[Row]) -> pa.Schema:
    """The stage's schema; for ``pairs`` the kind the first row has (scored, or ranking with or without negative)."""
    if stage != artifacts.PAIRS:
        return artifacts.SCHEMAS[stage]
    first = rows[0] if rows else {}
    if not isinstance(first, Mapping):
        raise ValueError("pairs rows must be dicts (the columns say which kind of pairs they are)")
    return artifacts.pairs_schema("scored" if "score" in first else "ranking", with_negative="negative" in first)


def _as_dict(row: Row, schema: pa.Schema) -> Mapping[str, Any]:
    return row if isinstance(row, Mapping) else dict(zip(schema.names, row, strict=True))
