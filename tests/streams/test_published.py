"""The published-benchmark streams read from fixture folders in their published layouts, and from exports."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mcl.errors import ConfigError, DataError
from mcl.streams import Stream, available_streams, build_stream
from mcl.streams.fixtures import CAMERA_VIEWS, PROBLEMS, write_fixture
from mcl.streams.formats import check_images
from mcl.streams.mllm_cl import sci_answer_type
from mcl.streams.msvqa import SCENARIOS, cross_scenario_order
from mcl.streams.sources import write_export

STREAMS = ("mllm-cl-domain", "mllm-cl-ability", "coin", "ucit", "msvqa")
MAPQA_LIST = {"mllmcl_sci_exact", "mllmcl_sci_list", "mllmcl_sci_contains"}
EXPECTED: dict[str, dict[str, set[str]]] = {  # task order and the scorers of its test samples
    "mllm-cl-domain": {
        "RS": {"mllmcl_rs"},
        "Med": {"mllmcl_med"},
        "AD": {"mllmcl_ad"},
        "Sci": MAPQA_LIST,
        "Fin": {"mllmcl_fin"},
    },
    "mllm-cl-ability": {
        "OCR": {"mllmcl_ocr", "mllmcl_ocr_hme"},
        "Math": {"mllmcl_math"},
        "VP": {"mllmcl_vp"},
        "GUI": {"mllmcl_gui"},
    },
    "coin": {
        "ScienceQA": {"choice"},
        "TextVQA": {"vqa_soft"},
        "ImageNet": {"substring_either"},
        "GQA": {"exact"},
        "VizWiz": {"caseless_exact"},
        "Grounding": {"single_box_iou"},
        "VQAv2": {"caseless_exact"},
        "OCRVQA": {"caseless_exact"},
    },
    "ucit": {
        "ImageNet-R": {"caseless_exact"},
        "ArxivQA": {"caseless_exact"},
        "VizWiz-caption": {"token_f1"},
        "IconQA": {"caseless_exact"},
        "CLEVR-Math": {"caseless_exact"},
        "Flickr30k": {"token_f1"},
    },
    "msvqa": {scenario: {"msvqa"} for scenario in SCENARIOS},
}
SIZES = {"msvqa": (10, 5)}  # (train, test) per task; others: (3, 3)


def _fixture(tmp_path: Path, stream: str, **kwargs: Any) -> Path:
    train, test = SIZES.get(stream, (3, 3))
    kwargs = {"train_per_task": train, "test_per_task": test, **kwargs}
    return write_fixture(stream, tmp_path / stream, **kwargs).root


def _key(sample: Any) -> tuple[Any, ...]:
    digest = hashlib.sha256(Path(sample.image).read_bytes()).hexdigest()
    return (sample.id, sample.question, sample.answer, sample.answer_type, sample.task, sample.extra, digest)


def _keys(stream: Stream) -> list[list[tuple[Any, ...]]]:
    return [[_key(s) for s in task.train] + [_key(s) for s in task.test] for task in stream.tasks]


def _all(stream: Stream) -> list[Any]:
    return [s for task in stream.tasks for s in (*task.train, *task.test)]


def test_registered() -> None:
    assert set(STREAMS) <= set(available_streams())


# --- published layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream_name", STREAMS)
def test_reads_published_layout(tmp_path: Path, stream_name: str) -> None:
    root = _fixture(tmp_path, stream_name)
    stream = build_stream(stream_name, root, {})
    train_n, test_n = SIZES.get(stream_name, (3, 3))
    assert stream.name == stream_name
    assert stream.task_names == list(EXPECTED[stream_name])
    for task in stream.tasks:
        assert (len(task.train), len(task.test)) == (train_n, test_n), task.name
        for split in (task.train, task.test):
            assert len({s.id for s in split}) == len(split)
        assert {s.answer_type for s in task.test} == EXPECTED[stream_name][task.name], task.name
        for sample in (*task.train, *task.test):
            assert sample.task == task.name
            assert Path(sample.image).is_absolute() and Path(sample.image).is_file()
            assert Path(sample.image).resolve().is_relative_to(root.resolve())
            assert sample.question and "<image>" not in sample.question
            assert isinstance(sample.answer, str) and sample.answer
    check_images(_all(stream))


def test_mllm_cl_test_extras_and_answers(tmp_path: Path) -> None:
    ability = build_stream("mllm-cl-ability", _fixture(tmp_path, "mllm-cl-ability"), {})
    ocr, _, vp, gui = ability.tasks
    regular, hme = ocr.test[0], ocr.test[1]
    assert regular.answer_type == "mllmcl_ocr" and json.loads(regular.answer) == ["STOP", "stop sign"]
    assert regular.extra == {"answer_type": "Regular Text Recognition"}  # an OCRBench category, kept
    assert hme.answer_type == "mllmcl_ocr_hme" and hme.answer == "x^{2}+1"
    assert vp.test[0].extra == {"type": "2D", "task": "Count"}
    assert gui.name == "GUI" and Path(gui.test[0].image).parent.parent.name == "APP_test"
    assert Path(gui.train[0].image).parent.parent.name == "APP"
    assert ability.tasks[1].test[0].id == "testmini_0"

    domain = build_stream("mllm-cl-domain", _fixture(tmp_path, "mllm-cl-domain"), {})
    assert [s.id for s in domain.tasks[1].train][:1] == ["med_train_0"]  # `question_id` as the train id
    sci = domain.tasks[3]
    assert [s.answer_type for s in sci.test] == ["mllmcl_sci_exact", "mllmcl_sci_list", "mllmcl_sci_contains"]
    assert [s.answer_type for s in sci.train] == [
        "mllmcl_sci_exact",
        "mllmcl_sci_list",
        "mllmcl_sci_contains",
    ]


def test_sci_answer_type_rule() -> None:
    assert sci_answer_type({"image": "images/TQA_12.png"}, "Which states ...?") == "mllmcl_sci_exact"
    assert sci_answer_type({"image": ["a/SciVerse_1.png"]}, "what?") == "mllmcl_sci_exact"
    assert sci_answer_type({"image": "images/MapQA_3.png"}, "Which states have ...?") == "mllmcl_sci_list"
    assert sci_answer_type({"image": "images/MapQA_3.png"}, "What is the value?") == "mllmcl_sci_contains"


def test_fin_test_file_typo_of_the_readme_is_accepted(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "mllm-cl-domain")
    (root / "Fin" / "test.json").rename(root / "Fin" / "test.sjon")
    assert len(build_stream("mllm-cl-domain", root, {"tasks": ["Fin"]}).tasks[0].test) == 3


def test_single_box_iou_and_vqa_answers(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "coin")
    coin = {t.name: t for t in build_stream("coin", root, {}).tasks}
    box = coin["Grounding"].test[0]
    assert box.answer == "[0.12, 0.2, 0.5, 0.64]" and box.extra == {"size": [16, 12]}
    assert box.answer_type == "single_box_iou"
    # TextVQA: the ten annotators of TextVQA's own val file (cl_dataset/TextVQA/), joined by question_id.
    soft = coin["TextVQA"].test[0]
    assert soft.id == "34602" and soft.answer_type == "vqa_soft"
    assert json.loads(soft.answer) == ["coca cola"] * 7 + ["coke"] * 3
    assert soft.extra == {"answer": "coca cola"}
    assert all(s.answer_type == "caseless_exact" and s.answer == "no" for s in coin["VQAv2"].test)
    assert [s.answer for s in coin["VizWiz"].test] == ["unanswerable"] * 3


def test_coin_textvqa_annotations_option(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "coin")
    official = root / "cl_dataset" / "TextVQA" / "TextVQA_0.5.1_val.json"
    official.rename(root / "textvqa_val.json")
    plain = build_stream("coin", root, {"tasks": ["TextVQA"]}).tasks[0]  # no file: the row's own answer
    assert [(s.answer, s.answer_type, s.extra) for s in plain.test] == [("coca cola", "vqa_soft", {})] * 3
    moved = build_stream("coin", root, {"tasks": ["TextVQA"], "textvqa_annotations": "textvqa_val.json"})
    assert all(len(json.loads(s.answer)) == 10 for s in moved.tasks[0].test)
    with pytest.raises(DataError, match="nope.json not found \\(option 'textvqa_annotations'\\)"):
        build_stream("coin", root, {"textvqa_annotations": "nope.json"})
    with pytest.raises(ConfigError, match="option 'textvqa_annotations' must be a file path relative"):
        build_stream("coin", root, {"textvqa_annotations": str(root / "textvqa_val.json")})
    content = json.loads((root / "textvqa_val.json").read_text())
    content["data"] = content["data"][1:]
    (root / "textvqa_val.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match="question_id '34602' is not in"):
        build_stream("coin", root, {"textvqa_annotations": "textvqa_val.json"})
    (root / "textvqa_val.json").write_text(json.dumps({"data": [{"question_id": 1, "answers": []}]}))
    with pytest.raises(DataError, match="needs a non-empty list of 'answers'"):
        build_stream("coin", root, {"textvqa_annotations": "textvqa_val.json"})
    # Exports hold the references they were written with; the file is not joined again.
    published = build_stream("coin", _fixture(tmp_path / "b", "coin"), {})
    write_export(published.tasks, tmp_path / "x.jsonl", "jsonl", tmp_path / "b" / "coin")
    exported = build_stream(
        "coin", tmp_path / "b" / "coin", {"source": "jsonl", "path": str(tmp_path / "x.jsonl")}
    )
    assert _keys(exported) == _keys(published)


def test_coin_and_ucit_folders_are_options(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "coin")
    for task in (root / "Instructions").iterdir():
        shutil.move(task, root / task.name)  # HiDe-LLaVA's layout: <root>/<Task>/*.json, <root>/datasets/
    (root / "cl_dataset").rename(root / "datasets")
    with pytest.raises(DataError, match=r"layout\.ScienceQA\.train"):
        build_stream("coin", root, {})
    stream = build_stream("coin", root, {"instructions_dir": ".", "images_dir": "datasets"})
    assert len(stream.tasks) == 8
    with pytest.raises(ConfigError, match="option 'images_dir'"):
        build_stream("coin", root, {"images_dir": str(root)})

    ucit = _fixture(tmp_path, "ucit")
    (ucit / "instructions" / "CLEVR").rename(ucit / "instructions" / "CLEVR-Math")  # the scripts' name
    assert build_stream("ucit", ucit, {"tasks": ["CLEVR-Math"]}).task_names == ["CLEVR-Math"]


def test_layout_option_moves_a_task(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "mllm-cl-domain")
    (root / "RS").rename(root / "RemoteSensing")
    with pytest.raises(DataError, match=r"RS/train\.json.*layout\.RS\.train"):
        build_stream("mllm-cl-domain", root, {})
    layout = {"RS": {"train": "RemoteSensing/train.json", "test": ["RemoteSensing/test.json"]}}
    stream = build_stream("mllm-cl-domain", root, {"layout": layout})
    assert Path(stream.tasks[0].test[0].image).parent.parent.name == "RemoteSensing"


# --- DriveLM camera views ---------------------------------------------------------------------------------


def test_drivelm_views_are_tiled_once_into_the_cache(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "mllm-cl-domain")
    stream = build_stream("mllm-cl-domain", root, {"tasks": ["AD"]})
    (ad,) = stream.tasks
    tile = Path(ad.train[0].image)
    assert tile.parent == (root / ".mcl_cache" / "tiles").resolve()
    with Image.open(tile) as grid:
        grid = grid.convert("RGB")
    width, height = 16, 12
    assert grid.size == (3 * width, 2 * height)  # six views: 2 rows x 3 columns
    for index, view in enumerate(CAMERA_VIEWS):
        with Image.open(root / "AD" / "images" / "train_scene_0" / f"{view}.png") as image:
            cell = grid.crop(
                (
                    (index % 3) * width,
                    (index // 3) * height,
                    (index % 3 + 1) * width,
                    (index // 3 + 1) * height,
                )
            )
            assert list(cell.getdata()) == list(image.convert("RGB").getdata()), view
    assert all(Path(s.image).parent.name == "images" for s in ad.test)  # single test images stay as they are
    assert len({s.image for s in ad.train}) == len(ad.train)

    mtime = tile.stat().st_mtime_ns
    again = build_stream("mllm-cl-domain", root, {"tasks": ["AD"]}).tasks[0]
    assert again.train[0].image == str(tile) and tile.stat().st_mtime_ns == mtime  # reused, not rewritten

    other = tmp_path / "cache"
    moved = build_stream("mllm-cl-domain", root, {"tasks": ["AD"], "cache_dir": str(other)}).tasks[0]
    assert Path(moved.train[0].image).parent == (other / "tiles").resolve()
    assert Path(moved.train[0].image).read_bytes() == tile.read_bytes()  # deterministic


def test_tiling_problems_name_the_sample(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "mllm-cl-domain")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(DataError, match="option 'cache_dir'"):
        build_stream("mllm-cl-domain", root, {"tasks": ["AD"], "cache_dir": str(blocked)})
    (root / "AD" / "images" / "train_scene_1" / "CAM_BACK.png").unlink()
    with pytest.raises(DataError, match=r"'ad_train_1'.*CAM_BACK\.png to tile is missing"):
        build_stream("mllm-cl-domain", root, {"tasks": ["AD"]})


# --- exports: HF datasets, Parquet, JSON Lines ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "dest", "embed", "as_dict"),
    [
        ("jsonl", "export/samples.jsonl", False, False),
        ("jsonl", "export/embedded.jsonl", True, False),
        ("parquet", "export/samples.parquet", False, False),
        ("parquet", "export/embedded.parquet", True, False),
        ("hf", "export/hf_dataset", True, False),
        ("hf", "export/hf_dataset_dict", False, True),
    ],
)
def test_exports_give_the_published_samples(
    tmp_path: Path, kind: str, dest: str, embed: bool, as_dict: bool
) -> None:
    root = _fixture(tmp_path, "mllm-cl-domain")
    published = build_stream("mllm-cl-domain", root, {})
    write_export(
        published.tasks, root / dest, kind, image_root=root, embed_images=embed, as_dataset_dict=as_dict
    )
    exported = build_stream("mllm-cl-domain", root, {"source": kind, "path": dest})
    assert exported.task_names == published.task_names
    assert _keys(exported) == _keys(published)
    if embed:
        assert all(Path(s.image).parent == (root / ".mcl_cache" / "images").resolve() for s in _all(exported))
    else:
        assert [s.image for s in _all(exported)] == [s.image for s in _all(published)]


@pytest.mark.parametrize("stream_name", STREAMS)
def test_every_stream_round_trips_through_parquet(tmp_path: Path, stream_name: str) -> None:
    root = _fixture(tmp_path, stream_name)
    published = build_stream(stream_name, root, {})
    write_export(published.tasks, tmp_path / "out" / "all.parquet", "parquet", root, embed_images=True)
    exported = build_stream(stream_name, root, {"source": "parquet", "path": str(tmp_path / "out")})
    assert _keys(exported) == _keys(published)


def test_hf_load_dataset_folder_and_task_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    root = _fixture(tmp_path, "ucit")
    published = build_stream("ucit", root, {})
    write_export(published.tasks, root / "hub" / "data" / "train-00000.parquet", "parquet", root)
    exported = build_stream(
        "ucit", root, {"source": "hf", "path": "hub/data", "tasks": ["Flickr30k", "ArxivQA"]}
    )
    assert exported.task_names == ["Flickr30k", "ArxivQA"]
    assert _keys(exported) == [_keys(published)[5], _keys(published)[1]]


def test_export_problems_are_named(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "msvqa")
    tasks = build_stream("msvqa", root, {}).tasks
    path = write_export(tasks, root / "x.jsonl", "jsonl", root)
    rows = [json.loads(line) for line in path.read_text().splitlines()]

    def rewrite(mutated: list[dict[str, Any]]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in mutated))

    cases = [
        ([{**rows[0], "task": "space"}, *rows[1:]], r"x\.jsonl: row 0 \(line 1\): unknown task 'space'"),
        (
            [{k: v for k, v in rows[0].items() if k != "question"}, *rows[1:]],
            "missing required column 'question'",
        ),
        ([{**rows[0], "split": "val"}, *rows[1:]], "field 'split' must be 'train' or 'test'"),
        ([*rows, rows[-1]], r"duplicate id 'indoor_test_4' in task 'indoor' \(test\)"),
        ([{**rows[0], "image": "../../etc/passwd"}, *rows[1:]], "escapes the image root"),
        ([{**rows[0], "extra": "[1]"}, *rows[1:]], "column 'extra' must be a JSON object"),
    ]
    for mutated, message in cases:
        rewrite(mutated)
        with pytest.raises(DataError, match=message):
            build_stream("msvqa", root, {"source": "jsonl", "path": "x.jsonl"})
    with pytest.raises(DataError, match=r"jsonl export .*nope\.jsonl not found \(option 'path'"):
        build_stream("msvqa", root, {"source": "jsonl", "path": "nope.jsonl"})
    with pytest.raises(DataError, match="cannot load a Hugging Face dataset"):
        build_stream("msvqa", root, {"source": "hf", "path": str(root / "high_altitude" / "train.json")})


# --- MSVQA protocols --------------------------------------------------------------------------------------


def test_msvqa_20_step_rule(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "msvqa")
    scenarios = build_stream("msvqa", root, {})
    steps = build_stream("msvqa", root, {"protocol": "20step", "seed": 7})
    assert len(steps.tasks) == 20
    names = steps.task_names
    for k in range(5):  # round k: chunk k+1 of every scenario
        assert sorted(names[4 * k : 4 * k + 4]) == sorted(f"{s}_{k + 1}" for s in SCENARIOS)
    assert all(a.rsplit("_", 1)[0] != b.rsplit("_", 1)[0] for a, b in zip(names, names[1:], strict=False))
    for scenario_task in scenarios.tasks:
        mine = [t for t in steps.tasks if t.name.rsplit("_", 1)[0] == scenario_task.name]
        for split in ("train", "test"):
            ids = [s.id for t in mine for s in getattr(t, split)]
            assert Counter(ids) == Counter(s.id for s in getattr(scenario_task, split))  # each exactly once
            sizes = [len(getattr(t, split)) for t in mine]
            assert max(sizes) - min(sizes) <= 1
        for task in mine:
            assert all(s.task == task.name and s.extra["scenario"] == scenario_task.name for s in task.test)

    same = build_stream("msvqa", root, {"protocol": "20step", "seed": 7})
    assert same.task_names == names and _keys(same) == _keys(steps)
    other = build_stream("msvqa", root, {"protocol": "20step", "seed": 8})
    assert _keys(other) != _keys(steps)
    write_export(scenarios.tasks, root / "msvqa.parquet", "parquet", root)
    exported = build_stream(
        "msvqa", root, {"source": "parquet", "path": "msvqa.parquet", "protocol": "20step", "seed": 7}
    )
    assert _keys(exported) == _keys(steps)


def test_msvqa_options(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "msvqa")
    two = build_stream(
        "msvqa", root, {"protocol": "20step", "chunks_per_scenario": 2, "tasks": ["indoor", "underwater"]}
    )
    assert sorted(two.task_names) == ["indoor_1", "indoor_2", "underwater_1", "underwater_2"]
    assert cross_scenario_order(["a", "b", "c"], 3, 0) == cross_scenario_order(["a", "b", "c"], 3, 0)
    with pytest.raises(ConfigError, match="option 'protocol'"):
        build_stream("msvqa", root, {"protocol": "5step"})
    with pytest.raises(ConfigError, match="'chunks_per_scenario' applies to protocol '20step'"):
        build_stream("msvqa", root, {"chunks_per_scenario": 5})
    with pytest.raises(ConfigError, match="option 'chunks_per_scenario'"):
        build_stream("msvqa", root, {"protocol": "20step", "chunks_per_scenario": 0})
    with pytest.raises(DataError, match="has 5 test samples, fewer than chunks_per_scenario=6"):
        build_stream("msvqa", root, {"protocol": "20step", "chunks_per_scenario": 6})


# --- options ----------------------------------------------------------------------------------------------


def test_tasks_and_limits(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "coin", train_per_task=6, test_per_task=5)
    full = build_stream("coin", root, {})
    stream = build_stream(
        "coin", root, {"tasks": ["GQA", "ScienceQA"], "max_train_per_task": 4, "max_test_per_task": 2}
    )
    assert stream.task_names == ["GQA", "ScienceQA"]
    gqa = stream.tasks[0]
    assert (len(gqa.train), len(gqa.test)) == (4, 2)
    order = [s.id for s in full.tasks[3].train]
    assert [s.id for s in gqa.train] == sorted((s.id for s in gqa.train), key=order.index)  # file order kept
    again = build_stream("coin", root, {"tasks": ["GQA"], "max_train_per_task": 4})
    assert [s.id for s in again.tasks[0].train] == [s.id for s in gqa.train]  # deterministic per seed
    subsets = {
        tuple(
            s.id
            for s in build_stream("coin", root, {"tasks": ["GQA"], "max_train_per_task": 3, "seed": seed})
            .tasks[0]
            .train
        )
        for seed in range(6)
    }
    assert len(subsets) > 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"colour": "red"}, r"unknown option\(s\) 'colour'.*valid options: source"),
        ({"source": "csv"}, "option 'source' must be one of published, hf, parquet, jsonl"),
        ({"tasks": "RS"}, "option 'tasks' must be a non-empty list"),
        ({"tasks": []}, "option 'tasks' must be a non-empty list"),
        ({"tasks": ["RS", "RS"]}, "option 'tasks' must be a list without repeats"),
        ({"tasks": ["RS", "Space"]}, "option 'tasks' names unknown task 'Space'; valid tasks: RS, Med, AD"),
        ({"max_train_per_task": 0}, "option 'max_train_per_task' must be a positive integer"),
        ({"max_test_per_task": True}, "option 'max_test_per_task' must be a positive integer"),
        ({"max_test_per_task": "3"}, "option 'max_test_per_task' must be a positive integer"),
        ({"seed": -1}, "option 'seed' must be a non-negative integer"),
        ({"path": "x.parquet"}, "option 'path' applies to source hf, parquet or jsonl"),
        ({"source": "jsonl", "hf_config": "a"}, "option 'hf_config' applies to source 'hf' only"),
        ({"source": "jsonl", "layout": {}}, "option 'layout' applies to source 'published' only"),
        ({"layout": {"Space": {}}}, r"option 'layout\.Space': unknown task"),
        ({"layout": {"RS": {"images": "x"}}}, r"option 'layout\.RS\.images' is unknown"),
        ({"layout": {"RS": {"train": 3}}}, r"option 'layout\.RS\.train' must be a relative path"),
        ({"layout": ["RS"]}, "option 'layout' must be a mapping"),
    ],
)
def test_bad_options_name_the_option(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(ConfigError, match=message):
        build_stream("mllm-cl-domain", root, options)


# --- bad folders ------------------------------------------------------------------------------------------


def test_missing_root_and_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data root .*nowhere is not a folder \(stream\.root\)"):
        build_stream("ucit", tmp_path / "nowhere", {})
    root = _fixture(tmp_path, "ucit")
    shutil.rmtree(root / "datasets")
    with pytest.raises(DataError, match=r"task 'ImageNet-R': train image folder .*datasets not found"):
        build_stream("ucit", root, {})
    root = _fixture(tmp_path, "mllm-cl-ability")
    (root / "Math_test" / "test.json").unlink()
    with pytest.raises(DataError, match=r"task 'Math': test annotations not found .*Math_test/test\.json"):
        build_stream("mllm-cl-ability", root, {})


@pytest.mark.parametrize("stream_name", ["mllm-cl-domain", "coin", "msvqa"])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_injected_problems_are_caught(tmp_path: Path, stream_name: str, problem: str) -> None:
    fixture = write_fixture(stream_name, tmp_path / "root", problems=[problem])
    (injected,) = fixture.problems
    assert injected.kind == problem and injected.task == fixture.tasks[0]
    if problem in ("duplicate_id", "escaping_path"):
        message = "duplicate id" if problem == "duplicate_id" else "escapes the image root"
        with pytest.raises(DataError, match=message) as info:
            build_stream(stream_name, fixture.root, {})
        assert repr(injected.sample_id) in str(info.value) and str(injected.annotation) in str(info.value)
        return
    stream = build_stream(stream_name, fixture.root, {})
    with pytest.raises(
        DataError, match="is missing" if problem == "missing_image" else "does not decode"
    ) as info:
        check_images(_all(stream))
    assert repr(injected.sample_id) in str(info.value)


def test_fixture_writer(tmp_path: Path) -> None:
    first = write_fixture("coin", tmp_path / "a", problems=PROBLEMS)
    second = write_fixture("coin", tmp_path / "b", problems=PROBLEMS)

    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    assert files(first.root) == files(second.root)  # deterministic
    assert [p.kind for p in first.problems] == list(PROBLEMS)
    assert (tmp_path / "outside-coin.png").is_file()
    with pytest.raises(ConfigError, match="is not empty"):
        write_fixture("coin", first.root)
    with pytest.raises(ConfigError, match="no fixture for stream 'generated'"):
        write_fixture("generated", tmp_path / "c")
    with pytest.raises(ConfigError, match="unknown fixture problem"):
        write_fixture("coin", tmp_path / "d", problems=["typo"])
