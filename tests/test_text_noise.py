"""The offline word tokenizer and TSDAE deletion noise (the sentence splitter: tests/test_text.py)."""

from __future__ import annotations

import random

import pytest

from gplflow.adapters.text_noise import delete_words, detokenize, is_word, word_tokenize


def test_word_tokenize_and_detokenize():
    text = "Don't panic: the well-known 10,000 bees (e.g. workers) aren't 3.5% angry."
    tokens = word_tokenize(text)
    assert tokens == ["Don't", "panic", ":", "the", "well-known", "10,000", "bees", "(", "e.g", ".",
                      "workers", ")", "aren't", "3.5", "%", "angry", "."]
    assert detokenize(tokens) == text
    assert [is_word(t) for t in ("bees", "3.5", ".", "(")] == [True, True, False, False]


def _sentences(n: int, rng: random.Random) -> list[str]:
    vocabulary = [f"w{i}" for i in range(300)]
    return [" ".join(rng.choices(vocabulary, k=rng.randint(10, 20))) for _ in range(n)]


@pytest.mark.parametrize("ratio", [0.6, 0.3])
def test_delete_words_deletes_the_configured_fraction(ratio):
    rng = random.Random(0)
    sentences = _sentences(500, rng)
    total = sum(len(word_tokenize(s)) for s in sentences)
    kept = sum(len(word_tokenize(delete_words(s, ratio, rng))) for s in sentences)
    assert total > 5000
    assert abs((1 - kept / total) - ratio) < 0.05


def test_delete_words_keeps_order_and_is_seeded():
    sentence = "the queen lays up to two thousand eggs per day in spring"
    noisy = delete_words(sentence, 0.6, random.Random(3))
    tokens, source = noisy.split(), sentence.split()
    positions = [source.index(t) for t in tokens]
    assert 0 < len(tokens) < len(source) and positions == sorted(positions)
    assert noisy == delete_words(sentence, 0.6, random.Random(3))
    assert delete_words("Bees, hives and honey.", 0.0, random.Random(0)) == "Bees, hives and honey."


def test_delete_words_never_returns_an_empty_sentence():
    rng = random.Random(1)
    words = ["bee", "hive", "3.5", "wax", "don't", "Dr", "(", ",", ".", "!", "—"]
    for _ in range(3000):
        sentence = " ".join(rng.choices(words, k=rng.randint(1, 3)))
        noisy = delete_words(sentence, rng.choice([0.6, 0.9, 0.999]), rng)
        assert noisy.strip()
        if any(is_word(t) for t in word_tokenize(sentence)):
            assert any(is_word(t) for t in word_tokenize(noisy)), (sentence, noisy)
    assert delete_words("Bees", 0.999, rng) == "Bees"
    assert delete_words("...", 0.999, rng) == "."


def test_delete_words_rejects_a_bad_ratio():
    with pytest.raises(ValueError, match=r"noise ratio must be in \[0, 1\)"):
        delete_words("bees make honey", 1.0, random.Random(0))
