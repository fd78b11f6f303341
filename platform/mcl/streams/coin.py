"""CoIN (Chen et al., arXiv 2403.08350): eight instruction-tuning tasks in the published order.

ScienceQA -> TextVQA -> ImageNet -> GQA -> VizWiz -> Grounding -> VQAv2 -> OCRVQA (the order of
``scripts/*/Train`` in github.com/zackschen/CoIN and of HiDe-LLaVA's ``Train_CoIN/Task1..8.sh``).
Instructions come from the HF dataset ``Zacks-Chen/CoIN``, images from the source datasets (COCO 2014,
GQA, OCR-VQA, TextVQA, ScienceQA, VizWiz, ImageNet). Layout under ``stream.root`` (CoIN's scripts read
``playground/Instructions/<Task>/test.json`` with ``--image-folder cl_dataset``)::

    Instructions/                 cl_dataset/          (image paths in the JSON are relative to it)
      ScienceQA/ train.json test.json      COCO2014/train2014/  GQA/images/  OCR-VQA/images/
      TextVQA/ ImageNet/ GQA/ VizWiz/      TextVQA/train_images/  ScienceQA/...  VizWiz/...  ImageNet/...
      Grounding/ VQAv2/ OCRVQA/

Options ``instructions_dir`` (``Instructions``) and ``images_dir`` (``cl_dataset``) move the two folders
(HiDe-LLaVA's layout: ``instructions_dir: "."``, ``images_dir: datasets``); ``layout`` moves single tasks.

Train rows are LLaVA conversations; test rows ``{question_id, image, text, answer}`` (Grounding:
``answer_bbox`` "[x1, y1, x2, y2]" normalised, plus ``size``). Scorers: ScienceQA ``choice``; ImageNet
``contains`` (CoIN counts containment either way); GQA, OCRVQA ``exact``; Grounding ``box_iou``; TextVQA,
VizWiz, VQAv2 ``vqa_soft`` where the row holds the annotators' answers as a list (``answers`` or ``answer``),
else ``exact`` (CoIN's own metric: case-insensitive exact match).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mcl.streams.registry import Stream, register_stream
from mcl.streams.sources import (
    BenchmarkSpec,
    TaskLayout,
    TaskSpec,
    folder_option,
    limit_tasks,
    load_tasks,
    parse_options,
)

EXTRA_OPTIONS = {"instructions_dir": "Instructions", "images_dir": "cl_dataset"}
VQA_ANSWER_FIELDS = ("answers", "answer")


def vqa_answer_type(row: dict[str, Any], question: str) -> str:
    """``vqa_soft`` for a row carrying a list of annotator answers, else ``exact``."""
    for name in VQA_ANSWER_FIELDS:
        if name in row:
            return "vqa_soft" if isinstance(row[name], list) else "exact"
    return "exact"


# (task = its folder name, scorer, per-row rule, answer fields), in the published order.
TASKS: tuple[tuple[str, str, Any, tuple[str, ...]], ...] = (
    ("ScienceQA", "choice", None, ("answer",)),
    ("TextVQA", "exact", vqa_answer_type, VQA_ANSWER_FIELDS),
    ("ImageNet", "contains", None, ("answer",)),
    ("GQA", "exact", None, ("answer",)),
    ("VizWiz", "exact", vqa_answer_type, VQA_ANSWER_FIELDS),
    ("Grounding", "box_iou", None, ("answer", "answer_bbox")),
    ("VQAv2", "exact", vqa_answer_type, VQA_ANSWER_FIELDS),
    ("OCRVQA", "exact", None, ("answer",)),
)


def coin_spec(instructions_dir: str = "Instructions", images_dir: str = "cl_dataset") -> BenchmarkSpec:
    """The CoIN benchmark with its instruction and image folders at the given places under the root."""
    base = Path(instructions_dir)
    return BenchmarkSpec(
        "coin",
        tuple(
            TaskSpec(
                name,
                TaskLayout(
                    ((base / name / "train.json").as_posix(),),
                    ((base / name / "test.json").as_posix(),),
                    images_dir,
                    images_dir,
                ),
                scorer,
                rule,
                fields,
            )
            for name, scorer, rule, fields in TASKS
        ),
    )


@register_stream("coin")
def coin_stream(root: Path, options: dict[str, Any]) -> Stream:
    """CoIN's eight tasks; options in :mod:`mcl.streams.sources` plus ``instructions_dir``, ``images_dir``."""
    opts = parse_options("coin", options, EXTRA_OPTIONS)
    spec = coin_spec(folder_option(opts, "instructions_dir"), folder_option(opts, "images_dir"))
    return Stream("coin", limit_tasks(load_tasks(spec, root, opts), opts))
