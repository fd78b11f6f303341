"""Per-sample scorers of published benchmarks: MLLM-CL domains and abilities, OCRBench, VQAv2, CoIN, MSVQA.

Every scorer is pure, ``scorer(prediction, answer) -> float`` in ``[0, 1]``, and raises
:class:`~mcl.errors.DataError` naming the problem when the reference ``answer`` is unusable.

The ``mllmcl_*`` scorers reimplement (not copy) the per-domain scripts that MLLM-CL's evaluation calls,
``llava/eval/CoIN/eval_{ai2d,pvqa,finvis,sci,ocr,sat,math}.py`` as run by
``scripts/Eval_MR_LoRA/eval_use_router_{DCL,ACL}.sh`` (github.com/bjzhb666/MLLM-CL). Their quirks are kept
on purpose, so that scores stay comparable with the paper; each docstring says where a rule is loose and
where we deviate. Samples the scripts skip for containing ``Unanswerable`` still count in their
denominators, so here they score 0. The same scripts ship, as ``llava/eval/CoIN/eval_*.py``, with MCITlib
(github.com/Ghy0501/MCITlib) and EBLoRA (github.com/haodotgu/EBLoRA, commit 9887b55), whose copies we read.

``caseless_exact``, ``substring_either`` and ``single_box_iou`` reimplement CoIN's scripts
(github.com/zackschen/CoIN, ``ETrain/Eval/LLaVA/CoIN/eval_{vqav2,vizwiz,ocrvqa,ImagetNet,grounding}.py``;
the same files are ``llava/eval/CoIN/`` in HiDe-LLaVA, MCITlib and EBLoRA); ``caseless_exact`` is also the
accuracy that UCIT's ``eval_deepseek_r1.py`` prints (its LLM judge is commented out in every copy we read).

:data:`BENCHMARK_SCORERS` names them by answer type; :mod:`mcl.evaluation.scoring` registers that table in
:data:`~mcl.evaluation.scoring.SCORERS`.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from mcl.errors import DataError
from mcl.evaluation.generic_scorers import Scorer, extract_choice, normalize_answer

# --------------------------------------------------------------------------------------------------------
# Shared parsing
# --------------------------------------------------------------------------------------------------------

_UNANSWERABLE = "Unanswerable"  # matched case-sensitively, as the MLLM-CL scripts do


def parse_references(answer: str) -> list[str]:
    """The reference answers in ``answer``: a JSON array of strings/numbers, or else one plain answer.

    A string that starts with ``[`` but is not valid JSON (e.g. ``"[sic]"``) is one plain answer.

    Raises:
        DataError: If the JSON array is empty or holds something other than strings and numbers.
    """
    text = answer.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return [answer]
        if not isinstance(items, list) or not items:
            raise DataError(f"reference answer list is empty: {answer!r}")
        bad = [item for item in items if isinstance(item, bool) or not isinstance(item, (str, int, float))]
        if bad:
            raise DataError(
                f"reference answer list must hold strings or numbers, got {bad[0]!r} in {answer!r}"
            )
        return [item if isinstance(item, str) else str(item) for item in items]
    return [answer]


def _require(reference: str, original: str, what: str) -> str:
    """``reference`` (already normalised by a scorer's rule), or DataError when nothing is left of it."""
    if not reference:
        raise DataError(f"{what} reference answer is empty after normalisation: {original!r}")
    return reference


# --------------------------------------------------------------------------------------------------------
# MLLM-CL domain continual learning: RS, AD, Med, Fin, Sci
# --------------------------------------------------------------------------------------------------------


def score_mllmcl_rs(prediction: str, answer: str) -> float:
    """MLLM-CL remote sensing / autonomous driving rule (``llava/eval/CoIN/eval_ai2d.py``).

    A prediction containing ``Unanswerable`` scores 0. Otherwise, both lower-cased: a multi-word answer
    (one with a space) scores when it is a substring of the prediction; a one-word answer has its periods
    removed and, when the prediction has a space, scores if the prediction contains ``" "+answer``,
    ``answer+" "``, ``answer+"."`` or ``answer+","``; a one-word prediction only needs to contain it.
    The boundary check is one-sided, as published: ``"no"`` scores on ``"it is not"`` (``" no"``) and on
    ``"snow."`` (``"no."``), but not on ``"not sure"``. The strict whole-word rule is ``contains``.
    """
    if _UNANSWERABLE in prediction:
        return 0.0
    pred = prediction.lower()
    gold = _require(answer.lower(), answer, "mllmcl_rs/mllmcl_ad")
    if " " in gold:
        return float(gold in pred)
    gold = _require(gold.replace(".", ""), answer, "mllmcl_rs/mllmcl_ad")
    if " " in pred:
        return float(any(form in pred for form in (" " + gold, gold + " ", gold + ".", gold + ",")))
    return float(gold in pred)


def score_mllmcl_med(prediction: str, answer: str) -> float:
    """MLLM-CL medical rule (``llava/eval/CoIN/eval_pvqa.py``).

    A prediction containing ``Unanswerable`` scores 0; otherwise 1 when the lower-cased answer is a
    substring of the lower-cased prediction (no word boundaries: ``"no"`` scores on ``"not"``).
    """
    if _UNANSWERABLE in prediction:
        return 0.0
    return float(_require(answer.lower(), answer, "mllmcl_med") in prediction.lower())


def _strip_spaces_periods(text: str) -> str:
    return text.lower().replace(" ", "").replace(".", "")


def score_mllmcl_fin(prediction: str, answer: str) -> float:
    """MLLM-CL finance rule (``llava/eval/CoIN/eval_finvis.py``; its answers are option letters or true/false).

    A prediction containing ``Unanswerable`` scores 0; otherwise 1 when the prediction, lower-cased with
    all spaces and periods removed, equals the answer. Deviation: the script only lower-cases the
    reference, so a reference holding a space or period can never score there; we normalise both sides.
    Newlines are kept, as in the script (``"B\\n"`` does not match ``"B"``).
    """
    if _UNANSWERABLE in prediction:
        return 0.0
    gold = _require(_strip_spaces_periods(answer), answer, "mllmcl_fin")
    return float(_strip_spaces_periods(prediction) == gold)


def score_mllmcl_sci_exact(prediction: str, answer: str) -> float:
    """MLLM-CL science rule for AI2D, TQA, SciVerse and VQA images (``llava/eval/CoIN/eval_sci.py``).

    ``Unanswerable`` scores 0; otherwise 1 when the lower-cased prediction equals the lower-cased answer,
    without stripping (``"B."`` does not match ``"B"``).
    """
    if _UNANSWERABLE in prediction:
        return 0.0
    return float(prediction.lower() == _require(answer.lower(), answer, "mllmcl_sci_exact"))


def score_mllmcl_sci_list(prediction: str, answer: str) -> float:
    """MLLM-CL science rule for MapQA "Which states ..." questions (``llava/eval/CoIN/eval_sci.py``).

    ``Unanswerable`` scores 0; otherwise the fraction of the answer's comma-separated items that equal
    one of the prediction's comma-separated items (lower-cased). Deviation: items are stripped of
    surrounding spaces and empty items dropped (the script compares raw items, so ``"a,b"`` and
    ``"a, b"`` differ there).
    """
    if _UNANSWERABLE in prediction:
        return 0.0
    gold = [item.strip() for item in answer.lower().split(",") if item.strip()]
    if not gold:
        raise DataError(f"mllmcl_sci_list reference answer has no items: {answer!r}")
    pred = {item.strip() for item in prediction.lower().split(",")}
    return sum(item in pred for item in gold) / len(gold)


def score_mllmcl_sci_contains(prediction: str, answer: str) -> float:
    """MLLM-CL science rule for the other MapQA questions (``llava/eval/CoIN/eval_sci.py``).

    ``Unanswerable`` scores 0; otherwise 1 when the lower-cased answer is a substring of the prediction.
    """
    if _UNANSWERABLE in prediction:
        return 0.0
    return float(_require(answer.lower(), answer, "mllmcl_sci_contains") in prediction.lower())


# A bare option letter: "B", "(B)", "B.", "b)".
_LETTER_ONLY = re.compile(r"^\s*\(?\s*([A-Za-z])\s*\)?\s*[.:)]?\s*$")
# An option letter with its text: "B. Open settings", "(B) Open settings", "B) ...", "B: ...".
_LETTER_WITH_TEXT = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Za-z])[.:)])\s+(\S.*?)\s*$", re.DOTALL)
# A comma between digits ("1,000") does not separate list items.
_LIST_COMMA = re.compile(r"(?<!\d),|,(?!\d)")


