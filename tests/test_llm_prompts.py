"""LLM prompts and answer parsing: built-in templates, user templates and examples files, cleaning and drops."""

from __future__ import annotations

import pytest

from gplflow.adapters.errors import InputError, MissingInputError
from gplflow.adapters.llm_prompts import (
    BUILTIN_EXAMPLES,
    COPY,
    EMPTY,
    TOO_LONG,
    build_prompt,
    clean_query,
    parse_completions,
    read_examples,
)

PASSAGE = "Glaciers store most of the fresh water on Earth and move slowly under their own weight."


def test_builtin_prompts():
    zero = build_prompt("zero_shot")
    assert zero.examples == ()
    message = zero.user_message(PASSAGE)
    assert PASSAGE in message and message.endswith("Query:")
    few = build_prompt("few_shot")
    assert few.examples == BUILTIN_EXAMPLES
    text = few.user_message(PASSAGE)
    assert text.count("Good question:") == len(BUILTIN_EXAMPLES) + 1 and text.count("Bad question:") == 3
    assert text.endswith(f"Document: {PASSAGE}\nGood question:")
    assert [m["role"] for m in few.messages(PASSAGE)] == ["system", "user"]
    assert few.plain(PASSAGE).startswith(few.system) and few.plain(PASSAGE).endswith("Good question:")
    with pytest.raises(InputError, match="unknown built-in prompt 'three_shot'"):
        build_prompt("three_shot")


def test_user_template_and_examples(tmp_path):
    template = tmp_path / "prompt.txt"
    template.write_text("Examples:\n{examples}Text: {passage}\nA JSON-free {{question}}:", encoding="utf-8")
    examples = tmp_path / "examples.jsonl"
    examples.write_text('{"passage": "Tea  comes\\nfrom a plant.", "query": "where does tea come from"}\n\n'
                        '{"passage": "Bees dance.", "query": "why do bees dance", "extra": 1}\n', encoding="utf-8")
    prompt = build_prompt("zero_shot", str(template), str(examples))
    assert prompt.name == str(template)
    assert [(e.passage, e.query) for e in prompt.examples] == [("Tea comes from a plant.", "where does tea come from"),
                                                              ("Bees dance.", "why do bees dance")]
    text = prompt.user_message(PASSAGE)
    assert "Document: Tea comes from a plant.\nGood question: where does tea come from\n" in text
    assert "Bad question" not in text and text.endswith("A JSON-free {question}:")
    record = prompt.record()
    assert record["examples"] == 2 and record["template"] == template.read_text()
    assert len(record["examples_sha256"]) == 64
    # a template without {examples} is zero-shot: the examples file is not even read
    template.write_text("Q for: {passage}", encoding="utf-8")
    assert build_prompt("few_shot", str(template), str(tmp_path / "absent.jsonl")).examples == ()


@pytest.mark.parametrize(("text", "message"), [
    ("Doc: {passage} {context}", r"prompt.txt: unknown placeholder \{context\}"),
    ("Doc: {examples}", r"prompt.txt: the template has no \{passage\} placeholder"),
    ("Doc: {passage", r"prompt.txt: not a valid template"),
])
def test_bad_template_names_the_file(tmp_path, text, message):
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        build_prompt("zero_shot", str(tmp_path / "prompt.txt"))


def test_missing_template_and_examples(tmp_path):
    with pytest.raises(MissingInputError, match=r"generate.template: .*nope.txt: no such file"):
        build_prompt("zero_shot", str(tmp_path / "nope.txt"))
    with pytest.raises(InputError, match=r"generate.examples: .*nope.jsonl: no such file"):
        build_prompt("few_shot", "", str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("ex.jsonl", '{"passage": "a b", "query": "q"}\n{"passage": "c d"}\n', r"ex.jsonl line 2: field 'query' must be"),
    ("ex.jsonl", '{"passage": "a b", "query": "q"}\nnot json\n', r"ex.jsonl line 2: malformed JSON"),
    ("ex.jsonl", '{"passage": "a b", "query": 3}\n', r"ex.jsonl line 1: field 'query' .*, got number 3"),
    ("ex.tsv", "passage\tquery\na b\tq\n\t\n", r"ex.tsv row 2: field 'passage' must be a non-empty string"),
    ("ex.tsv", "text\tquery\na b\tq\n", r"ex.tsv line 1: no 'passage' column \(columns: 'text', 'query'\)"),
    ("ex.jsonl", "", r"ex.jsonl: no examples"),
    ("ex.jsonl", '{"passage": "a", "query": "q"}\n' * 9, r"ex.jsonl line 9: more than 8 examples"),
    ("ex.txt", "a\tb\n", r"cannot tell"),
])
def test_bad_examples_file_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message) as err:
        read_examples(str(path))
    assert "\n" not in str(err.value) and str(err.value).startswith("generate.examples: ")


def test_examples_tsv_reads(tmp_path):
    path = tmp_path / "ex.tsv"
    path.write_text("passage\tquery\nRivers shape valleys.\thow are valleys formed\n", encoding="utf-8")
    assert [(e.passage, e.query) for e in read_examples(str(path))] == [("Rivers shape valleys.",
                                                                         "how are valleys formed")]


@pytest.mark.parametrize(("answer", "query"), [
    ("what is a glacier", "what is a glacier"),
    ("  1. What is a glacier?\n2. Another one", "What is a glacier?"),
    ('Query: "how do glaciers move"', "how do glaciers move"),
    ("**Query:** where is most fresh water", "where is most fresh water"),
    ("Good question: “why are glaciers blue”", "why are glaciers blue"),
    ("\n\n- 'glacier speed'  \n", "glacier speed"),
    ("Question 1: how fast   do glaciers\tmove", "how fast do glaciers move"),
    ("1) Query: 'ice age'", "ice age"),
    ("", ""),
    ('""', ""),
    ("Query:", ""),
])
def test_clean_query(answer, query):
    assert clean_query(answer) == query


def test_clean_query_cuts_at_stop_strings():
    assert clean_query("how do glaciers move###Document: x", stop=("###",)) == "how do glaciers move"
    assert clean_query("how do glaciers move", stop=("",)) == "how do glaciers move"


def test_parse_drops_and_counts_by_reason():
    answers = [
        ("Query: how do glaciers move", -0.5),
        ("", -1.0),                                        # empty
        ("  ", None),                                      # empty
        (PASSAGE, -0.1),                                   # a copy of the passage
        ('"' + PASSAGE.upper() + '"', -0.1),               # a copy, in other case and quotes
        ("fresh water on Earth and move slowly under their own weight", -0.2),  # a long run of the passage: copy
        ("fresh water on Earth", -0.3),                    # a short run of the passage: kept
        (" ".join(["word"] * 9), -2.0),                    # over max_words
        ("2. where is the fresh water", None),
    ]
    parsed = parse_completions(answers, PASSAGE, max_words=8)
    assert parsed.queries == ["how do glaciers move", "fresh water on Earth", "where is the fresh water"]
    assert parsed.logprobs == [-0.5, -0.3, None]
    assert dict(parsed.drops) == {EMPTY: 2, COPY: 3, TOO_LONG: 1}
