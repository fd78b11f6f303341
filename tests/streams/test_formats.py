"""Readers for the published MLLM-CL formats: good files and every error case."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mcl.errors import DataError, SampleError
from mcl.streams.formats import check_images, read_llava_conversations, read_mllmcl_test
from mcl.streams.samples import Sample


def _write_png(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def _conv(
    sample_id: Any = "a1", image: Any = "images/a.png", question: str = "what is it ?"
) -> dict[str, Any]:
    return {
        "id": sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": "car"},
            {"from": "human", "value": "and then ?"},
            {"from": "gpt", "value": "ignored"},
        ],
    }


def _test_row(question_id: Any = "q1", image: Any = "images/a.png", **extra: Any) -> dict[str, Any]:
    return {"question_id": question_id, "image": image, "text": "what is it ?", "answer": "car", **extra}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    _write_png(data / "images" / "a.png")
    _write_png(data / "images" / "b.png", (10, 200, 10))
    return data


# --- good files -------------------------------------------------------------------------------------------


def test_llava_conversations_reads_first_exchange(root: Path) -> None:
    path = _write_json(root / "train.json", [_conv("a1"), _conv(7, "images/b.png", "how many ?")])
    samples = read_llava_conversations(path, root, task="t1", answer_type="anls")
    assert [s.id for s in samples] == ["a1", "7"]
    first = samples[0]
    assert first.question == "what is it ?"
    assert first.answer == "car"
    assert first.task == "t1" and first.answer_type == "anls"
    assert first.image == str((root / "images" / "a.png").resolve())
    assert Path(first.image).is_absolute()
    assert samples[1].question == "how many ?"


def test_llava_placeholder_after_question_and_leading_system_turn(root: Path) -> None:
    row = {
        "id": "x",
        "image": "images/a.png",
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "  what is it ? \n<image>  "},
            {"from": "gpt", "value": "car"},
        ],
    }
    (sample,) = read_llava_conversations(_write_json(root / "train.json", [row]), root, task="t")
    assert sample.question == "what is it ?"


def test_mllmcl_test_json_list_with_extra_and_answer_type(root: Path) -> None:
    rows = [_test_row("q1", type="mcq", task="RS"), _test_row(2, "images/b.png", answer_type="anls")]
    samples = read_mllmcl_test(_write_json(root / "test.json", rows), root, task="t")
    assert [s.id for s in samples] == ["q1", "2"]
    assert samples[0].answer_type == "exact"
    assert samples[0].extra == {"type": "mcq", "task": "RS"}
    assert samples[0].task == "t"
    assert samples[1].answer_type == "anls"
    assert samples[1].extra == {}
    assert samples[1].image == str((root / "images" / "b.png").resolve())


def test_mllmcl_test_jsonl(root: Path) -> None:
    lines = [json.dumps(_test_row("q1")), "", json.dumps(_test_row("q2", "images/b.png", type="open"))]
    path = root / "test.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    samples = read_mllmcl_test(path, root, task="t", answer_type="contains")
    assert [s.id for s in samples] == ["q1", "q2"]
    assert all(s.answer_type == "contains" for s in samples)
    assert samples[1].extra == {"type": "open"}


def test_check_images_accepts_good_images(root: Path) -> None:
    samples = read_mllmcl_test(_write_json(root / "test.json", [_test_row("q1"), _test_row("q2")]), root, "t")
    check_images(samples, workers=2)
    check_images([])


# --- malformed JSON ---------------------------------------------------------------------------------------


def test_malformed_json_names_line_and_column(root: Path) -> None:
    path = root / "train.json"
    path.write_text('[\n  {"id": "a1",\n   "image": oops}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3, column 13") as info:
        read_llava_conversations(path, root, task="t")
    assert str(path) in str(info.value)


def test_malformed_jsonl_names_line(root: Path) -> None:
    path = root / "test.jsonl"
    path.write_text(json.dumps(_test_row("q1")) + "\n\n" + '{"question_id": "q2", }\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3, column") as info:
        read_mllmcl_test(path, root, task="t")
    assert str(path) in str(info.value)


def test_top_level_not_a_list(root: Path) -> None:
    path = _write_json(root / "train.json", {"id": "a1"})
    with pytest.raises(DataError, match="expected a JSON list"):
        read_llava_conversations(path, root, task="t")


def test_missing_file(root: Path) -> None:
    with pytest.raises(DataError, match="file not found") as info:
        read_mllmcl_test(root / "nope.json", root, task="t")
    assert "nope.json" in str(info.value)


# --- invalid rows -----------------------------------------------------------------------------------------


def test_row_not_an_object(root: Path) -> None:
    path = _write_json(root / "test.json", [_test_row("q1"), ["not", "an", "object"]])
    with pytest.raises(DataError, match=r"row 1: expected a JSON object, got list") as info:
        read_mllmcl_test(path, root, task="t")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("field", ["question_id", "image", "text", "answer"])
def test_test_row_missing_field(root: Path, field: str) -> None:
    row = _test_row("q2")
    del row[field]
    path = _write_json(root / "test.json", [_test_row("q1"), row])
    with pytest.raises(DataError, match=rf"row 1: missing required field '{field}'") as info:
        read_mllmcl_test(path, root, task="t")
    assert str(path) in str(info.value)


def test_jsonl_row_error_names_row_and_line(root: Path) -> None:
    path = root / "test.jsonl"
    path.write_text("\n" + json.dumps(_test_row("q1")) + "\n" + json.dumps({"question_id": "q2"}) + "\n")
    with pytest.raises(DataError, match=r"row 1 \(line 3\): missing required field 'image'"):
        read_mllmcl_test(path, root, task="t")


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [("text", 3, "int"), ("answer", ["car"], "list"), ("image", None, "null"), ("answer_type", 1.5, "float")],
)
def test_test_row_wrong_type(root: Path, field: str, value: Any, kind: str) -> None:
    row = _test_row("q1")
    row[field] = value
    path = _write_json(root / "test.json", [row])
    with pytest.raises(DataError, match=rf"row 0: field '{field}' must be a string, got {kind}") as info:
        read_mllmcl_test(path, root, task="t")
    assert str(path) in str(info.value)


def test_bool_id_is_wrong_type(root: Path) -> None:
    path = _write_json(root / "test.json", [_test_row(True)])
    with pytest.raises(DataError, match=r"field 'question_id' must be a string, got bool"):
        read_mllmcl_test(path, root, task="t")


def test_llava_missing_and_wrong_fields(root: Path) -> None:
    row = _conv("a1")
    del row["conversations"]
    with pytest.raises(DataError, match=r"row 0: missing required field 'conversations'"):
        read_llava_conversations(_write_json(root / "train.json", [row]), root, task="t")
    row = _conv("a1")
    row["conversations"] = "hello"
    with pytest.raises(DataError, match=r"row 0: field 'conversations' must be a list, got str"):
        read_llava_conversations(_write_json(root / "train.json", [row]), root, task="t")
    row = _conv("a1")
    row["id"] = 1.0
    with pytest.raises(DataError, match=r"row 0: field 'id' must be a string, got float"):
        read_llava_conversations(_write_json(root / "train.json", [row]), root, task="t")


def test_llava_bad_turns(root: Path) -> None:
    row = _conv("a1")
    row["conversations"][1] = {"from": "human", "value": "again"}
    with pytest.raises(DataError, match=r"conversations\[1\]\.from' must be 'gpt'"):
        read_llava_conversations(_write_json(root / "train.json", [row]), root, task="t")
    row = _conv("a1")
    row["conversations"] = [{"from": "gpt", "value": "car"}]
    with pytest.raises(DataError, match="no 'human' turn"):
        read_llava_conversations(_write_json(root / "train.json", [row]), root, task="t")
    row = _conv("a1")
    row["conversations"] = [{"from": "human", "value": "<image>\nq ?"}]
    with pytest.raises(DataError, match="no 'gpt' turn"):
        read_llava_conversations(_write_json(root / "train.json", [row]), root, task="t")
    row = _conv("a1")
    row["conversations"][0] = {"from": "human"}
    with pytest.raises(DataError, match=r"row 0: conversations\[0\]: missing required field 'value'"):
        read_llava_conversations(_write_json(root / "train.json", [row]), root, task="t")
    row = _conv("a1")
    row["conversations"][0] = "hi"
    with pytest.raises(DataError, match=r"row 0: conversations\[0\]: expected a JSON object, got str"):
        read_llava_conversations(_write_json(root / "train.json", [row]), root, task="t")


def test_duplicate_id(root: Path) -> None:
    path = _write_json(root / "train.json", [_conv("a1"), _conv("b2"), _conv("a1")])
    with pytest.raises(DataError, match=r"duplicate id 'a1'") as info:
        read_llava_conversations(path, root, task="t")
    assert str(path) in str(info.value)
    path = _write_json(root / "test.json", [_test_row(5), _test_row("5")])
    with pytest.raises(DataError, match=r"duplicate id '5'"):
        read_mllmcl_test(path, root, task="t")


def test_on_problem_collects_row_problems_and_keeps_the_good_rows(root: Path) -> None:
    rows = [
        _test_row("q1"),
        _test_row("q1"),  # duplicate
        {"question_id": "q2", "image": "images/a.png", "answer": "car"},  # no text
        _test_row("q3", "../outside.png"),
        [1, 2],  # not an object
        _test_row("q4", "images/b.png"),
    ]
    path = _write_json(root / "test.json", rows)
    problems: list[SampleError] = []
    samples = read_mllmcl_test(path, root, task="t", on_problem=problems.append)
    assert [s.id for s in samples] == ["q1", "q4"]
    # Repeated ids are found once the whole file is read (the ids are not kept in memory): reported last.
    assert [(p.kind, p.sample_id) for p in problems] == [
        ("malformed_row", "q2"),
        ("escaping_path", "q3"),
        ("malformed_row", None),
        ("duplicate_id", "q1"),
    ]
    assert problems[0].image == "images/a.png" and "missing required field 'text'" in str(problems[0])
    with pytest.raises(SampleError, match="missing required field 'text'"):  # without on_problem: the first
        read_mllmcl_test(path, root, task="t")
    only_duplicate = _write_json(root / "dup.json", [_test_row("q1"), _test_row("q5"), _test_row("q1")])
    with pytest.raises(SampleError, match="duplicate id 'q1'"):
        read_mllmcl_test(only_duplicate, root, task="t")
    conversations = _write_json(root / "train.json", [_conv("a1"), {"id": "a2", "image": "images/a.png"}])
    problems.clear()
    assert [s.id for s in read_llava_conversations(conversations, root, "t", on_problem=problems.append)] == [
        "a1"
    ]
    assert [(p.kind, p.sample_id) for p in problems] == [("malformed_row", "a2")]
    (root / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="malformed JSON"):  # a file-level problem still raises
        read_llava_conversations(root / "broken.json", root, "t", on_problem=problems.append)


# --- unsafe image paths -----------------------------------------------------------------------------------


def test_image_path_escaping_with_dotdot(root: Path) -> None:
    _write_png(root.parent / "outside.png")
    path = _write_json(root / "train.json", [_conv("a1"), _conv("evil", "images/../../outside.png")])
    with pytest.raises(DataError, match="escapes the image root") as info:
        read_llava_conversations(path, root, task="t")
    message = str(info.value)
    assert str(path) in message and "'evil'" in message and "images/../../outside.png" in message


def test_image_path_absolute(root: Path) -> None:
    absolute = str((root / "images" / "a.png").resolve())
    path = _write_json(root / "test.json", [_test_row("abs", absolute)])
    with pytest.raises(DataError, match="is absolute") as info:
        read_mllmcl_test(path, root, task="t")
    message = str(info.value)
    assert str(path) in message and "'abs'" in message and absolute in message


def test_image_path_escaping_via_symlink(root: Path) -> None:
    outside = _write_png(root.parent / "secret" / "x.png")
    (root / "images" / "link").symlink_to(outside.parent, target_is_directory=True)
    path = _write_json(root / "test.json", [_test_row("sym", "images/link/x.png")])
    with pytest.raises(DataError, match="escapes the image root") as info:
        read_mllmcl_test(path, root, task="t")
    message = str(info.value)
    assert "'sym'" in message and "images/link/x.png" in message


def test_symlink_inside_root_is_allowed(root: Path) -> None:
    (root / "alias.png").symlink_to(root / "images" / "a.png")
    (sample,) = read_mllmcl_test(_write_json(root / "test.json", [_test_row("ok", "alias.png")]), root, "t")
    assert sample.image == str((root / "images" / "a.png").resolve())


def test_dotdot_staying_inside_root_is_allowed(root: Path) -> None:
    row = _test_row("ok", "images/../images/b.png")
    (sample,) = read_mllmcl_test(_write_json(root / "test.json", [row]), root, "t")
    assert sample.image == str((root / "images" / "b.png").resolve())


# --- check_images -----------------------------------------------------------------------------------------


def _sample(sample_id: str, image: Path) -> Sample:
    return Sample(id=sample_id, image=str(image), question="q ?", answer="a", task="t")


def test_check_images_missing(root: Path) -> None:
    missing = root / "images" / "gone.png"
    with pytest.raises(DataError, match="1 of 2 samples") as info:
        check_images([_sample("ok", root / "images" / "a.png"), _sample("lost", missing)])
    message = str(info.value)
    assert "'lost'" in message and str(missing) in message and "is missing" in message


def test_check_images_undecodable(root: Path) -> None:
    garbage = root / "images" / "garbage.png"
    garbage.write_bytes(b"this is not a png at all" * 10)
    truncated = root / "images" / "truncated.png"
    truncated.write_bytes((root / "images" / "a.png").read_bytes()[:40])
    with pytest.raises(DataError, match="2 of 3 samples") as info:
        check_images(
            [_sample("bad", garbage), _sample("ok", root / "images" / "a.png"), _sample("cut", truncated)],
            workers=3,
        )
    message = str(info.value)
    assert "'bad'" in message and str(garbage) in message and "does not decode" in message
    assert "'cut'" in message and str(truncated) in message
    assert "'ok'" not in message


def test_check_images_reports_first_five_and_total(root: Path) -> None:
    samples = [_sample(f"s{i}", root / "images" / f"missing{i}.png") for i in range(8)]
    with pytest.raises(DataError, match="8 of 8 samples") as info:
        check_images(samples)
    message = str(info.value)
    assert all(f"'s{i}'" in message for i in range(5))
    assert "'s5'" not in message and "3 more" in message


def test_many_images_are_checked_with_a_progress_bar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mcl.streams import formats

    paths = [str(_write_png(tmp_path / f"{i}.png")) for i in range(6)]
    formats.image_problems(paths, workers=2)
    assert "checking images" not in capsys.readouterr().err  # a few images: no bar
    monkeypatch.setattr(formats, "PROGRESS_BAR_MIN_IMAGES", 5)
    (tmp_path / "3.png").unlink()
    problems = formats.image_problems(paths, workers=2)
    assert list(problems) == [paths[3]] and problems[paths[3]][0] == "missing_image"
    bar = capsys.readouterr().err
    assert "checking images" in bar and "6/6" in bar
