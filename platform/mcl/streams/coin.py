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

from mcl.streams.instruction_benchmarks import InstructionBenchmark, InstructionTask
from mcl.streams.registry import Stream, register_stream

VQA_ANSWER_FIELDS = ("answers", "answer")


def vqa_answer_type(row: dict[str, Any], question: str) -> str:
    """``vqa_soft`` for a row carrying a list of annotator answers, else ``exact``."""
    for name in VQA_ANSWER_FIELDS:
        if name in row:
            return "vqa_soft" if isinstance(row[name], list) else "exact"
    return "exact"


def _vqa(name: str) -> InstructionTask:
    return InstructionTask(name, "exact", answer_rule=vqa_answer_type, answer_fields=VQA_ANSWER_FIELDS)


# Each task's folder is its name; in the published order.
TASKS = (
    InstructionTask("ScienceQA", "choice"),
    _vqa("TextVQA"),
    InstructionTask("ImageNet", "contains"),
    InstructionTask("GQA", "exact"),
    _vqa("VizWiz"),
    InstructionTask("Grounding", "box_iou", answer_fields=("answer", "answer_bbox")),
    _vqa("VQAv2"),
    InstructionTask("OCRVQA", "exact"),
)
COIN = InstructionBenchmark("coin", TASKS, instructions_dir="Instructions", images_dir="cl_dataset")
coin_spec = COIN.spec


@register_stream("coin")
def coin_stream(root: Path, options: dict[str, Any]) -> Stream:
    """CoIN's eight tasks; options in :mod:`mcl.streams.sources` plus ``instructions_dir``, ``images_dir``."""
    return COIN.build(root, options)
