"""A procedurally generated multi-scenario VQA stream (``generated``), in the spirit of MSVQA.

Four scenarios (tasks), in order: ``aerial``, ``underwater``, ``street``, ``indoor``. Each image is a 64x64
RGB picture with a scenario-specific background and one coloured shape in front of it. The answer is the
object's name, which depends on the scenario *and* the colour (a red object is a "roof" from above but a
"coral" under water), so a tiny model learns one task quickly, sequential fine-tuning forgets the earlier
mapping, and the task can be told from the image and the question.

The stream is written to disk in the published formats (LLaVA conversations for training, MLLM-CL test
rows for testing) and read back through :mod:`mcl.streams.formats`, exactly like real data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mcl.errors import DataError, UnknownNameError
from mcl.streams.formats import read_llava_conversations, read_mllmcl_test
from mcl.streams.registry import Stream, TaskData, problem_handler, register_stream

GENERATOR_VERSION = 1
IMAGE_SIZE = 64
SCENARIOS: tuple[str, ...] = ("aerial", "underwater", "street", "indoor")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (240, 220, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
OBJECT_NAMES: dict[str, dict[str, str]] = {
    "aerial": {"red": "roof", "yellow": "field", "white": "tent", "black": "road"},
    "underwater": {"red": "coral", "yellow": "fish", "white": "shell", "black": "rock"},
    "street": {"red": "car", "yellow": "taxi", "white": "sign", "black": "tire"},
    "indoor": {"red": "sofa", "yellow": "lamp", "white": "sink", "black": "tv"},
}
# Lower-case words separated by single spaces; "?" is its own token (the tiny test tokenizer splits on spaces).
QUESTIONS: dict[str, tuple[str, str]] = {
    "aerial": ("what is seen from above ?", "what does the aerial photo show ?"),
    "underwater": ("what is under the water ?", "what lies on the sea floor ?"),
    "street": ("what is on the street ?", "what is in the road scene ?"),
    "indoor": ("what is in the room ?", "what furniture is shown ?"),
}
GENERATED_VOCABULARY: list[str] = sorted(
    {word for templates in QUESTIONS.values() for question in templates for word in question.split()}
    | {name for names in OBJECT_NAMES.values() for name in names.values()}
)

OPTION_KEYS = ("seed", "train_per_task", "test_per_task", "tasks")
_SPLITS = ("train", "test")
_SHAPES = ("circle", "square", "triangle")
_NOISE = 8  # Per-pixel noise amplitude (uniform integer in [-_NOISE, _NOISE] per channel).
_COLOUR_JITTER = 15

Rgb = tuple[int, int, int]


def generate_stream(
    root: str | Path,
    seed: int = 0,
    train_per_task: int = 160,
    test_per_task: int = 40,
    tasks: Sequence[str] = SCENARIOS,
) -> Path:
    """Write the generated stream under ``root`` (or reuse it if it is already there with the same parameters).

    Layout: ``root/stream.json`` (metadata) and per task ``root/<task>/images/<id>.png``,
    ``root/<task>/train.json`` (LLaVA conversations) and ``root/<task>/test.json`` (MLLM-CL test rows).
    The stream is generated into a temporary directory next to ``root`` and renamed into place, so a crash
    leaves no half-written stream. The same parameters give byte-identical files.

    Args:
        root: Directory to create (must not exist, be empty, or hold a stream with the same parameters).
        seed: Non-negative random seed.
        train_per_task: Number of training samples per task.
        test_per_task: Number of test samples per task.
        tasks: Scenarios to generate, a subset of :data:`SCENARIOS` in any order.

    Returns:
        ``root`` as a Path.

    Raises:
        UnknownNameError: A task is not a known scenario.
        DataError: A parameter is invalid, or ``root`` holds something else (another stream or other files).
    """
    root = Path(root)
    meta = _metadata(seed, train_per_task, test_per_task, tasks)
    if _existing_stream_ok(root, meta):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for task in meta["tasks"]:
            _write_task(tmp / task, task, seed, train_per_task, test_per_task)
        _write_json(tmp / "stream.json", meta)
        _move_into_place(tmp, root, meta)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


@register_stream("generated")
def generated_stream(root: Path, options: dict[str, Any]) -> Stream:
    """Stream factory: generate (or reuse) the stream under ``root`` and read it back with the standard readers.

    Args:
        root: Data root of the stream.
        options: Any of ``seed``, ``train_per_task``, ``test_per_task`` (see :func:`generate_stream`) and
            ``tasks``, the scenarios to read, in order (all scenarios are generated under ``root``).

    Returns:
        ``Stream("generated", ...)`` with one task per requested scenario, in the requested order.

    Raises:
        DataError: An option key is unknown or a value is invalid.
        UnknownNameError: A task is not a known scenario.
    """
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise DataError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for stream 'generated'; "
            f"valid options: {', '.join(OPTION_KEYS)}"
        )
    # `tasks` picks and orders what is read; the folder always holds every scenario, so one data root
    # serves runs over any subset of the stream.
    task_names = _metadata(**options)["tasks"]
    generation = {k: v for k, v in options.items() if k != "tasks"}
    root = generate_stream(root, **generation)
    tasks = [
        TaskData(
            name=task,
            train=read_llava_conversations(
                root / task / "train.json", root / task, task, on_problem=problem_handler(task, "train")
            ),
            test=read_mllmcl_test(
                root / task / "test.json",
                root / task,
                task,
                answer_type="exact",
                on_problem=problem_handler(task, "test"),
            ),
        )
        for task in task_names
    ]
    return Stream("generated", tasks)


def _metadata(
    seed: int = 0, train_per_task: int = 160, test_per_task: int = 40, tasks: Sequence[str] = SCENARIOS
) -> dict[str, Any]:
    """Validated generation parameters as the JSON-able dict stored in ``stream.json``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"stream 'generated': option 'seed' must be a non-negative integer, got {seed!r}")
    for name, count in (("train_per_task", train_per_task), ("test_per_task", test_per_task)):
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise DataError(f"stream 'generated': option {name!r} must be a positive integer, got {count!r}")
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise DataError(
            f"stream 'generated': option 'tasks' must be a non-empty list of scenarios, got {tasks!r}"
        )
    for task in tasks:
        if task not in SCENARIOS:
            raise UnknownNameError(
                f"stream 'generated': unknown task {task!r}; valid tasks: {', '.join(SCENARIOS)}"
            )
    if len(set(tasks)) != len(tasks):
        raise DataError(f"stream 'generated': option 'tasks' repeats a task: {list(tasks)!r}")
    return {
        "generator": "mcl.streams.generated",
        "version": GENERATOR_VERSION,
        "image_size": IMAGE_SIZE,
        "seed": seed,
        "train_per_task": train_per_task,
        "test_per_task": test_per_task,
        "tasks": list(tasks),
    }