def score_mllmcl_sci(prediction: str, answer: str) -> float:
    """MLLM-CL science scorer that picks the sub-rule from the answer's shape.

    The script picks it from the image name (AI2D/TQA/SciVerse/VQA prefix: exact) and the question
    (MapQA "Which states": list; other MapQA: containment), which a scorer does not see; readers that
    know them should set ``mllmcl_sci_exact`` / ``mllmcl_sci_list`` / ``mllmcl_sci_contains`` per row.
    Here: a bare option letter -> exact; a comma not between digits -> list; otherwise containment.
    """
    if _LETTER_ONLY.match(answer):
        return score_mllmcl_sci_exact(prediction, answer)
    if _LIST_COMMA.search(answer):
        return score_mllmcl_sci_list(prediction, answer)
    return score_mllmcl_sci_contains(prediction, answer)


# --------------------------------------------------------------------------------------------------------
# MLLM-CL ability continual learning: OCR, VP, Math, GUI
# --------------------------------------------------------------------------------------------------------


def _ocr_text(text: str) -> str:
    return text.lower().strip().replace("\n", "")


def _hme_text(text: str) -> str:
    return text.strip().replace(" ", "").replace("\n", "")


def _ocr_hit(prediction: str, answer: str, normalise: Callable[[str], str], what: str) -> float:
    pred = normalise(prediction)
    golds = [_require(normalise(ref), answer, what) for ref in parse_references(answer)]
    return float(any(gold in pred for gold in golds))


