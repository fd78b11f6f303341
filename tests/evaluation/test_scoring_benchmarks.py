"""Benchmark scorers: MLLM-CL domains and abilities, OCRBench, VQAv2 soft accuracy, CoIN, MSVQA, token F1,
boxes."""

import json

import pytest

from mcl.errors import DataError
from mcl.evaluation.benchmark_scorers import (
    BENCHMARK_SCORERS,
    box_iou,
    extract_math_answer,
    normalize_vqa_answer,
    parse_boxes,
    parse_number,
    parse_references,
)
from mcl.evaluation.scoring import SCORERS, answer_types, register_scorer, score


def annotators(matching: int, total: int = 10, answer: str = "down") -> str:
    """A JSON list of ``total`` annotator answers of which ``matching`` are ``answer``."""
    return json.dumps([answer] * matching + ["table"] * (total - matching))


# ---------------------------------------------------------------------------------------------- MLLM-CL


@pytest.mark.parametrize("answer_type", ["mllmcl_rs", "mllmcl_ad"])
@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Yes", "yes", 1.0),
        ("no", "No", 1.0),
        ("There are 3 planes.", "3", 1.0),
        ("There are 13", "3", 0.0),  # none of " 3", "3 ", "3.", "3," occurs
        ("not sure", "no", 0.0),
        ("it is not", "no", 1.0),  # published one-sided check: " no" occurs in "is not"
        ("near the casino.", "no", 1.0),  # "no." occurs in "casino."
        ("i saw snow", "no", 0.0),
        ("snow", "no", 1.0),  # a one-word prediction only needs to contain the answer
        ("a large parking lot", "parking lot", 1.0),
        ("parking lots nearby", "parking lot", 1.0),  # multi-word answers are plain substrings
        ("The answer is yes.", "Yes.", 1.0),  # periods of a one-word answer are dropped
        ("Unanswerable, but yes", "yes", 0.0),
        ("unanswerable yes", "yes", 1.0),  # the Unanswerable check is case-sensitive, as published
    ],
)
def test_mllmcl_rs_and_ad(answer_type, prediction, answer, expected):
    assert score(prediction, answer, answer_type) == expected


def test_mllmcl_rs_one_sided_boundary_after_the_word():
    # "3 " is found in "13 planes": the published check bounds only one side of a one-word answer.
    assert score("I count 13 planes", "3", "mllmcl_rs") == 1.0


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Yes, it is", "yes", 1.0),
        ("The lesion is benign.", "Benign", 1.0),
        ("not visible", "no", 1.0),  # plain substring, no word boundaries
        ("malignant", "benign", 0.0),
        ("Unanswerable", "yes", 0.0),
    ],
)
def test_mllmcl_med(prediction, answer, expected):
    assert score(prediction, answer, "mllmcl_med") == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("B", "b", 1.0),
        ("B.", "B", 1.0),
        (" True. ", "true", 1.0),
        ("B. Revenue grew", "B", 0.0),  # exact match, not containment
        ("B\n", "B", 0.0),  # newlines are kept, as published
        ("Unanswerable", "B", 0.0),
        ("35", "3.5", 1.0),  # periods go on both sides (documented deviation)
    ],
)
def test_mllmcl_fin(prediction, answer, expected):
    assert score(prediction, answer, "mllmcl_fin") == expected


@pytest.mark.parametrize(
    ("answer_type", "prediction", "answer", "expected"),
    [
        ("mllmcl_sci_exact", "B", "b", 1.0),
        ("mllmcl_sci_exact", "B.", "B", 0.0),
        ("mllmcl_sci_exact", "Unanswerable", "B", 0.0),
        ("mllmcl_sci_list", "Texas, Ohio, Utah", "texas, ohio", 1.0),
        ("mllmcl_sci_list", "Texas,Maine", "Texas, Ohio", 0.5),
        ("mllmcl_sci_list", "Texas and Ohio", "Texas, Ohio", 0.0),  # items, not substrings
        ("mllmcl_sci_list", "ohio, texas", "Texas, Ohio, Iowa, Utah", 0.5),
        ("mllmcl_sci_contains", "The value is 42 in Texas", "42", 1.0),
        ("mllmcl_sci_contains", "Unanswerable 42", "42", 0.0),
        ("mllmcl_sci", "b", "B", 1.0),  # a letter: exact
        ("mllmcl_sci", "(b)", "B", 0.0),
        ("mllmcl_sci", "Ohio, Maine", "Ohio, Iowa", 0.5),  # a comma: list
        ("mllmcl_sci", "It has 1,000 people", "1,000", 1.0),  # a digit comma: containment
        ("mllmcl_sci", "the highest is Ohio", "ohio", 1.0),
    ],
)
def test_mllmcl_sci(answer_type, prediction, answer, expected):
    assert score(prediction, answer, answer_type) == expected


