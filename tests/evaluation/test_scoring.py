"""Answer scorers: normalisation, exact, contains, choice and list answers."""

import pytest

from mcl.errors import DataError, UnknownNameError
from mcl.evaluation.scoring import SCORERS, answer_types, extract_choice, normalize_answer, score


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The Cat!  ", "cat"),
        ("A  red\tapple.", "red apple"),
        ("an Owl, the end", "owl end"),
        ("It costs 3.5 dollars.", "it costs 3.5 dollars"),
        ("1,000,000.", "1,000,000"),
        ("10:30, 1/2", "10:30 1/2"),
        ("-3 degrees; x-3", "-3 degrees x 3"),
        ("Don't stop", "dont stop"),
        ("well-known", "well known"),
        ("snake_case", "snake case"),
        ("theory", "theory"),
        ("ＡＢＣ", "abc"),
        ("...", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("The cat.", "cat", 1.0),
        ("CAT", "a cat", 1.0),
        ("cats", "cat", 0.0),
        ("3.5", "3.5", 1.0),
        ("3.50", "3.5", 0.0),
        ("35", "3.5", 0.0),
        ("new  york", "New-York", 1.0),
        ("a cat", "dog", 0.0),
        ("", "", 1.0),
    ],
)
def test_exact(prediction, answer, expected):
    assert score(prediction, answer, "exact") == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("I see a cat on the mat.", "cat", 1.0),
        ("This is a category.", "cat", 0.0),
        ("Concatenate", "cat", 0.0),
        ("It is in New York City", "new york", 1.0),
        ("York, new", "new york", 0.0),
        ("the price is 3.5 dollars", "3.5", 1.0),
        ("the price is 13.5 dollars", "3.5", 0.0),
        ("the price is 3.55 dollars", "3.5", 0.0),
        ("version 3.5.", "3.5", 1.0),
        ("CAT!", "Cat", 1.0),
        ("the cat", "the", 0.0),
        ("", "the", 1.0),
    ],
)
def test_contains(prediction, answer, expected):
    assert score(prediction, answer, "contains") == expected


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        (" B ", "B"),
        ("B) a red apple", "B"),
        ("b) a red apple", "B"),
        ("B. A red apple", "B"),
        ("(C) the dog", "C"),
        ("Answer: B", "B"),
        ("Answer:B", "B"),
        ("the answer is b", "B"),
        ("The answer is B because the apple is red.", "B"),
        ("The answer is (D).", "D"),
        ("The correct option is C.", "C"),
        ("I pick (C).", "C"),
        ("B. The apple. Answer: B", "B"),
        ("A", "A"),
    ],
)
def test_extract_choice(prediction, letter):
    assert extract_choice(prediction) == letter


@pytest.mark.parametrize(
    "prediction",
    [
        "",
        "A cat is on the mat",  # the article, not option A
        "The answer is a cat",
        "the answer is b because",  # a lower-case letter followed by prose is too ambiguous
        "A or B",
        "(A) or (B)",
        "B. Answer: C",
        "The answers are here",
        "I don't know",
    ],
)
def test_extract_choice_finds_no_single_letter(prediction):
    assert extract_choice(prediction) is None


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("B", "B", 1.0),
        ("(b)", "B", 1.0),
        ("Answer: B", "(B)", 1.0),
        ("B) a red apple", "b", 1.0),
        ("C", "B", 0.0),
        ("(A) or (B)", "B", 0.0),
        ("A cat", "A", 0.0),
        ("nothing", "A", 0.0),
    ],
)
def test_choice(prediction, answer, expected):
    assert score(prediction, answer, "choice") == expected


@pytest.mark.parametrize("answer", ["", "AB", "apple", "(B) apple", "1"])
def test_choice_rejects_non_letter_answers(answer):
    with pytest.raises(DataError, match="single option letter"):
        score("B", answer, "choice")


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("a cat, a dog and a bird", "cat, dog, bird", 1.0),
        ("a cat and a bird", "cat, dog, bird, fish", 0.5),
        ("categories", "cat, dog", 0.0),
        ("The New York skyline and Paris", "new york, paris, rome", 2 / 3),
        ("cat", "cat, cat, ,dog", 0.5),  # duplicates and empty items are ignored
        ("Cat.", "cat", 1.0),
    ],
)
def test_list(prediction, answer, expected):
    assert score(prediction, answer, "list") == pytest.approx(expected)


@pytest.mark.parametrize("answer", ["", " , ,"])
def test_list_rejects_empty_answers(answer):
    with pytest.raises(DataError, match="no items"):
        score("cat", answer, "list")


def test_scores_are_in_unit_interval():
    for answer_type, answer in (("exact", "cat"), ("contains", "cat"), ("choice", "B"), ("list", "cat, dog")):
        for prediction in ("", "cat", "B", "a cat and a dog", "(B) cat"):
            assert 0.0 <= score(prediction, answer, answer_type) <= 1.0


def test_registry_lists_all_types():
    assert {"choice", "contains", "exact", "list"} <= set(answer_types())  # benchmark types: their own tests
    assert answer_types() == sorted(SCORERS)


def test_unknown_type_lists_valid_types():
    with pytest.raises(UnknownNameError) as info:
        score("cat", "cat", "fuzzy")
    message = str(info.value)
    assert "'fuzzy'" in message
    assert "choice, contains, exact, list" in message
    assert isinstance(info.value, KeyError)
