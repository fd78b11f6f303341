"""Tiny data folders in the published layouts of the benchmark streams, for tests and data-preparation checks.

:func:`write_fixture` writes a few small images (PIL) and the annotation files of one stream exactly where
and how the published benchmark puts them (the layouts are spelled out here, independently of the readers,
so a reader that drifts from the published layout fails its tests). It can inject the problems a data check
must catch into the first task's test split (:data:`PROBLEMS`): a missing image, an undecodable image, a
duplicate id, an image path escaping the data root.

Deterministic: the same arguments write byte-identical files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mcl.errors import ConfigError

PROBLEMS = ("missing_image", "undecodable_image", "duplicate_id", "escaping_path")
DEFAULT_COUNTS = {  # (train, test) samples per task
    "mllm-cl-domain": (3, 2),
    "mllm-cl-ability": (3, 2),
    "coin": (3, 2),
    "ucit": (3, 2),
    "msvqa": (10, 5),
}
CAMERA_VIEWS = (  # nuScenes camera order, front row then back row: the (unverified) AD train rows' views.
    "CAM_FRONT_LEFT",
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_LEFT",
    "CAM_BACK",
    "CAM_BACK_RIGHT",
)
IMAGE_SIZE = (16, 12)


@dataclass(frozen=True)
class InjectedProblem:
    """A problem written into a fixture: its kind, where it is, and the image path written in the row."""

    kind: str
    task: str
    split: str
    sample_id: str
    annotation: Path
    image: str


@dataclass(frozen=True)
class Fixture:
    """What :func:`write_fixture` wrote (counts exclude the rows of injected problems)."""

    stream: str
    root: Path
    tasks: tuple[str, ...]
    train_per_task: int
    test_per_task: int
    problems: tuple[InjectedProblem, ...] = ()


@dataclass
class _TaskFiles:
    task: str
    train_file: Path
    train_images: Path
    test_file: Path
    test_images: Path
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    test_rows: list[dict[str, Any]] = field(default_factory=list)


class _Images:
    """Writes small images with distinct colours (a counter), PNG or JPEG by file suffix."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, path: Path) -> None:
        self.count += 1
        k = self.count
        colour = ((37 * k) % 256, (91 * k + 50) % 256, (173 * k + 100) % 256)
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", IMAGE_SIZE, colour)
        image.putpixel((0, 0), (255 - colour[0], 255 - colour[1], 255 - colour[2]))
        jpeg = path.suffix.lower() in (".jpg", ".jpeg")
        image.save(path, format="JPEG" if jpeg else "PNG", quality=95)