@pytest.mark.parametrize(
    ("answer_type", "prediction", "answer", "expected"),
    [
        ("mllmcl_ocr", "The sign says STOP here", "stop", 1.0),
        ("mllmcl_ocr", "Hello\nWorld", "helloworld", 1.0),  # newlines removed (OCRBench: a space)
        ("mllmcl_ocr", "Hello\nWorld", "hello world", 0.0),
        ("mllmcl_ocr", "it reads 1500", '["1,500", "1500"]', 1.0),  # any of several references
        ("mllmcl_ocr", "it reads 15", '["1,500", "1500"]', 0.0),
        ("mllmcl_ocr_hme", "x ^ { 2 } + 1", "x^{2}+1", 1.0),
        ("mllmcl_ocr_hme", "X^{2}+1", "x^{2}+1", 0.0),  # case-sensitive
        ("mllmcl_ocr_hme", "\\frac { a } { b }", '["\\\\frac{a}{b}", "a/b"]', 1.0),
    ],
)
def test_mllmcl_ocr(answer_type, prediction, answer, expected):
    assert score(prediction, answer, answer_type) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("There are 2 chairs.", "2", 1.0),
        ("There are 12 chairs.", "2", 1.0),  # no word boundaries, as published
        ("The cup is to the LEFT.", "left", 1.0),
        ("behind the table", "in front of", 0.0),
        ("infront of", "In front of.", 1.0),  # spaces and periods removed on both sides
    ],
)
def test_mllmcl_vp(prediction, answer, expected):
    assert score(prediction, answer, "mllmcl_vp") == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("so x = \\boxed{\\frac{1}{2}}.", ("\\frac{1}{2}", True)),
        ("\\boxed{3} then \\boxed{4}", ("4", True)),
        ("The answer is: 12 apples\nbecause", ("12 apples", True)),
        ("Answer: B", ("B", True)),
        ("7", ("7", False)),
    ],
)
def test_extract_math_answer(prediction, expected):
    assert extract_math_answer(prediction) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3.0),
        ("-2.5", -2.5),
        ("1,000", 1000.0),
        ("3/4", 0.75),
        ("\\frac{3}{4}", 0.75),
        ("50%", 50.0),
        ("$5", 5.0),
        ("x", None),
        ("2007, 2008", None),
        ("1/0", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("The answer is 3.0.", "3", 1.0),
        ("3", "3.0", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("So the result is \\boxed{0.333}", "1/3", 0.0),  # relative tolerance 1e-4
        ("So the result is \\boxed{0.33333}", "1/3", 1.0),
        ("There are 3 cats and 4 dogs, 7 in all", "7", 1.0),  # unmarked: the last number
        ("The answer is 12 apples, 3 rotten", "12", 1.0),  # marked: the first number after it
        ("It costs 1,000 dollars", "1000", 1.0),
        ("The answer is -3", "3", 0.0),
        ("The correct answer is (B) 8/11.", "B", 1.0),
        ("\\boxed{C}", "B", 0.0),
        ("A cat sits", "A", 0.0),  # prose, not option A
        ("The answer is a cylinder.", "Cylinder", 1.0),
        ("It looks like a cylinder", "cylinder", 0.0),  # unmarked text must equal the answer
        ("no number here", "5", 0.0),
    ],
)
def test_mllmcl_math(prediction, answer, expected):
    assert score(prediction, answer, "mllmcl_math") == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("B", "B", 1.0),
        ("(b)", "B. Open settings", 1.0),
        ("Answer: C", "B. Open settings", 0.0),
        ("Open settings.", "B. Open settings", 1.0),  # no letter named: the option text counts
        ("Open the settings menu", "(B) Open settings", 0.0),
        ("Open settings", "B", 0.0),  # no text given, no letter named
        ("A or B", "B", 0.0),
    ],
)
def test_mllmcl_gui(prediction, answer, expected):
    assert score(prediction, answer, "mllmcl_gui") == expected


# ------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        ("The end!", "end"),
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("1,000 people", "1000 people"),
        ("3.5", "3.5"),
        ("left-hand side", "left hand side"),
        ("yes, it is", "yes it is"),
        ("10:30", "10:30"),
        ("none\tat all", "0 at all"),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