def _existing_stream_ok(root: Path, meta: dict[str, Any]) -> bool:
    """True if ``root`` already holds this stream; False if it is absent or empty; raise otherwise."""
    meta_path = root / "stream.json"
    if meta_path.is_file():
        try:
            existing = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{meta_path}: unreadable stream metadata ({exc}); delete {root} or pick another root"
            ) from exc
        if existing == meta:
            return True
        raise DataError(
            f"{root} holds a generated stream with other parameters ({_describe(existing)}) than requested "
            f"({_describe(meta)}); pick another root or delete {root}"
        )
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not a generated stream; pick another root or delete it")
    return False


def _describe(meta: Any) -> str:
    if not isinstance(meta, dict):
        return repr(meta)
    return ", ".join(
        f"{key}={meta.get(key)!r}" for key in ("version", "seed", "train_per_task", "test_per_task", "tasks")
    )


def _move_into_place(tmp: Path, root: Path, meta: dict[str, Any]) -> None:
    """Rename the finished ``tmp`` to ``root``; accept losing a race to a process that wrote the same stream."""
    try:
        os.replace(tmp, root)  # Atomic; also replaces an empty directory.
    except OSError:
        if not _existing_stream_ok(root, meta):
            raise


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_task(task_dir: Path, task: str, seed: int, train_per_task: int, test_per_task: int) -> None:
    """Write one task's images, ``train.json`` and ``test.json`` into ``task_dir``."""
    (task_dir / "images").mkdir(parents=True)
    for split, count in zip(_SPLITS, (train_per_task, test_per_task), strict=True):
        rows = []
        for sample_id, image, question, answer in _task_samples(task, split, seed, count):
            image_rel = f"images/{sample_id}.png"
            image.save(task_dir / image_rel, format="PNG")
            rows.append(_row(split, sample_id, image_rel, question, answer))
        _write_json(task_dir / f"{split}.json", rows)