def score_mllmcl_ocr(prediction: str, answer: str) -> float:
    """OCRBench hit as MLLM-CL counts it (``llava/eval/CoIN/eval_ocr.py``), all categories but HME.

    1 when any reference (``answer`` may be a JSON list of strings), lower-cased, stripped and with
    newlines removed, is a substring of the prediction treated the same way. Official OCRBench
    (Yuliang-Liu/MultimodalOCR, ``OCRBench/scripts/*.py``) replaces newlines with spaces instead.
    """
    return _ocr_hit(prediction, answer, _ocr_text, "mllmcl_ocr")


def score_mllmcl_ocr_hme(prediction: str, answer: str) -> float:
    """OCRBench hit for Handwritten Mathematical Expression Recognition (``eval_ocr.py``, OCRBench).

    Like :func:`score_mllmcl_ocr` but case-sensitive and with all spaces and newlines removed, so LaTeX
    spacing does not matter. Readers map the category ``Handwritten Mathematical Expression
    Recognition`` (the test file's ``answer_type``) to this name.
    """
    return _ocr_hit(prediction, answer, _hme_text, "mllmcl_ocr_hme")


def _vp_text(text: str) -> str:
    return text.lower().strip().replace(" ", "").replace("\n", "").replace(".", "")


def score_mllmcl_vp(prediction: str, answer: str) -> float:
    """MLLM-CL visual perception rule (``llava/eval/CoIN/eval_sat.py``).

    1 when the answer is a substring of the prediction, both lower-cased with spaces, newlines and
    periods removed. No word boundaries (``"2"`` scores on ``"12"``) and no ``Unanswerable`` rule.
    """
    return float(_require(_vp_text(answer), answer, "mllmcl_vp") in _vp_text(prediction))


