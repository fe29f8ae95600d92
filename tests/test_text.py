"""How a corpus row reads as text (``adapters/text.py``)."""

from __future__ import annotations

import pyarrow as pa

from gplflow.adapters.text import passage_text, passage_texts, split_sentences


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


def test_split_sentences_keeps_abbreviations_initials_and_decimals():
    paragraph = (
        "Dr. Smith keeps 3.5 hives, e.g. near the river. Do bees sting? Yes! "
        'They do when threatened. "Smoke calms them." J. R. Lee wrote that in 1998. '
        "Colonies grew by 12.5 percent in the U.S. last year."
    )
    assert split_sentences(paragraph) == [
        "Dr. Smith keeps 3.5 hives, e.g. near the river.",
        "Do bees sting?",
        "Yes!",
        "They do when threatened.",
        '"Smoke calms them."',
        "J. R. Lee wrote that in 1998.",
        "Colonies grew by 12.5 percent in the U.S. last year.",
    ]


def test_split_sentences_at_blank_lines_not_before_lowercase():
    text = "A heading without a period\n\nFirst line. 42 bees left. the end is lowercase.\n  \n"
    expected = ["A heading without a period", "First line.", "42 bees left. the end is lowercase."]
    assert split_sentences(text) == expected
    assert split_sentences("") == [] and split_sentences(" \n\n ") == []
    assert split_sentences('He said "go." Then he left! Did he? e.g. this stays.') == [
        'He said "go."', "Then he left!", "Did he? e.g. this stays."]


def test_split_sentences_beyond_ascii():
    assert split_sentences("第一句。第二句！") == ["第一句。", "第二句！"]  # CJK full stops need no space
    assert split_sentences("「これは本です。」次の文。 Third one.") == ["「これは本です。」", "次の文。", "Third one."]
    assert split_sentences("Привет. Как дела? Wait… Éclairs now. über alles.") == [
        "Привет.", "Как дела?", "Wait…", "Éclairs now. über alles."]  # capitals of any script; lower case continues
    assert split_sentences("Bees. (They sting.) 'Quoted.' End") == ["Bees.", "(They sting.)", "'Quoted.'", "End"]
