"""How a corpus row reads as text (``adapters/text.py``)."""

from __future__ import annotations

import pyarrow as pa

from gplflow.adapters.text import passage_text, passage_texts


def test_passage_text_is_title_space_text_stripped():
    assert passage_text("Bees", "Bees make honey.") == "Bees Bees make honey."
    assert passage_text("", "Bees make honey.") == "Bees make honey."  # no leading space without a title
    assert passage_text(None, "Bees make honey.") == "Bees make honey."
    assert passage_text("  ", " Bees make honey. ") == "Bees make honey."
    assert passage_text("Bees", "") == "Bees"


def test_passage_texts_reads_the_title_and_text_columns():
    table = pa.table({"doc_id": ["a", "b", "c"], "title": ["T", "", None], "text": ["x y", "z", "w"]})
    assert passage_texts(table) == ["T x y", "z", "w"]
    assert passage_texts(table.to_batches()[0]) == ["T x y", "z", "w"]