def _row(split: str, sample_id: str, image: str, question: str, answer: str) -> dict[str, Any]:
    """A train row in LLaVA conversation format or a test row in MLLM-CL test format."""
    if split == "train":
        return {
            "id": sample_id,
            "image": image,
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
        }
    return {"question_id": sample_id, "image": image, "text": question, "answer": answer}


def _task_samples(task: str, split: str, seed: int, count: int) -> list[tuple[str, Image.Image, str, str]]:
    """(id, image, question, answer) for ``count`` samples of one task and split, deterministic in ``seed``."""
    scenario = SCENARIOS.index(task)
    split_index = _SPLITS.index(split)
    # Entropy tuples end in 0 (colour order) or i + 1 (image i) so no two streams collide.
    colour_names = list(COLOURS)
    colours = [colour_names[i % len(colour_names)] for i in range(count)]
    np.random.default_rng([seed, scenario, split_index, 0]).shuffle(colours)
    samples = []
    for i, colour in enumerate(colours):
        rng = np.random.default_rng([seed, scenario, split_index, i + 1])
        image = _render(task, colour, rng)
        question = QUESTIONS[task][int(rng.integers(len(QUESTIONS[task])))]
        samples.append((f"{task}-{split}-{i:05d}", image, question, OBJECT_NAMES[task][colour]))
    return samples


def _render(task: str, colour: str, rng: np.random.Generator) -> Image.Image:
    """One image: the scenario background, one jittered coloured shape, then mild per-pixel noise."""
    image = _BACKGROUNDS[task](rng)
    _draw_object(ImageDraw.Draw(image), COLOURS[colour], rng)
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + rng.integers(-_NOISE, _NOISE + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def _jitter(rgb: Rgb, rng: np.random.Generator, amount: int) -> Rgb:
    """``rgb`` with a uniform integer offset in [-amount, amount] per channel, clipped to 0..255."""
    red, green, blue = np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, size=3), 0, 255).tolist()
    return red, green, blue


def _draw_object(draw: ImageDraw.ImageDraw, rgb: Rgb, rng: np.random.Generator) -> None:
    """A filled circle, square or triangle, 40-55% of the side, fully inside the image."""
    size = int(round(rng.uniform(0.40, 0.55) * IMAGE_SIZE))
    x0 = int(rng.integers(0, IMAGE_SIZE - size + 1))
    y0 = int(rng.integers(0, IMAGE_SIZE - size + 1))
    x1, y1 = x0 + size - 1, y0 + size - 1
    fill = _jitter(rgb, rng, _COLOUR_JITTER)
    shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def _cuts(rng: np.random.Generator, count: int, margin: int = 10) -> list[int]:
    """Sorted boundaries 0 < c1 < ... < size splitting the side into ``count + 1`` bands at least a few px wide."""
    inner = rng.choice(np.arange(margin, IMAGE_SIZE - margin), size=count, replace=False)
    return [0, *sorted(int(c) for c in inner), IMAGE_SIZE]


