"""MLLM-CL (Zhao et al., arXiv 2506.05453): domain and ability continual learning, as published.

``mllm-cl-domain``: RS -> Med -> AD -> Sci -> Fin. ``mllm-cl-ability``: OCR -> Math -> VP -> GUI. Layout under
``stream.root`` (the repository README's "Dataset" section, ``configs/adaptex_*_llava.json`` and
``scripts/Eval_MR_LoRA/eval_use_router_{DCL,ACL}.sh`` of github.com/bjzhb666/MLLM-CL, which read
``Domain_data/<task>/test.json`` and ``Ability_data/<task>_test/test.json`` with the task folder as image
folder; data from the HF dataset ``MLLM-CL/MLLM-CL`` or ModelScope)::

    Domain_data/                      Ability_data/
      RS/  images/ train.json test.json     OCR/  images/ train.json    OCR_test/  images/ test.json
      Med/ ...   AD/ ...   Sci/ ...         Math/ ...                   Math_test/ ...
      Fin/ images/ train.json test.json     VP/   ...                   VP_test/   ...
                 (README: "test.sjon")      APP/  ...  (the GUI task)   APP_test/  ...

Train files are LLaVA conversations (``id`` or ``question_id``); test files are ``{question_id, image,
text, answer}`` plus ``answer_type`` (an OCRBench category in OCR, not a scorer), ``type`` (``2D``/``3D``)
and ``task`` (e.g. ``Count``) in some tracks: all kept in ``Sample.extra``. Image paths are relative to the
folder of their annotation file. OCR answers may be lists (any one counts): stored as a JSON list string.

Image lists: the published test rows hold one image path each, AD (DriveLM) included (MLLM-CL's
``model_ai2d.py``, which evaluates AD, opens ``os.path.join(image_folder, row["image"])``). MLLM-CL's
ETrain LLaVA loader also accepts a list of paths (added for SAT multi-image rows, ``--is_SAT``); whether the
published AD train rows carry the six camera views could not be verified. A row whose ``image`` is a list
is tiled into one grid image (six views: 2 x 3, in list order, row by row), written once to
``<cache_dir>/tiles/`` (default ``<root>/.mcl_cache``); see :class:`mcl.streams.sources.ImageCache`.

Scorers: ``mllmcl_rs``, ``mllmcl_med``, ``mllmcl_ad``, ``mllmcl_fin``, ``mllmcl_math``, ``mllmcl_vp``,
``mllmcl_gui``; OCR ``mllmcl_ocr``, or ``mllmcl_ocr_hme`` for rows of the OCRBench category "Handwritten
Mathematical Expression Recognition"; Sci per row, as the published ``eval_sci.py`` decides: images named
``AI2D_*``, ``TQA_*``, ``VQA_*`` or ``SciVerse_*`` -> ``mllmcl_sci_exact``; otherwise (MapQA) questions
containing "Which states" -> ``mllmcl_sci_list``, the rest -> ``mllmcl_sci_contains``. Exports without an
``answer_type`` column fall back to ``mllmcl_sci`` (which decides by the answer's shape).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from mcl.streams.registry import Stream, register_stream
from mcl.streams.sources import BenchmarkSpec, TaskLayout, TaskSpec, build_benchmark

SCI_EXACT_SOURCES = ("AI2D", "TQA", "VQA", "SciVerse")
OCR_HME_CATEGORY = "Handwritten Mathematical Expression Recognition"


def sci_answer_type(row: dict[str, Any], question: str) -> str:
    """The MLLM-CL Sci scorer of a row: by the image's source prefix, then MapQA's list questions."""
    image = row.get("image")
    first = image[0] if isinstance(image, list) and image else image
    source = PurePosixPath(str(first)).name.split("_")[0]
    if source in SCI_EXACT_SOURCES:
        return "mllmcl_sci_exact"
    if "Which states" in question:
        return "mllmcl_sci_list"
    return "mllmcl_sci_contains"


def ocr_answer_type(row: dict[str, Any], question: str) -> str:
    """``mllmcl_ocr_hme`` for OCRBench's handwritten-math rows (by ``answer_type``), else ``mllmcl_ocr``."""
    return "mllmcl_ocr_hme" if row.get("answer_type") == OCR_HME_CATEGORY else "mllmcl_ocr"


def _domain(name: str, scorer: str, rule: Any = None) -> TaskSpec:
    tests = (f"{name}/test.json", f"{name}/test.jsonl", f"{name}/test.sjon")
    return TaskSpec(name, TaskLayout((f"{name}/train.json",), tests), scorer, rule)


def _ability(name: str, folder: str, scorer: str, rule: Any = None) -> TaskSpec:
    train = (f"{folder}/train.json",)
    test = (f"{folder}_test/test.json", f"{folder}_test/test.jsonl")
    return TaskSpec(name, TaskLayout(train, test), scorer, rule)


DOMAIN = BenchmarkSpec(
    "mllm-cl-domain",
    (
        _domain("RS", "mllmcl_rs"),
        _domain("Med", "mllmcl_med"),
        _domain("AD", "mllmcl_ad"),
        _domain("Sci", "mllmcl_sci", sci_answer_type),
        _domain("Fin", "mllmcl_fin"),
    ),
)
ABILITY = BenchmarkSpec(
    "mllm-cl-ability",
    (
        _ability("OCR", "OCR", "mllmcl_ocr", ocr_answer_type),
        _ability("Math", "Math", "mllmcl_math"),
        _ability("VP", "VP", "mllmcl_vp"),
        _ability("GUI", "APP", "mllmcl_gui"),
    ),
)


@register_stream("mllm-cl-domain")
def mllm_cl_domain(root: Path, options: dict[str, Any]) -> Stream:
    """MLLM-CL domain continual learning (RS, Med, AD, Sci, Fin); options in :mod:`mcl.streams.sources`."""
    return build_benchmark(DOMAIN, root, options)


@register_stream("mllm-cl-ability")
def mllm_cl_ability(root: Path, options: dict[str, Any]) -> Stream:
    """MLLM-CL ability continual learning (OCR, Math, VP, GUI); options in :mod:`mcl.streams.sources`."""
    return build_benchmark(ABILITY, root, options)