@pytest.mark.parametrize(
    ("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_soft_leave_one_out(matching, expected):
    assert score("Down.", annotators(matching), "vqa_soft") == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("two", '["2", "2", "2"]', 2 / 3),  # 3 annotators: each leave-one-out subset has 2 matches
        ("Two", "2", 1.0),  # one plain answer: a normalised match
        ("2 dogs", "2", 0.0),
        ("yes", '["yes", "yes"]', 1 / 3),
        ("A dog", '["dog", "Dog", "the dog", "cat"]', 0.75),  # (3 * 2/3 + 1 * 1) / 4
    ],
)
def test_vqa_soft(prediction, answer, expected):
    assert score(prediction, answer, "vqa_soft") == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [("The boat.", "boat", 1.0), ("three", "3", 1.0), ("boats", "boat", 0.0), ("a red boat", "boat", 0.0)],
)
def test_msvqa(prediction, answer, expected):
    assert score(prediction, answer, "msvqa") == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("the cat sat", "a cat sat down", 0.8),  # p = 2/2, r = 2/3
        ("cat cat", "cat", 2 / 3),  # multiset overlap: p = 1/2, r = 1
        ("Dog!", "dog", 1.0),
        ("bird", "dog", 0.0),
        ("the", "a", 1.0),  # both empty after normalisation
        ("", "dog", 0.0),
        ("red car", '["blue car", "red car"]', 1.0),  # best reference
    ],
)
def test_token_f1(prediction, answer, expected):
    assert score(prediction, answer, "token_f1") == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------- boxes


def test_parse_boxes_and_iou():
    assert parse_boxes("a [1, 2, 3, 4] and [[5,6.5,7,8], [0, 0, 1e1, 10]]") == [
        (1, 2, 3, 4),
        (5, 6.5, 7, 8),
        (0, 0, 10, 10),
    ]
    assert parse_boxes("[1, 2, 3] [1, 2, 3, 4, 5]") == []
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("[0, 0, 10, 10]", "[0, 0, 10, 10]", 1.0),
        ("[0, 0, 10, 5]", "[0, 0, 10, 10]", 1.0),  # IoU exactly 0.5 matches
        ("[0, 0, 10, 5.1]", "[0, 0, 10, 10]", 1.0),  # IoU 0.51
        ("[0, 0, 10, 4.9]", "[0, 0, 10, 10]", 0.0),  # IoU 0.49
        ("[0, 0, 10, 10] [50, 50, 60, 60]", "[0, 0, 10, 10]", 2 / 3),  # an extra box costs precision
        ("[0, 0, 10, 10]", "[[0, 0, 10, 10], [50, 50, 60, 60]]", 2 / 3),  # a missed box costs recall
        ("[0, 0, 10, 10] [1, 0, 11, 10]", "[0, 0, 10, 10]", 2 / 3),  # one-to-one: no double counting
        ("no box", "[0, 0, 10, 10]", 0.0),
        ("[10, 10, 0, 0]", "[0, 0, 10, 10]", 0.0),  # inverted corners: no area
    ],
)
def test_box_iou(prediction, answer, expected):
    assert score(prediction, answer, "box_iou") == pytest.approx(expected)


def test_box_matching_is_maximal_not_greedy():
    # Reference A overlaps both predictions; reference B only the second. A greedy match of A to the
    # second prediction would leave B unmatched; the maximum matching pairs both.
    answer = "[[0, 0, 10, 10], [4, 0, 14, 10]]"
    prediction = "[2, 0, 12, 10] [0, 0, 10, 10]"
    assert score(prediction, answer, "box_iou") == 1.0


# -------------------------------------------------------------------------------------------- CoIN / UCIT


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Yes", "yes", 1.0),
        ("  UNANSWERABLE\n", "unanswerable", 1.0),  # the prediction is stripped, case is ignored
        ("Yes.", "yes", 0.0),  # nothing else is normalised (CoIN: pred.upper() == gt.upper())
        ("a dog", "dog", 0.0),
        ("two", "2", 0.0),
        ("coke", '["coca cola", "coke"]', 1.0),  # a JSON list: any reference counts
    ],
)
def test_caseless_exact(prediction, answer, expected):
    assert score(prediction, answer, "caseless_exact") == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("tench", "tench", 1.0),
        ("The object is a tench.", "tench", 1.0),  # the answer in the prediction
        ("tabby", "tabby cat", 1.0),  # the prediction in the answer (CoIN counts both ways)
        ("Tench", "tench", 0.0),  # case-sensitive, as published
        ("", "tench", 0.0),  # deviation: an empty prediction does not count
        ("goldfish", "tench", 0.0),
    ],
)
def test_substring_either(prediction, answer, expected):
    assert score(prediction, answer, "substring_either") == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("[0.1, 0.2, 0.5, 0.6]", "[0.1, 0.2, 0.5, 0.6]", 1.0),
        (" [0.1,0.2,0.5,0.6] ", "[0.1, 0.2, 0.5, 0.6]", 1.0),
        ("[0, 0, 10, 5]", "[0, 0, 10, 10]", 0.0),  # IoU exactly 0.5 is not above 0.5
        ("[0, 0, 10, 6]", "[0, 0, 10, 10]", 1.0),  # IoU 0.6
        ("The box is [0.1, 0.2, 0.5, 0.6].", "[0.1, 0.2, 0.5, 0.6]", 0.0),  # text around the box
        ("[0.1, 0.2, 0.5, 0.6] [0.1, 0.2, 0.5, 0.6]", "[0.1, 0.2, 0.5, 0.6]", 0.0),  # two boxes
        ("[0.1, 0.2, 0.5]", "[0.1, 0.2, 0.5, 0.6]", 0.0),
    ],
)
def test_single_box_iou(prediction, answer, expected):
    assert score(prediction, answer, "single_box_iou") == expected