_STATED_ANSWER = re.compile(r"\banswer\b\s*(?:is\b\s*:?|:)\s*", re.IGNORECASE)
_FRAC = r"\\[dt]?frac\{\s*(-?\d+(?:\.\d+)?)\s*\}\{\s*(-?\d+(?:\.\d+)?)\s*\}"
_PLAIN_NUMBER = r"(?<![\w.])-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?"
_NUMBER = re.compile(rf"{_FRAC}|{_PLAIN_NUMBER}")
_NUMBER_ONLY = re.compile(rf"^(?:{_FRAC}|{_PLAIN_NUMBER})$")
_MATH_REL_TOL = 1e-4
_MATH_ABS_TOL = 1e-8


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_math_answer(prediction: str) -> tuple[str, bool]:
    """The final answer a math response states, and whether it was marked explicitly.

    The last ``\\boxed{...}``; else the rest of the line after the last ``answer is`` / ``Answer:``;
    else the whole response (not marked).
    """
    boxed = _last_boxed(prediction)
    if boxed is not None:
        return boxed.strip(), True
    stated = list(_STATED_ANSWER.finditer(prediction))
    if stated:
        return prediction[stated[-1].end() :].split("\n", 1)[0].strip(), True
    return prediction.strip(), False


def _number_value(match: re.Match[str]) -> float | None:
    if match.group(1) is not None:
        numerator, denominator = float(match.group(1)), float(match.group(2))
    else:
        parts = match.group(0).replace(",", "").replace(" ", "").split("/")
        numerator, denominator = float(parts[0]), float(parts[1]) if len(parts) == 2 else 1.0
    return numerator / denominator if denominator else None


def _clean_number_text(text: str) -> str:
    return text.strip().strip("$").replace("\\$", "").replace("\\%", "").replace("%", "").strip()


def parse_number(text: str) -> float | None:
    """The value of a text that is only a number: ``-3``, ``1,000``, ``2.5``, ``3/4``, ``\\frac{3}{4}``,
    ``50%`` (-> 50), ``$5``; None otherwise."""
    match = _NUMBER_ONLY.match(_clean_number_text(text))
    return _number_value(match) if match else None


def score_mllmcl_math(prediction: str, answer: str) -> float:
    """Rule-based stand-in for MLLM-CL's math judge (``llava/eval/CoIN/eval_math.py``).

    The published evaluation is MathVista's (VLMEvalKit): GPT-4o-mini extracts the answer, and a rule
    pre-check accepts exact option letters and ``int``/``float`` equality. No LLM here: the answer is
    taken by :func:`extract_math_answer`, then compared by the reference's shape: an option letter
    (``"B"``, ``"(B)"``) against the letter the answer names; a number against the first number of a
    marked answer (the last number of an unmarked response) within relative tolerance 1e-4 (``"3.0"``
    equals ``"3"``, ``"1/2"`` equals ``"0.5"``); anything else by :func:`normalize_answer` equality.
    """
    gold = _require(answer.strip(), answer, "mllmcl_math")
    candidate, marked = extract_math_answer(prediction)
    letter = _LETTER_ONLY.match(gold)
    if letter:
        return float(extract_choice(candidate) == letter.group(1).upper())
    gold_value = parse_number(gold)
    if gold_value is not None:
        numbers = [v for v in map(_number_value, _NUMBER.finditer(candidate)) if v is not None]
        if not numbers:
            return 0.0
        value = numbers[0] if marked else numbers[-1]
        return float(math.isclose(value, gold_value, rel_tol=_MATH_REL_TOL, abs_tol=_MATH_ABS_TOL))
    return float(normalize_answer(candidate.strip("$")) == normalize_answer(gold))


