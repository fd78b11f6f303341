"""UCIT (HiDe-LLaVA, Guo et al., ACL 2025, arXiv 2503.12941): six tasks in the published order.

ImageNet-R -> ArxivQA -> VizWiz-caption -> IconQA -> CLEVR-Math -> Flickr30k (``scripts/HiDe/Train_UCIT/
Task1..6.sh`` of github.com/Ghy0501/HiDe-LLaVA). Instructions come from the HF dataset ``HaiyangGuo/UCIT``,
images from the source datasets. Layout under ``stream.root`` (the HiDe-LLaVA README; image paths in the
JSON are relative to ``datasets/``)::

    instructions/                                    datasets/
      ImageNet-R/ train.json        test_3000.json     ImageNet-R/{train,test}/   ArxivQA/images/
      ArxivQA/    train_4w.json     test_3000.json     VizWiz/{train,val,test}/   IconQA/iconqa_data/iconqa/
      VizWiz/     train.json        test_3000.json     CLEVR/images/{train,val,test}/
      IconQA/     train.json        test_3000.json     Flickr30k/{train,val}/
      CLEVR/      train_4w.json     test_3000.json
      Flickr30k/  train_brief_4w.json  test_3000.json

The training scripts name three folders differently (``VizWiz-caption``, ``CLEVR-Math``, ``Flickr30k-cap``);
those names are accepted too. Options ``instructions_dir`` (``instructions``) and ``images_dir``
(``datasets``) move the two folders; ``layout`` moves single tasks.

Scorers, after the published evaluation scripts (``scripts/HiDe/Eval_UCIT/eval_*.sh`` of HiDe-LLaVA and
MCITlib; ``llava/eval/eval_deepseek_r1.py`` and ``eval_caption.py``): the four QA tasks (ImageNet-R, ArxivQA,
IconQA, CLEVR-Math) ``caseless_exact``, the accuracy ``eval_deepseek_r1.py`` computes
(``pred.upper() == answer.upper()``; its DeepSeek judge is commented out in every copy we could read). The
two caption tasks ``token_f1`` against the test row's caption: ours, since the scripts report corpus-level
BLEU/METEOR/ROUGE-L/CIDEr (pycocoevalcap) against ``val_coco_type_3000.json``, matched to the predictions
by position, which a per-sample scorer cannot reproduce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mcl.streams.instruction_benchmarks import InstructionBenchmark, InstructionTask
from mcl.streams.registry import Stream, register_stream

TEST_FILE = "test_3000.json"


def _task(name: str, folders: tuple[str, ...], train_file: str, answer_type: str) -> InstructionTask:
    return InstructionTask(name, answer_type, folders, train_file, TEST_FILE)


# (task, instruction folders (README name first), train file, scorer), in the published order.
TASKS = (
    _task("ImageNet-R", ("ImageNet-R",), "train.json", "caseless_exact"),
    _task("ArxivQA", ("ArxivQA",), "train_4w.json", "caseless_exact"),
    _task("VizWiz-caption", ("VizWiz", "VizWiz-caption"), "train.json", "token_f1"),
    _task("IconQA", ("IconQA",), "train.json", "caseless_exact"),
    _task("CLEVR-Math", ("CLEVR", "CLEVR-Math"), "train_4w.json", "caseless_exact"),
    _task("Flickr30k", ("Flickr30k", "Flickr30k-cap"), "train_brief_4w.json", "token_f1"),
)
UCIT = InstructionBenchmark("ucit", TASKS, instructions_dir="instructions", images_dir="datasets")
ucit_spec = UCIT.spec


@register_stream("ucit")
def ucit_stream(root: Path, options: dict[str, Any]) -> Stream:
    """UCIT's six tasks; options in :mod:`mcl.streams.sources` plus ``instructions_dir``, ``images_dir``."""
    return UCIT.build(root, options)
