"""The procedurally generated multi-scenario stream."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mcl.streams.generated as generated
from mcl.errors import DataError, UnknownNameError
from mcl.streams import build_stream
from mcl.streams.formats import check_images, read_llava_conversations, read_mllmcl_test
from mcl.streams.generated import (
    GENERATED_VOCABULARY,
    OBJECT_NAMES,
    SCENARIOS,
    generate_stream,
    generated_stream,
)

SMALL = {"train_per_task": 8, "test_per_task": 4}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stream_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("generated") / "stream"
    return generate_stream(root, seed=3, train_per_task=40, test_per_task=40)


def test_layout_and_counts(stream_root: Path) -> None:
    meta = json.loads((stream_root / "stream.json").read_text())
    assert meta["seed"] == 3 and meta["tasks"] == list(SCENARIOS)
    assert meta["train_per_task"] == 40 and meta["test_per_task"] == 40
    for task in SCENARIOS:
        assert len(list((stream_root / task / "images").glob("*.png"))) == 80
        train = json.loads((stream_root / task / "train.json").read_text())
        test = json.loads((stream_root / task / "test.json").read_text())
        assert len(train) == 40 and len(test) == 40
        assert train[0]["conversations"][0]["value"].startswith("<image>\n")
        assert set(test[0]) == {"question_id", "image", "text", "answer"}
    assert not [p for p in stream_root.parent.iterdir() if p.name != "stream"]  # No temp dirs left behind.


def test_readable_by_the_readers(stream_root: Path) -> None:
    for task in SCENARIOS:
        train = read_llava_conversations(stream_root / task / "train.json", stream_root / task, task)
        test = read_mllmcl_test(stream_root / task / "test.json", stream_root / task, task)
        ids = [s.id for s in train + test]
        assert len(set(ids)) == len(ids) == 80
        assert train[12].id == f"{task}-train-00012"
        check_images(train + test)
        with Image.open(train[0].image) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
        for sample in train + test:
            assert sample.answer in OBJECT_NAMES[task].values()
            assert sample.question.endswith(" ?") and sample.question == sample.question.lower()
            assert all(word in GENERATED_VOCABULARY for word in [*sample.question.split(), sample.answer])
            assert "  " not in sample.question


def test_factory_builds_stream(stream_root: Path) -> None:
    stream = build_stream("generated", stream_root, {"seed": 3, "train_per_task": 40, "test_per_task": 40})
    assert stream.name == "generated" and stream.task_names == list(SCENARIOS)
    assert all(s.answer_type == "exact" and s.task == "street" for s in stream.tasks[2].test)
    subset = generated_stream(stream_root.parent / "subset", {"tasks": ["indoor", "aerial"], **SMALL})
    assert subset.task_names == ["indoor", "aerial"]
    assert len(subset.tasks[0].train) == 8 and len(subset.tasks[0].test) == 4


def test_balanced_answers(stream_root: Path) -> None:
    for task in SCENARIOS:
        for split in ("train", "test"):
            rows = json.loads((stream_root / task / f"{split}.json").read_text())
            answers = [r["answer"] if split == "test" else r["conversations"][1]["value"] for r in rows]
            assert Counter(answers) == {name: 10 for name in OBJECT_NAMES[task].values()}


def test_answers_differ_across_scenarios() -> None:
    for colour in ("red", "yellow", "white", "black"):
        names = [OBJECT_NAMES[task][colour] for task in SCENARIOS]
        assert len(set(names)) == len(SCENARIOS)
    all_names = [name for task in SCENARIOS for name in OBJECT_NAMES[task].values()]
    assert len(set(all_names)) == len(all_names)


def test_vocabulary_is_sorted_unique_and_complete() -> None:
    assert GENERATED_VOCABULARY == sorted(set(GENERATED_VOCABULARY))
    assert "?" in GENERATED_VOCABULARY and "coral" in GENERATED_VOCABULARY and "what" in GENERATED_VOCABULARY


def _border_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return border.mean(axis=0)


def test_scenario_identifiable_from_image_border(stream_root: Path) -> None:
    centroids = {}
    for task in SCENARIOS:
        train = read_llava_conversations(stream_root / task / "train.json", stream_root / task, task)
        centroids[task] = np.mean([_border_rgb(s.image) for s in train], axis=0)
    correct = total = 0
    for task in SCENARIOS:
        for sample in read_mllmcl_test(stream_root / task / "test.json", stream_root / task, task):
            rgb = _border_rgb(sample.image)
            guess = min(centroids, key=lambda t: float(np.sum((centroids[t] - rgb) ** 2)))
            correct += guess == task
            total += 1
    assert correct / total >= 0.95


def test_same_seed_identical_bytes(tmp_path: Path) -> None:
    first = _files(generate_stream(tmp_path / "a", seed=11, **SMALL))
    second = _files(generate_stream(tmp_path / "b", seed=11, **SMALL))
    assert first == second
    assert len(first) == 1 + 4 * (2 + 12)


def test_different_seed_different_images(tmp_path: Path) -> None:
    first = _files(generate_stream(tmp_path / "a", seed=1, **SMALL))
    second = _files(generate_stream(tmp_path / "b", seed=2, **SMALL))
    assert first.keys() == second.keys()
    images = [name for name in first if name.endswith(".png")]
    assert sum(first[name] != second[name] for name in images) == len(images)


def test_task_subset_keeps_per_task_images(tmp_path: Path) -> None:
    full = _files(generate_stream(tmp_path / "full", seed=5, **SMALL))
    part = _files(generate_stream(tmp_path / "part", seed=5, tasks=("street",), **SMALL))
    assert all(part[name] == full[name] for name in part if name.startswith("street/"))


def test_cache_reuses_existing_stream(tmp_path: Path) -> None:
    root = generate_stream(tmp_path / "s", seed=4, **SMALL)
    image = root / "aerial" / "images" / "aerial-train-00000.png"
    stamp = image.stat().st_mtime_ns
    assert generate_stream(root, seed=4, **SMALL) == root
    assert image.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_parameter_mismatch_raises(tmp_path: Path) -> None:
    root = generate_stream(tmp_path / "s", seed=4, **SMALL)
    with pytest.raises(DataError, match="other parameters") as info:
        generate_stream(root, seed=5, **SMALL)
    assert str(root) in str(info.value) and "delete" in str(info.value)
    with pytest.raises(DataError, match="other parameters"):
        generated_stream(root, {"seed": 4, "train_per_task": 9, "test_per_task": 4})


def test_root_with_other_files_raises(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a generated stream"):
        generate_stream(root, **SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_stream(empty, **SMALL) / "stream.json").is_file()


def test_crash_leaves_no_half_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_write_task(*args: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        real_write_task(*args)

    real_write_task = generated._write_task
    monkeypatch.setattr(generated, "_write_task", failing_write_task)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_stream(tmp_path / "s", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_unknown_task_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="'desert'") as info:
        generated_stream(tmp_path / "s", {"tasks": ["aerial", "desert"]})
    assert all(task in str(info.value) for task in SCENARIOS)
    assert not (tmp_path / "s").exists()


def test_unknown_option_names_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'colours'") as info:
        build_stream("generated", tmp_path / "s", {"colours": 3})
    assert all(key in str(info.value) for key in ("seed", "train_per_task", "test_per_task", "tasks"))


@pytest.mark.parametrize(
    "options",
    [
        {"seed": -1},
        {"seed": "1"},
        {"train_per_task": 0},
        {"test_per_task": True},
        {"tasks": "aerial"},
        {"tasks": []},
        {"tasks": ["aerial", "aerial"]},
    ],
)
def test_invalid_option_values(tmp_path: Path, options: dict) -> None:
    with pytest.raises(DataError):
        generated_stream(tmp_path / "s", options)
