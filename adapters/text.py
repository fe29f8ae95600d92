"""How a corpus row reads as text: one rule for every stage that shows a passage to a model.

A passage is ``title + " " + text``, stripped (just the text when the title is empty), as the GPL paper and
the reference implementation (UKPLab gpl) give passages to the generator, the retrievers, the cross-encoder and
the student alike. Generation, mining, labelling, training, evaluation, MLM pretraining and the plan's
calibration all read passages through here, so the teacher scores the very text the student is trained on.
"""

from __future__ import annotations

import pyarrow as pa


def passage_text(title: str | None, text: str | None) -> str:
    """``title + " " + text``, stripped: the text alone when there is no title."""
    return f"{title or ''} {text or ''}".strip()


def passage_texts(rows: pa.Table | pa.RecordBatch) -> list[str]:
    """``passage_text`` of every row of a table or batch with ``title`` and ``text`` columns."""
    titles, texts = rows.column("title").to_pylist(), rows.column("text").to_pylist()
    return [passage_text(title, text) for title, text in zip(titles, texts, strict=True)]