def score_mllmcl_gui(prediction: str, answer: str) -> float:
    """GUI-agent option match (MLLM-CL's APP task: MMT-Bench GUI multiple choice).

    MLLM-CL submits ``prediction.strip().upper()`` as the option to the MMT-Bench server
    (``convert_result_to_submission.py``); here ``answer`` is the option letter, optionally with its
    text (``"B"``, ``"B. Open settings"``, ``"(B) Open settings"``). A response that names one letter
    (:func:`~mcl.evaluation.scoring.extract_choice`) scores on that letter; one that names none scores
    when it equals the option text after :func:`normalize_answer`.

    Raises:
        DataError: If ``answer`` does not start with an option letter.
    """
    only = _LETTER_ONLY.match(answer)
    with_text = None if only else _LETTER_WITH_TEXT.match(answer)
    if not only and not with_text:
        raise DataError(
            f"mllmcl_gui answer must name an option letter, e.g. 'B' or 'B. Open', got {answer!r}"
        )
    if only:
        letter, text = only.group(1), ""
    else:
        letter, text = with_text.group(1) or with_text.group(2), with_text.group(3)
    named = extract_choice(prediction)
    if named is not None:
        return float(named == letter.upper())
    return float(bool(text) and normalize_answer(prediction) == normalize_answer(text))


# --------------------------------------------------------------------------------------------------------
# VQAv2 soft accuracy, MSVQA VQA score, token F1, box F1
# --------------------------------------------------------------------------------------------------------

# Apostrophe forms from the official VQA evaluation's contraction table; a token equal to one of them
# with exactly one apostrophe dropped (``dont``, ``couldnt've``, ``couldn'tve``) is restored.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
_CONTRACTIONS = {
    form[:i] + form[i + 1 :]: form for form in _CONTRACTED for i, ch in enumerate(form) if ch == "'"
}
_CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: the official table maps this one backwards
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')  # the official list, in its order
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)", whose first group is a (vacuous) lookahead: a period is
# dropped unless a digit follows it. (It also passes re.UNICODE as the count, capping removals at 32.)
_VQA_PERIOD = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """The official VQA evaluation's answer normalisation (GT-Vision-Lab/VQA ``vqaEval.py``).

    Newlines/tabs to spaces and strip; each punctuation mark in the official list is deleted when it
    touches a space or the text has a digit-comma-digit, else replaced by a space (apostrophes and
    colons are kept); periods not followed by a digit removed; lower-case; number words ``none``/``zero``
    to ``ten`` to digits; articles dropped; apostrophe-less contractions (``dont``) restored.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _VQA_PUNCT:
        if mark + " " in text or " " + mark in text or _VQA_DIGIT_COMMA.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES)


def score_vqa_soft(prediction: str, answer: str) -> float:
    """VQAv2 soft accuracy (GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``).

    ``answer`` is a JSON list of the annotators' answers (or one plain answer). With N >= 2 answers:
    the mean over the N leave-one-out subsets of ``min(1, #matches / 3)``, matching after
    :func:`normalize_vqa_answer`; with 10 answers, 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.0.
    With one answer the formula degenerates (always 0), so it is treated as a consensus answer: 1.0 on
    a normalised match. Deviation: references get the full normalisation, as in the EvalAI/lmms-eval
    port; the official script only strips their punctuation, and only when annotators disagree.
    """
    pred = normalize_vqa_answer(prediction)
    golds = [normalize_vqa_answer(ref) for ref in parse_references(answer)]
    if len(golds) == 1:
        return float(pred == golds[0])
    matches = sum(gold == pred for gold in golds)
    # Leaving out a matching answer leaves matches - 1 matches; leaving out another leaves all of them.
    total = sum(min(1.0, (matches - (gold == pred)) / 3) for gold in golds)
    return total / len(golds)


def score_msvqa(prediction: str, answer: str) -> float:
    """MSVQA "VQA score" (UNIFIER, arXiv 2511.18507) for open answers.

    The paper's exact definition and evaluation code could not be found; this is VQAv2 soft accuracy
    (:func:`score_vqa_soft`) on MSVQA's reference, which with a single reference is a match after the
    VQA normalisation.
    """
    return score_vqa_soft(prediction, answer)


_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SQUAD_PUNCT = frozenset(string.punctuation)


def _squad_tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCT)
    return _SQUAD_ARTICLES.sub(" ", text).split()


def _token_f1(pred: Sequence[str], gold: Sequence[str]) -> float:
    if not pred or not gold:
        return float(list(pred) == list(gold))
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def score_token_f1(prediction: str, answer: str) -> float:
    """Token-level F1 as in the SQuAD v2 evaluation script (used for MSVQA's F1 on open answers).

    Tokens: lower-cased, ASCII punctuation deleted, articles a/an/the removed, split on whitespace;
    F1 of the multiset overlap; if either side has no tokens, 1 only when both have none. ``answer``
    may be a JSON list of references: the best F1 counts.
    """
    pred = _squad_tokens(prediction)
    refs = parse_references(answer)
    if not any(ref.strip() for ref in refs):
        raise DataError(f"token_f1 reference answer is empty: {answer!r}")
    return max(_token_f1(pred, _squad_tokens(ref)) for ref in refs)


_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
BOX_IOU_THRESHOLD = 0.5

Box = tuple[float, float, float, float]


def parse_boxes(text: str) -> list[Box]:
    """Every ``[x1, y1, x2, y2]`` in ``text`` (nested lists such as ``[[..], [..]]`` included), in order."""
    return [(float(a), float(b), float(c), float(d)) for a, b, c, d in _BOX.findall(text)]


def box_iou(first: Box, second: Box) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; 0 when the union has no area."""
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    inter = max(0.0, width) * max(0.0, height)

    def area(box: Box) -> float:
        return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])

    union = area(first) + area(second) - inter
    return inter / union if union > 0 else 0.0