def _aerial(rng: np.random.Generator) -> Image.Image:
    """Patchwork of green/brown/olive fields separated by thin lighter lines."""
    palette: tuple[Rgb, ...] = ((70, 130, 50), (125, 90, 50), (110, 120, 45))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    draw = ImageDraw.Draw(image)
    xs = _cuts(rng, int(rng.integers(1, 4)))
    for left, right in pairwise(xs):
        ys = _cuts(rng, int(rng.integers(1, 4)))
        for top, bottom in pairwise(ys):
            field = _jitter(palette[int(rng.integers(len(palette)))], rng, 12)
            draw.rectangle([left, top, right - 1, bottom - 1], fill=field)
            if top > 0:
                draw.line([(left, top), (right - 1, top)], fill=(185, 180, 140))
        if left > 0:
            draw.line([(left, 0), (left, IMAGE_SIZE - 1)], fill=(185, 180, 140))
    return image


def _underwater(rng: np.random.Generator) -> Image.Image:
    """Vertical blue to dark-blue gradient with light wavy caustic lines and small bubbles."""
    top, bottom = np.array([40, 125, 205]), np.array([10, 30, 90])
    weights = np.linspace(0.0, 1.0, IMAGE_SIZE)[:, None]
    column = np.round(top * (1 - weights) + bottom * weights).astype(np.uint8)
    image = Image.fromarray(np.repeat(column[:, None, :], IMAGE_SIZE, axis=1), mode="RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 4))):
        base = rng.uniform(3, IMAGE_SIZE * 0.6)
        amplitude, frequency, phase = rng.uniform(1, 3), rng.uniform(0.15, 0.4), rng.uniform(0, 2 * math.pi)
        points = [
            (x, base + amplitude * math.sin(frequency * x + phase)) for x in range(0, IMAGE_SIZE + 1, 2)
        ]
        draw.line(points, fill=(140, 205, 240), width=1)
    for _ in range(int(rng.integers(3, 6))):
        x, y, r = (
            int(rng.integers(2, IMAGE_SIZE - 2)),
            int(rng.integers(2, IMAGE_SIZE - 2)),
            int(rng.integers(1, 3)),
        )
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(205, 230, 255))
    return image


def _street(rng: np.random.Generator) -> Image.Image:
    """Gray road with white dashed lane marks under a light-blue sky strip."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _jitter((105, 105, 108), rng, 8))
    draw = ImageDraw.Draw(image)
    sky = int(rng.integers(10, 15))
    draw.rectangle([0, 0, IMAGE_SIZE - 1, sky - 1], fill=_jitter((160, 205, 240), rng, 8))
    for lane in (int(rng.integers(sky + 12, sky + 22)), int(rng.integers(IMAGE_SIZE - 14, IMAGE_SIZE - 6))):
        offset = int(rng.integers(0, 14))
        for x in range(offset - 14, IMAGE_SIZE, 14):
            draw.rectangle([x, lane, x + 7, lane + 1], fill=(240, 240, 240))
    return image


def _indoor(rng: np.random.Generator) -> Image.Image:
    """Beige wall above a brown wooden floor, with a horizontal skirting line between them."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _jitter((225, 210, 170), rng, 8))
    draw = ImageDraw.Draw(image)
    floor = int(rng.integers(36, 45))
    draw.rectangle([0, floor, IMAGE_SIZE - 1, IMAGE_SIZE - 1], fill=_jitter((125, 80, 45), rng, 8))
    for y in range(floor + 5, IMAGE_SIZE, 6):  # Plank joints.
        draw.line([(0, y), (IMAGE_SIZE - 1, y)], fill=(100, 62, 32))
    draw.rectangle([0, floor - 2, IMAGE_SIZE - 1, floor - 1], fill=(245, 240, 230))
    return image


_BACKGROUNDS: dict[str, Callable[[np.random.Generator], Image.Image]] = {
    "aerial": _aerial,
    "underwater": _underwater,
    "street": _street,
    "indoor": _indoor,
}
