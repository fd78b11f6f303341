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

Scorers (ours; the published evaluation uses an LLM judge for QA and CIDEr/BLEU for captions):
ImageNet-R ``contains``; ArxivQA ``choice``; IconQA and CLEVR-Math ``exact``; the two caption tasks
``token_f1`` against the test row's reference caption.
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

EXTRA_OPTIONS = {"instructions_dir": "instructions", "images_dir": "datasets"}
TEST_FILE = "test_3000.json"

# (task, instruction folders (README name first), train file, scorer), in the published order.
TASKS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("ImageNet-R", ("ImageNet-R",), "train.json", "contains"),
    ("ArxivQA", ("ArxivQA",), "train_4w.json", "choice"),
    ("VizWiz-caption", ("VizWiz", "VizWiz-caption"), "train.json", "token_f1"),
    ("IconQA", ("IconQA",), "train.json", "exact"),
    ("CLEVR-Math", ("CLEVR", "CLEVR-Math"), "train_4w.json", "exact"),
    ("Flickr30k", ("Flickr30k", "Flickr30k-cap"), "train_brief_4w.json", "token_f1"),
)


def ucit_spec(instructions_dir: str = "instructions", images_dir: str = "datasets") -> BenchmarkSpec:
    """The UCIT benchmark with its instruction and image folders at the given places under the root."""
    base = Path(instructions_dir)
    return BenchmarkSpec(
        "ucit",
        tuple(
            TaskSpec(
                name,
                TaskLayout(
                    tuple((base / folder / train).as_posix() for folder in folders),
                    tuple((base / folder / TEST_FILE).as_posix() for folder in folders),
                    images_dir,
                    images_dir,
                ),
                scorer,
            )
            for name, folders, train, scorer in TASKS
        ),
    )


@register_stream("ucit")
def ucit_stream(root: Path, options: dict[str, Any]) -> Stream:
    """UCIT's six tasks; options in :mod:`mcl.streams.sources` plus ``instructions_dir``, ``images_dir``."""
    opts = parse_options("ucit", options, EXTRA_OPTIONS)
    spec = ucit_spec(folder_option(opts, "instructions_dir"), folder_option(opts, "images_dir"))
    return Stream("ucit", limit_tasks(load_tasks(spec, root, opts), opts))