def _max_matching(edges: list[list[int]], n_right: int) -> int:
    """Size of a maximum bipartite matching (Kuhn's augmenting paths); ``edges[i]`` lists i's partners."""
    owner = [-1] * n_right

    def augment(left: int, seen: list[bool]) -> bool:
        for right in edges[left]:
            if not seen[right]:
                seen[right] = True
                if owner[right] < 0 or augment(owner[right], seen):
                    owner[right] = left
                    return True
        return False

    return sum(augment(left, [False] * n_right) for left in range(len(edges)))


def score_box_iou(prediction: str, answer: str) -> float:
    """F1 of predicted boxes matched one-to-one to reference boxes at IoU >= 0.5.

    Boxes are ``[x1, y1, x2, y2]`` anywhere in the text (one or several). A pair may match when its IoU
    is at least :data:`BOX_IOU_THRESHOLD`; the matching is a maximum one-to-one matching, so the score is
    ``2 * matched / (#predicted + #reference)``: one right box among two predicted for one reference
    scores 2/3. No predicted box scores 0. Predicted boxes with inverted corners have no area (IoU 0).
    This is our definition for MSVQA's grounding answers; the paper's exact rule could not be found.

    Raises:
        DataError: If ``answer`` has no box, or a box without positive width and height.
    """
    golds = parse_boxes(answer)
    if not golds:
        raise DataError(f"box_iou answer has no [x1, y1, x2, y2] box: {answer!r}")
    for box in golds:
        if box[2] <= box[0] or box[3] <= box[1]:
            raise DataError(f"box_iou answer box {list(box)} needs x2 > x1 and y2 > y1: {answer!r}")
    preds = parse_boxes(prediction)
    if not preds:
        return 0.0
    edges = [
        [j for j, pred in enumerate(preds) if box_iou(gold, pred) >= BOX_IOU_THRESHOLD] for gold in golds
    ]
    matched = _max_matching(edges, len(preds))
    return 2 * matched / (len(preds) + len(golds))


# --------------------------------------------------------------------------------------------------------
# CoIN (and UCIT) exact match, ImageNet containment, grounding accuracy
# --------------------------------------------------------------------------------------------------------