# ------------------------------------------------------------------------------------------ bad references


@pytest.mark.parametrize(
    ("answer_type", "answer", "message"),
    [
        ("box_iou", "left side", "no \\[x1, y1, x2, y2\\] box"),
        ("box_iou", "[1, 2, 3]", "no \\[x1, y1, x2, y2\\] box"),
        ("box_iou", "[10, 0, 0, 10]", "needs x2 > x1"),
        ("box_iou", "[0, 0, 0, 10]", "needs x2 > x1"),
        ("vqa_soft", "[]", "list is empty"),
        ("vqa_soft", '[{"answer": "yes"}]', "strings or numbers"),
        ("mllmcl_ocr", '["abc", "  "]', "empty after normalisation"),
        ("mllmcl_rs", "", "empty after normalisation"),
        ("mllmcl_rs", ".", "empty after normalisation"),
        ("mllmcl_med", "", "empty after normalisation"),
        ("mllmcl_fin", " . ", "empty after normalisation"),
        ("mllmcl_sci_list", " , ", "no items"),
        ("mllmcl_vp", "\n", "empty after normalisation"),
        ("mllmcl_math", "  ", "empty after normalisation"),
        ("mllmcl_gui", "Open settings", "option letter"),
        ("token_f1", " ", "empty"),
        ("caseless_exact", "", "empty after normalisation"),
        ("substring_either", "", "empty after normalisation"),
        ("single_box_iou", "[0.1, 0.2, 0.5]", "must be one \\[x1, y1, x2, y2\\] box"),
        ("single_box_iou", "left side", "must be one"),
        ("single_box_iou", "[0.5, 0.2, 0.1, 0.6]", "needs x2 > x1"),
    ],
)
def test_bad_references_raise_data_error(answer_type, answer, message):
    with pytest.raises(DataError, match=message):
        score("anything [0, 0, 1, 1]", answer, answer_type)


@pytest.mark.parametrize(
    ("answer", "references"),
    [('["a", "b"]', ["a", "b"]), ("[1, 2.5]", ["1", "2.5"]), ("[sic]", ["[sic]"]), ("yes", ["yes"])],
)
def test_parse_references(answer, references):
    assert parse_references(answer) == references


# -------------------------------------------------------------------------------------------- registry


def test_benchmark_scorers_are_registered():
    for name, scorer in BENCHMARK_SCORERS.items():
        assert SCORERS[name] is scorer
    assert set(BENCHMARK_SCORERS) <= set(answer_types())


def test_register_scorer_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("vqa_soft", lambda prediction, answer: 0.0)


_SAMPLE_ANSWERS = {
    "mllmcl_rs": "yes",
    "mllmcl_ad": "parking lot",
    "mllmcl_med": "no",
    "mllmcl_fin": "B",
    "mllmcl_sci": "Ohio, Iowa",
    "mllmcl_sci_exact": "B",
    "mllmcl_sci_list": "Ohio, Iowa",
    "mllmcl_sci_contains": "42",
    "mllmcl_ocr": '["stop", "STOP"]',
    "mllmcl_ocr_hme": "x^{2}",
    "mllmcl_vp": "left",
    "mllmcl_math": "3",
    "mllmcl_gui": "B. Open settings",
    "caseless_exact": "yes",
    "substring_either": "tabby cat",
    "single_box_iou": "[0, 0, 10, 10]",
    "vqa_soft": annotators(2),
    "msvqa": "boat",
    "token_f1": "a red boat",
    "box_iou": "[[0, 0, 10, 10], [5, 5, 20, 20]]",
}
_SAMPLE_PREDICTIONS = [
    "",
    "yes",
    "B",
    "Ohio, Texas",
    "The answer is 3.",
    "[0, 0, 10, 8]",
    "Unanswerable",
    "down",
]


@pytest.mark.parametrize("answer_type", sorted(BENCHMARK_SCORERS))
def test_scores_are_deterministic_and_in_unit_interval(answer_type):
    answer = _SAMPLE_ANSWERS[answer_type]
    for prediction in _SAMPLE_PREDICTIONS:
        value = score(prediction, answer, answer_type)
        assert isinstance(value, float)
        assert 0.0 <= value <= 1.0
        assert score(prediction, answer, answer_type) == value