def _conv(sample_id: str, image: Any, question: str, answer: str, id_key: str = "id") -> dict[str, Any]:
    return {
        id_key: sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


def _test(sample_id: str | int, image: Any, text: str, answer: Any, **extra: Any) -> dict[str, Any]:
    return {"question_id": sample_id, "image": image, "text": text, "answer": answer, **extra}


def write_fixture(
    stream: str,
    root: str | Path,
    *,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    problems: Sequence[str] = (),
) -> Fixture:
    """Write a tiny copy of ``stream``'s published layout under ``root`` (created; must not hold files).

    Args:
        stream: ``mllm-cl-domain``, ``mllm-cl-ability``, ``coin``, ``ucit`` or ``msvqa``.
        root: The data root to write (what ``stream.root`` points at).
        train_per_task: Train samples per task (default :data:`DEFAULT_COUNTS`).
        test_per_task: Test samples per task.
        problems: Kinds from :data:`PROBLEMS` to inject into the first task's test split.

    Returns:
        What was written, with the injected problems (sample ids, files, image paths).
    """
    if stream not in _WRITERS:
        raise ConfigError(f"no fixture for stream {stream!r}; fixtures exist for: {', '.join(_WRITERS)}")
    unknown = [p for p in problems if p not in PROBLEMS]
    if unknown:
        raise ConfigError(f"unknown fixture problem(s) {unknown}; valid: {', '.join(PROBLEMS)}")
    n_train, n_test = DEFAULT_COUNTS[stream]
    n_train = n_train if train_per_task is None else train_per_task
    n_test = n_test if test_per_task is None else test_per_task
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"fixture root {root} is not empty")
    root.mkdir(parents=True, exist_ok=True)
    images = _Images()
    tasks = _WRITERS[stream](root, images, n_train, n_test)
    injected = tuple(_inject(stream, root, tasks[0], kind, images) for kind in problems)
    for files in tasks:
        for path, rows in ((files.train_file, files.train_rows), (files.test_file, files.test_rows)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return Fixture(stream, root, tuple(t.task for t in tasks), n_train, n_test, injected)


def _inject(stream: str, root: Path, files: _TaskFiles, kind: str, images: _Images) -> InjectedProblem:
    rows = files.test_rows
    base = dict(rows[0])
    if kind == "duplicate_id":
        row = {**base, "text": base["text"] + " (again)"}
    elif kind == "missing_image":
        row = {**base, "question_id": "missing-image", "image": "missing/missing.png"}
    elif kind == "undecodable_image":
        bad = files.test_images / "undecodable.png"
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(b"this is not an image\n" * 4)
        row = {
            **base,
            "question_id": "undecodable-image",
            "image": bad.relative_to(files.test_images).as_posix(),
        }
    else:  # escaping_path: a real image outside the data root, reached with "..".
        outside = root.parent / f"outside-{stream}.png"
        images.write(outside)
        relative = Path(os.path.relpath(outside, files.test_images)).as_posix()
        row = {**base, "question_id": "escaping-path", "image": relative}
    rows.append(row)
    return InjectedProblem(kind, files.task, "test", str(row["question_id"]), files.test_file, row["image"])


# --- the published layouts -------------------------------------------------------------------------------

_RS_QUESTION = (
    "What is the main land-use type in this image?\nA. farmland\nB. forest\nC. river\nD. residential\n"
    "Answer with the option's letter from the given choices directly."
)


def _mllm_cl_domain(root: Path, images: _Images, n_train: int, n_test: int) -> list[_TaskFiles]:
    """``<root>/{RS,Med,AD,Sci,Fin}/{images/, train.json, test.json}``.

    Test rows hold one image path each, AD included: MLLM-CL's AD evaluation (``model_ai2d.py``) opens
    ``os.path.join(image_folder, image)``. AD train rows hold six camera views: whether the published train
    rows do could not be verified (MLLM-CL's ETrain loader accepts image lists); it keeps the tiling path
    exercised.
    """
    tasks = []
    for task in ("RS", "Med", "AD", "Sci", "Fin"):
        folder = root / task
        files = _TaskFiles(task, folder / "train.json", folder, folder / "test.json", folder)
        for split, count, rows in (("train", n_train, files.train_rows), ("test", n_test, files.test_rows)):
            for i in range(count):
                sample_id = f"{task.lower()}_{split}_{i}"
                image, question, answer = _domain_sample(task, split, i, folder, images)
                if split == "train":
                    # Med uses `question_id` as the id of training rows (as MLLM-CL's replay files do).
                    rows.append(
                        _conv(sample_id, image, question, answer, "question_id" if task == "Med" else "id")
                    )
                else:
                    rows.append(_test(sample_id, image, question, answer))
        tasks.append(files)
    return tasks


def _domain_sample(task: str, split: str, i: int, folder: Path, images: _Images) -> tuple[Any, str, str]:
    if task == "AD" and split == "train":
        views = [f"images/{split}_scene_{i}/{view}.png" for view in CAMERA_VIEWS]
        for view in views:
            images.write(folder / view)
        return views, "What should the ego vehicle do next?", ["Keep going straight.", "Turn left."][i % 2]
    if task == "Sci":
        kind = ("AI2D", "MapQA", "MapQA")[i % 3]
        image = f"images/{kind}_{split}_{i}.png"
        images.write(folder / image)
        if kind == "AI2D":
            return image, "Which stage comes first?\nA. egg\nB. larva\nC. adult", "A"
        if i % 3 == 1:
            return image, "Which states have the highest value in the USA?", "Ohio, Texas"
        return image, "What is the value of Ohio?", "high"
    image = f"images/{task.lower()}_{split}_{i}.png"
    images.write(folder / image)
    content = {
        "RS": (_RS_QUESTION, "ABCD"[i % 4]),
        "Med": ("Is there evidence of a fracture?", ["yes", "no"][i % 2]),
        "AD": ("What is in front of the ego vehicle?", "A parked car."),
        "Fin": ("What was the closing price on the last day?", f"{12.5 + i}"),
    }
    question, answer = content[task]
    return image, question, answer


def _mllm_cl_ability(root: Path, images: _Images, n_train: int, n_test: int) -> list[_TaskFiles]:
    """``<root>/{OCR,Math,VP,APP}/`` (train) and ``<root>/{OCR,Math,VP,APP}_test/`` (test)."""
    tasks = []
    for task, folder_name in (("OCR", "OCR"), ("Math", "Math"), ("VP", "VP"), ("GUI", "APP")):
        train_dir, test_dir = root / folder_name, root / f"{folder_name}_test"
        files = _TaskFiles(task, train_dir / "train.json", train_dir, test_dir / "test.json", test_dir)
        for i in range(n_train):
            image = f"images/{folder_name.lower()}_train_{i}.png"
            images.write(train_dir / image)
            question, answer = _ability_train(task, i)
            files.train_rows.append(_conv(f"{folder_name.lower()}_train_{i}", image, question, answer))
        for i in range(n_test):
            image = f"images/{folder_name.lower()}_test_{i}.png"
            images.write(test_dir / image)
            files.test_rows.append(_ability_test(task, i, image))
        tasks.append(files)
    return tasks


def _ability_train(task: str, i: int) -> tuple[str, str]:
    return {
        "OCR": ("What is written in the image?", "OPEN"),
        "Math": ("Hint: answer at the end.\nQuestion: What is 1 + 2?", "The answer is 3"),
        "VP": ("How many cars are in the image?", str(2 + i)),
        "GUI": ("Which button opens the settings?\nA. Back\nB. Settings", "B"),
    }[task]


def _ability_test(task: str, i: int, image: str) -> dict[str, Any]:
    if task == "OCR":
        if i % 2:
            category = "Handwritten Mathematical Expression Recognition"
            return _test(
                f"ocr_test_{i}", image, "Write the expression in LaTeX.", "x^{2}+1", answer_type=category
            )
        category = "Regular Text Recognition"
        return _test(
            f"ocr_test_{i}",
            image,
            "what is written in the image?",
            ["STOP", "stop sign"],
            answer_type=category,
        )
    if task == "Math":
        return _test(f"testmini_{i}", image, "What is the area of the square?", "4")
    if task == "VP":
        return _test(f"vp_test_{i}", image, "How many chairs are there?", str(3 + i), type="2D", task="Count")
    return _test(f"app_test_{i}", image, "Which button closes the app?\nA. Close\nB. Back", "A")


_COIN_TASKS: dict[str, tuple[Callable[[str, int], str], str, Any]] = {
    # task: (image path under cl_dataset/, question, answer)
    "ScienceQA": (
        lambda s, i: f"ScienceQA/{s}/{100 + i}/image.png",
        "Which animal is a mammal?\nA. whale\nB. shark\n"
        "Answer with the option's letter from the given choices directly.",
        "A",
    ),
    "TextVQA": (
        lambda s, i: f"TextVQA/train_images/{s}{i:04x}.jpg",
        "What brand is the bottle?",
        "coca cola",
    ),
    "ImageNet": (lambda s, i: f"ImageNet/{s}/n01440764/n01440764_{i}.JPEG", "What is the object?", "tench"),
    "GQA": (lambda s, i: f"GQA/images/n{s}{i}.jpg", "Is the cup to the left of the plate?", "yes"),
    "VizWiz": (lambda s, i: f"VizWiz/{s}/VizWiz_{s}_{i:08d}.jpg", "What is this?", "unanswerable"),
    "Grounding": (
        lambda s, i: f"COCO2014/train2014/COCO_train2014_{s}{i:06d}.jpg",
        "Please provide the bounding box coordinate of the region this sentence describes: the red cup.",
        "[0.12, 0.2, 0.5, 0.64]",
    ),
    "VQAv2": (lambda s, i: f"COCO2014/train2014/COCO_train2014_vqa{s}{i:06d}.jpg", "Is it raining?", "no"),
    "OCRVQA": (lambda s, i: f"OCR-VQA/images/{s}{i}.jpg", "What is the genre of this book?", "Romance"),
}


TEXTVQA_FIRST_ID = 34602  # TextVQA's val question ids are integers; CoIN's test rows reuse them.


def _textvqa_annotations(path: Path, rows: list[dict[str, Any]]) -> None:
    """TextVQA's own ``TextVQA_0.5.1_val.json`` (``{"data": [...]}``, ten annotators' answers per question)
    for the given test rows, which CoIN's ``eval_textvqa.py`` scores against."""
    data = [
        {
            "question": row["text"],
            "image_id": Path(row["image"]).stem,
            "question_id": row["question_id"],
            "answers": [row["answer"]] * 7 + ["coke"] * 3,
            "set_name": "val",
        }
        for row in rows
    ]
    content = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")


def _coin(root: Path, images: _Images, n_train: int, n_test: int) -> list[_TaskFiles]:
    """``<root>/Instructions/<Task>/{train,test}.json``; images under ``<root>/cl_dataset/``, with TextVQA's
    ``cl_dataset/TextVQA/TextVQA_0.5.1_val.json`` where CoIN's TextVQA evaluation reads it."""
    image_root = root / "cl_dataset"
    tasks = []
    for task, (image_path, question, answer) in _COIN_TASKS.items():
        folder = root / "Instructions" / task
        files = _TaskFiles(task, folder / "train.json", image_root, folder / "test.json", image_root)
        for i in range(n_train):
            image = image_path("train", i)
            images.write(image_root / image)
            files.train_rows.append(_conv(f"{task}_train_{i}", image, question, answer))
        for i in range(n_test):
            image = image_path("test", i)
            images.write(image_root / image)
            sample_id = f"{task}_test_{i}"
            if task == "Grounding":
                files.test_rows.append(
                    {
                        "question_id": sample_id,
                        "image": image,
                        "text": question,
                        "answer_bbox": answer,
                        "size": [16, 12],
                    }
                )
            elif task == "TextVQA":
                files.test_rows.append(_test(TEXTVQA_FIRST_ID + i, image, question, answer))
            else:
                files.test_rows.append(_test(sample_id, image, question, answer))
        if task == "TextVQA":
            _textvqa_annotations(image_root / "TextVQA" / "TextVQA_0.5.1_val.json", files.test_rows)
        tasks.append(files)
    return tasks


_UCIT_TASKS = (
    # (task, instructions folder, train file, image path under datasets/, question, answer)
    (
        "ImageNet-R",
        "ImageNet-R",
        "train.json",
        "ImageNet-R/{s}/n01443537/art_{i}.jpg",
        "What is the object?",
        "goldfish",
    ),
    (
        "ArxivQA",
        "ArxivQA",
        "train_4w.json",
        "ArxivQA/images/{s}_{i}.jpg",
        "Which curve grows fastest?\nA. a\nB. b",
        "B",
    ),
    (
        "VizWiz-caption",
        "VizWiz",
        "train.json",
        "VizWiz/{s}/VizWiz_{s}_{i:08d}.jpg",
        "Describe the image briefly.",
        "A can of soup on a table.",
    ),
    (
        "IconQA",
        "IconQA",
        "train.json",
        "IconQA/iconqa_data/iconqa/{s}/choose_txt/{i}/image.png",
        "How many dots are there?",
        "3",
    ),
    (
        "CLEVR-Math",
        "CLEVR",
        "train_4w.json",
        "CLEVR/images/{s}/CLEVR_{s}_{i:06d}.png",
        "Subtract all cubes. How many objects are left?",
        "2",
    ),
    (
        "Flickr30k",
        "Flickr30k",
        "train_brief_4w.json",
        "Flickr30k/{s}/{i}.jpg",
        "Describe the image briefly.",
        "Two dogs run on the grass.",
    ),
)


def _coco_captions(path: Path, rows: list[dict[str, Any]]) -> None:
    """A COCO-format ``val_coco_type_3000.json`` for caption test rows (image ids 1.. in row order), as the
    HiDe-LLaVA README lists for VizWiz and Flickr30k (its caption metrics read it; mcl does not)."""
    ids = range(1, len(rows) + 1)
    content = {
        "images": [{"id": k, "file_name": row["image"]} for k, row in zip(ids, rows, strict=True)],
        "annotations": [
            {"image_id": k, "id": k, "caption": row["answer"]} for k, row in zip(ids, rows, strict=True)
        ],
    }
    path.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")


def _ucit(root: Path, images: _Images, n_train: int, n_test: int) -> list[_TaskFiles]:
    """``<root>/instructions/<Folder>/{<train file>, test_3000.json}`` (plus ``val_coco_type_3000.json`` for
    the caption tasks); images under ``<root>/datasets/``."""
    image_root = root / "datasets"
    tasks = []
    for task, folder_name, train_file, image_path, question, answer in _UCIT_TASKS:
        folder = root / "instructions" / folder_name
        files = _TaskFiles(task, folder / train_file, image_root, folder / "test_3000.json", image_root)
        for split, count in (("train", n_train), ("test", n_test)):
            for i in range(count):
                image = image_path.format(
                    s="val" if task.startswith("VizWiz") and split == "test" else split, i=i
                )
                images.write(image_root / image)
                sample_id = f"{folder_name}_{split}_{i}"
                if split == "train":
                    files.train_rows.append(_conv(sample_id, image, question, answer))
                else:
                    files.test_rows.append(_test(sample_id, image, question, answer))
        if folder_name in ("VizWiz", "Flickr30k"):
            folder.mkdir(parents=True, exist_ok=True)
            _coco_captions(folder / "val_coco_type_3000.json", files.test_rows)
        tasks.append(files)
    return tasks


_MSVQA_SCENARIOS = ("high_altitude", "underwater", "low_altitude", "indoor")


def _msvqa(root: Path, images: _Images, n_train: int, n_test: int) -> list[_TaskFiles]:
    """``<root>/<scenario>/{images/, train.json, test.json}``, four scenarios (our documented layout)."""
    tasks = []
    for scenario in _MSVQA_SCENARIOS:
        folder = root / scenario
        files = _TaskFiles(scenario, folder / "train.json", folder, folder / "test.json", folder)
        for split, count in (("train", n_train), ("test", n_test)):
            for i in range(count):
                image = f"images/{split}_{i:03d}.jpg"
                images.write(folder / image)
                sample_id = f"{scenario}_{split}_{i}"
                grounding = i % 3 == 2
                question = "Locate the largest object." if grounding else "What is the main object?"
                answer = f"[{i}, {i + 1}, {i + 8}, {i + 9}]" if grounding else f"object {i % 4}"
                if split == "train":
                    files.train_rows.append(_conv(sample_id, image, question, answer))
                else:
                    kind = "grounding" if grounding else "vqa"
                    files.test_rows.append(_test(sample_id, image, question, answer, answer_type=kind))
        tasks.append(files)
    return tasks


_WRITERS: dict[str, Callable[[Path, _Images, int, int], list[_TaskFiles]]] = {
    "mllm-cl-domain": _mllm_cl_domain,
    "mllm-cl-ability": _mllm_cl_ability,
    "coin": _coin,
    "ucit": _ucit,
    "msvqa": _msvqa,
}