def score_caseless_exact(prediction: str, answer: str) -> float:
    """Case-insensitive exact match, as CoIN's ``eval_vqav2.py``, ``eval_vizwiz.py``, ``eval_ocrvqa.py`` and
    UCIT's ``eval_deepseek_r1.py`` count it (``pred.upper() == gt.upper()``).

    The prediction is stripped of surrounding whitespace (the published inference scripts store
    ``outputs.strip()``); nothing else is normalised, so ``"Yes."`` does not match ``"yes"``. ``answer``
    may be a JSON list of references (any one counts). CoIN's OCR-VQA script skips predictions containing
    ``Unanswerable``; they cannot equal a reference anyway.

    Raises:
        DataError: If a reference is empty.
    """
    pred = prediction.strip().upper()
    refs = [_require(ref, answer, "caseless_exact") for ref in parse_references(answer)]
    return float(any(pred == ref.upper() for ref in refs))


def score_substring_either(prediction: str, answer: str) -> float:
    """CoIN ImageNet rule (``eval_ImagetNet.py``): 1 when the answer is a substring of the prediction or the
    prediction a substring of the answer, case-sensitive and without any normalisation.

    The prediction is stripped of surrounding whitespace. Deviation: an empty prediction scores 0 (the
    script's ``pred in answer`` is true for an empty prediction).
    """
    pred = prediction.strip()
    gold = _require(answer, answer, "substring_either")
    return float(bool(pred) and (gold in pred or pred in gold))


COIN_IOU_THRESHOLD = 0.5


def _four_numbers(text: str) -> Box | None:
    parts = text.replace("[", "").replace("]", "").split(",")
    if len(parts) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(part) for part in parts)
    except ValueError:
        return None
    return x1, y1, x2, y2


def score_single_box_iou(prediction: str, answer: str) -> float:
    """CoIN grounding accuracy (``eval_grounding.py``): 1 when the prediction is exactly one box
    ``[x1, y1, x2, y2]`` whose IoU with the reference box is above 0.5, else 0.

    The prediction, stripped and with its brackets removed, must be four comma-separated numbers (text
    around the box or several boxes score 0, as in the script). Deviation: the script also drops the
    first and last character of the bracket-less prediction (``[1:-1]``), which cuts the last digit of
    the last coordinate; we read the numbers whole. Multi-box answers are ``box_iou``'s job.

    Raises:
        DataError: If ``answer`` is not one box with positive width and height.
    """
    gold = _four_numbers(answer)
    if gold is None:
        raise DataError(f"single_box_iou answer must be one [x1, y1, x2, y2] box, got {answer!r}")
    if gold[2] <= gold[0] or gold[3] <= gold[1]:
        raise DataError(f"single_box_iou answer box needs x2 > x1 and y2 > y1: {answer!r}")
    pred = _four_numbers(prediction.strip())
    return float(pred is not None and box_iou(gold, pred) > COIN_IOU_THRESHOLD)


BENCHMARK_SCORERS: dict[str, Scorer] = {
    "mllmcl_rs": score_mllmcl_rs,
    "mllmcl_ad": score_mllmcl_rs,  # the same script (eval_ai2d.py) scores both domains
    "mllmcl_med": score_mllmcl_med,
    "mllmcl_fin": score_mllmcl_fin,
    "mllmcl_sci": score_mllmcl_sci,
    "mllmcl_sci_exact": score_mllmcl_sci_exact,
    "mllmcl_sci_list": score_mllmcl_sci_list,
    "mllmcl_sci_contains": score_mllmcl_sci_contains,
    "mllmcl_ocr": score_mllmcl_ocr,
    "mllmcl_ocr_hme": score_mllmcl_ocr_hme,
    "mllmcl_vp": score_mllmcl_vp,
    "mllmcl_math": score_mllmcl_math,
    "mllmcl_gui": score_mllmcl_gui,
    "caseless_exact": score_caseless_exact,
    "substring_either": score_substring_either,
    "single_box_iou": score_single_box_iou,
    "vqa_soft": score_vqa_soft,
    "msvqa": score_msvqa,
    "token_f1": score_token_f1,
    "box_iou": score_box_iou,
}
