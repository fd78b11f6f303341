"""CoIN (Chen et al., arXiv 2403.08350): eight instruction-tuning tasks in the published order.

ScienceQA -> TextVQA -> ImageNet -> GQA -> VizWiz -> Grounding -> VQAv2 -> OCRVQA (the order of
``scripts/*/Train`` in github.com/zackschen/CoIN and of HiDe-LLaVA's ``Train_CoIN/Task1..8.sh``).
Instructions come from the HF dataset ``Zacks-Chen/CoIN``, images from the source datasets (COCO 2014,
GQA, OCR-VQA, TextVQA, ScienceQA, VizWiz, ImageNet). Layout under ``stream.root`` (CoIN's scripts read
``playground/Instructions/<Task>/test.json`` with ``--image-folder cl_dataset``)::

    Instructions/                 cl_dataset/          (image paths in the JSON are relative to it)
      ScienceQA/ train.json test.json      COCO2014/train2014/  GQA/images/  OCR-VQA/images/
      TextVQA/ ImageNet/ GQA/ VizWiz/      TextVQA/train_images/  TextVQA/TextVQA_0.5.1_val.json
      Grounding/ VQAv2/ OCRVQA/            ScienceQA/...  VizWiz/...  ImageNet/...

Options ``instructions_dir`` (``Instructions``) and ``images_dir`` (``cl_dataset``) move the two folders
(HiDe-LLaVA's layout: ``instructions_dir: "."``, ``images_dir: datasets``); ``layout`` moves single tasks.

Train rows are LLaVA conversations; test rows ``{question_id, image, text, answer}`` (Grounding:
``answer_bbox`` "[x1, y1, x2, y2]" normalised, plus ``size``). Scorers follow CoIN's evaluation scripts
(``ETrain/Eval/LLaVA/CoIN/eval_*.py``; the same files are ``llava/eval/CoIN/`` in HiDe-LLaVA and MCITlib):

* ScienceQA ``choice`` (``eval_science_qa.py`` reads the option letter);
* TextVQA ``vqa_soft``: ``eval_textvqa.py`` scores against the ten annotators' ``answers`` of TextVQA's own
  ``TextVQA_0.5.1_val.json`` (by ``question_id``), which CoIN's script reads from
  ``cl_dataset/TextVQA/``. Where that file is (option ``textvqa_annotations``, a path relative to the root;
  default ``<images_dir>/TextVQA/TextVQA_0.5.1_val.json`` when present) the annotators' answers become the
  reference (the row's own ``answer`` is kept in ``Sample.extra["answer"]``); without it, the row's
  ``answers``/``answer`` (one answer: a match after the VQA normalisation);
* ImageNet ``substring_either`` (containment either way, ``eval_ImagetNet.py``);
* GQA ``exact`` (CoIN runs GQA's own evaluation on lower-cased predictions without a final period);
* VizWiz, VQAv2, OCRVQA ``caseless_exact`` (``pred.upper() == answer.upper()`` against the row's ``answer``);
* Grounding ``single_box_iou`` (one predicted box, IoU above 0.5, ``eval_grounding.py``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from mcl.errors import ConfigError, DataError
from mcl.streams.instruction_benchmarks import InstructionBenchmark, InstructionTask
from mcl.streams.registry import Stream, TaskData, register_stream
from mcl.streams.samples import Sample
from mcl.streams.sources import StreamOptions, folder_option

TEXTVQA_ANNOTATIONS = "TextVQA/TextVQA_0.5.1_val.json"  # under images_dir, where CoIN's script reads it

# Each task's folder is its name; in the published order.
TASKS = (
    InstructionTask("ScienceQA", "choice"),
    InstructionTask("TextVQA", "vqa_soft", answer_fields=("answers", "answer")),
    InstructionTask("ImageNet", "substring_either"),
    InstructionTask("GQA", "exact"),
    InstructionTask("VizWiz", "caseless_exact"),
    InstructionTask("Grounding", "single_box_iou", answer_fields=("answer", "answer_bbox")),
    InstructionTask("VQAv2", "caseless_exact"),
    InstructionTask("OCRVQA", "caseless_exact"),
)


def read_textvqa_answers(path: Path) -> dict[str, list[str]]:
    """``question_id`` (as text) -> the annotators' answers, from TextVQA's ``{"data": [...]}`` file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"stream 'coin': cannot read the TextVQA annotations {path}: {exc}") from exc
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise DataError(f"stream 'coin': {path} is not a TextVQA annotation file (no 'data' list)")
    answers = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or "question_id" not in row:
            raise DataError(f"stream 'coin': {path}: data[{index}] has no 'question_id'")
        given = row.get("answers")
        if not isinstance(given, list) or not given or not all(isinstance(a, str) for a in given):
            raise DataError(
                f"stream 'coin': {path}: data[{index}] (question_id {row['question_id']!r}) needs a "
                "non-empty list of 'answers'"
            )
        answers[str(row["question_id"])] = given
    return answers


def _annotations_path(root: Path, opts: StreamOptions) -> Path | None:
    value = opts.extra["textvqa_annotations"]
    if value is None:
        default = root / folder_option(opts, "images_dir") / TEXTVQA_ANNOTATIONS
        return default if default.is_file() else None
    if not isinstance(value, str) or not value.strip() or Path(value).is_absolute():
        raise ConfigError(
            "stream 'coin': option 'textvqa_annotations' must be a file path relative to stream.root, "
            f"got {value!r}"
        )
    if not (root / value).is_file():
        raise DataError(
            f"stream 'coin': TextVQA annotations {root / value} not found (option 'textvqa_annotations')"
        )
    return root / value


def _with_annotators(sample: Sample, answers: dict[str, list[str]], path: Path) -> Sample:
    given = answers.get(sample.id)
    if given is None:
        raise DataError(
            f"stream 'coin': TextVQA test question_id {sample.id!r} is not in {path} "
            "(option 'textvqa_annotations')"
        )
    return replace(
        sample,
        answer=json.dumps(given, ensure_ascii=False, separators=(",", ":")),
        answer_type="vqa_soft",
        extra={**sample.extra, "answer": sample.answer},
    )


def attach_textvqa_annotators(tasks: list[TaskData], root: Path, opts: StreamOptions) -> list[TaskData]:
    """TextVQA's test samples with the annotators' answers as reference, where the annotation file is.

    Only for the published layout: exports already hold the references they were written with.
    """
    if opts.source != "published" or not any(task.name == "TextVQA" for task in tasks):
        return tasks
    path = _annotations_path(root, opts)
    if path is None:
        return tasks
    answers = read_textvqa_answers(path)
    return [
        TaskData(task.name, task.train, [_with_annotators(s, answers, path) for s in task.test])
        if task.name == "TextVQA"
        else task
        for task in tasks
    ]


COIN = InstructionBenchmark(
    "coin",
    TASKS,
    instructions_dir="Instructions",
    images_dir="cl_dataset",
    extra_options={"textvqa_annotations": None},
    finish=attach_textvqa_annotators,
)
coin_spec = COIN.spec


@register_stream("coin")
def coin_stream(root: Path, options: dict[str, Any]) -> Stream:
    """CoIN's eight tasks; options in :mod:`mcl.streams.sources` plus ``instructions_dir``, ``images_dir``
    and ``textvqa_annotations``."""
    return COIN.build(root, options)
