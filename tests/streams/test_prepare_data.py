"""Data checks (``mcl.streams.check``, ``jobs/prepare_data.py``, ``stream.skip_bad_samples``) on fixture folders
in every published layout, clean and broken, end to end from reading to scoring."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mcl.config import load_config
from mcl.errors import ConfigError, DataError
from mcl.evaluation.scoring import score
from mcl.streams import Stream, build_stream
from mcl.streams.check import DataReport, check_stream, format_report, read_clean_stream
from mcl.streams.fixtures import PROBLEMS, write_fixture
from mcl.streams.sources import write_export

REPO = Path(__file__).resolve().parents[2]
STREAMS = ("mllm-cl-domain", "mllm-cl-ability", "coin", "ucit", "msvqa")


def _job():
    spec = importlib.util.spec_from_file_location("mcl_prepare_data_job", REPO / "jobs" / "prepare_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _found(report: DataReport) -> list[tuple[str, str, str, str | None]]:
    """(kind, task, split, sample id) of every problem example in the report."""
    return sorted((p.kind, p.task, p.split, p.sample_id) for s in report.splits for p in s.examples)


def _content(stream: Stream) -> list[list[tuple[Any, ...]]]:
    """Per task and split: the samples' fields and image bytes (paths differ between sources)."""

    def key(sample: Any) -> tuple[Any, ...]:
        digest = hashlib.sha256(Path(sample.image).read_bytes()).hexdigest()
        return (
            sample.id,
            sample.question,
            sample.answer,
            sample.answer_type,
            sample.task,
            sample.extra,
            digest,
        )

    return [[key(s) for s in split] for task in stream.tasks for split in (task.train, task.test)]


# --- reports -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream_name", STREAMS)
def test_clean_folder_reports_counts_and_no_problems(tmp_path: Path, stream_name: str) -> None:
    fixture = write_fixture(stream_name, tmp_path / stream_name)
    report = check_stream(stream_name, fixture.root, {})
    assert report.ok and report.fatal is None and report.skipped == 0 and report.problem_counts() == {}
    stream = build_stream(stream_name, fixture.root, {})
    assert [(s.task, s.split) for s in report.splits] == [
        (task, split) for task in fixture.tasks for split in ("train", "test")
    ]
    for entry in report.splits:
        task = stream.tasks[fixture.tasks.index(entry.task)]
        samples = task.train if entry.split == "train" else task.test
        expected = fixture.train_per_task if entry.split == "train" else fixture.test_per_task
        assert entry.samples == len(samples) == expected
        assert entry.answer_types == dict(Counter(s.answer_type for s in samples))
        assert entry.problems == {} and entry.examples == []
    assert report.samples == len(fixture.tasks) * (fixture.train_per_task + fixture.test_per_task)
    assert "**OK**" in format_report(report)
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


@pytest.mark.parametrize("stream_name", STREAMS)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_each_injected_fault_is_reported_and_only_it_is_dropped(
    tmp_path: Path, stream_name: str, problem: str
) -> None:
    broken = write_fixture(stream_name, tmp_path / "broken", problems=[problem])
    (injected,) = broken.problems
    stream, report = read_clean_stream(stream_name, broken.root, {})
    assert _found(report) == [(problem, injected.task, "test", injected.sample_id)]
    assert report.problem_counts() == {problem: 1} and report.skipped == 1 and not report.ok
    (entry,) = [s for s in report.splits if s.skipped]
    assert (entry.task, entry.split, entry.samples) == (injected.task, "test", broken.test_per_task)
    example = entry.examples[0]
    assert repr(injected.sample_id) in example.reason
    if problem != "duplicate_id":
        assert Path(injected.image).name in example.reason  # the reason names the image path
    # Left without the bad row, the stream is exactly the clean fixture.
    clean = write_fixture(stream_name, tmp_path / "clean")
    assert _content(stream) == _content(build_stream(stream_name, clean.root, {}))


def test_all_faults_at_once(tmp_path: Path) -> None:
    fixture = write_fixture("coin", tmp_path / "coin", problems=PROBLEMS)
    report = check_stream("coin", fixture.root, {})
    assert _found(report) == sorted((p.kind, p.task, "test", p.sample_id) for p in fixture.problems)
    assert report.skipped == 4 and report.samples == 8 * (3 + 2)
    text = format_report(report)
    assert "**4 bad samples**" in text and "### ScienceQA / test" in text
    for injected in fixture.problems:
        assert injected.kind in text and repr(injected.sample_id) in text
    images_unchecked = check_stream("coin", fixture.root, {}, images=False)
    assert {p[0] for p in _found(images_unchecked)} == {"duplicate_id", "escaping_path"}


def test_rows_paths_and_camera_views_are_reported(tmp_path: Path) -> None:
    root = write_fixture("mllm-cl-domain", tmp_path / "d", train_per_task=3, test_per_task=3).root
    rs_test = json.loads((root / "RS" / "test.json").read_text())
    del rs_test[0]["text"]
    rs_test[1]["image"] = "/etc/hosts"
    (root / "RS" / "test.json").write_text(json.dumps(rs_test))
    med_train = json.loads((root / "Med" / "train.json").read_text())
    med_train[0]["conversations"] = med_train[0]["conversations"][:1]  # no gpt turn
    (root / "Med" / "train.json").write_text(json.dumps(med_train))
    (root / "AD" / "images" / "train_scene_1" / "CAM_BACK.png").unlink()  # one of six views to tile

    stream, report = read_clean_stream("mllm-cl-domain", root, {})
    assert _found(report) == [
        ("escaping_path", "RS", "test", "rs_test_1"),
        ("malformed_row", "Med", "train", "med_train_0"),
        ("malformed_row", "RS", "test", "rs_test_0"),
        ("missing_image", "AD", "train", "ad_train_1"),
    ]
    reasons = {p.sample_id: p.reason for s in report.splits for p in s.examples}
    assert "missing required field 'text'" in reasons["rs_test_0"]
    assert "is absolute" in reasons["rs_test_1"]
    assert "no 'gpt' turn" in reasons["med_train_0"]
    assert "CAM_BACK.png to tile is missing" in reasons["ad_train_1"]
    assert [s.id for s in stream.tasks[0].test] == ["rs_test_2"]
    assert [s.id for s in stream.tasks[2].train] == ["ad_train_0", "ad_train_2"]
    with pytest.raises(DataError, match="missing required field 'text'"):  # the default still stops
        build_stream("mllm-cl-domain", root, {})


def test_export_rows_and_answer_types_are_reported(tmp_path: Path) -> None:
    root = write_fixture("msvqa", tmp_path / "m").root
    path = write_export(build_stream("msvqa", root, {}).tasks, root / "x.jsonl", "jsonl", root)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tests = [i for i, r in enumerate(rows) if r["split"] == "test"]
    rows[tests[0]]["answer_type"] = "nonsense"
    rows[tests[1]]["extra"] = "[1]"
    rows[tests[2]]["image"] = "../../outside.png"
    del rows[0]["question"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_stream("msvqa", root, {"source": "jsonl", "path": "x.jsonl"})
    assert _found(report) == sorted(
        [
            ("unknown_answer_type", rows[tests[0]]["task"], "test", rows[tests[0]]["id"]),
            ("malformed_row", rows[tests[1]]["task"], "test", rows[tests[1]]["id"]),
            ("escaping_path", rows[tests[2]]["task"], "test", rows[tests[2]]["id"]),
            ("malformed_row", rows[0]["task"], "train", rows[0]["id"]),
        ]
    )
    answer_type = next(p for s in report.splits for p in s.examples if p.kind == "unknown_answer_type")
    assert "unknown answer_type 'nonsense'" in answer_type.reason


def test_unreadable_files_and_emptied_tasks_are_fatal(tmp_path: Path) -> None:
    root = write_fixture("coin", tmp_path / "c").root
    (root / "Instructions" / "GQA" / "test.json").unlink()
    report = check_stream("coin", root, {})
    assert report.fatal is not None and "task 'GQA': test annotations not found" in report.fatal
    assert not report.ok and "Cannot use this data" in format_report(report)
    with pytest.raises(DataError, match="test annotations not found"):
        read_clean_stream("coin", root, {})

    root = write_fixture("ucit", tmp_path / "u").root
    for image in (root / "datasets" / "ArxivQA" / "images").glob("test_*"):
        image.unlink()
    report = check_stream("ucit", root, {})
    assert (
        report.fatal == "stream 'ucit': task 'ArxivQA' has no test samples once the bad samples are left out"
    )
    assert report.problem_counts() == {"missing_image": 2}
    with pytest.raises(ConfigError, match="unknown option"):  # a bad invocation, not a data problem
        check_stream("ucit", root, {"colour": "red"})


# --- the job -----------------------------------------------------------------------------------------------


def test_job_exits_non_zero_on_problems_and_zero_with_skip_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _job()
    fixture = write_fixture("ucit", tmp_path / "ucit", problems=["missing_image", "duplicate_id"])
    report = tmp_path / "reports" / "ucit.json"
    args = ["--stream", "ucit", "--root", str(fixture.root), "--report", str(report)]
    assert job.main(args) == 1
    out, err = capsys.readouterr()
    assert "| ImageNet-R | test | 2 | 2 |" in out and "missing-image" in out
    assert "2 bad samples" in err and "--skip-bad" in err
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["skipped"] == 2
    assert data["problems"] == {"duplicate_id": 1, "missing_image": 1}

    assert job.main([*args, "--skip-bad"]) == 0
    assert "left out 2 bad samples" in capsys.readouterr().err

    clean = write_fixture("ucit", tmp_path / "clean")
    assert job.main(["--stream", "ucit", "--root", str(clean.root), "--report", str(report)]) == 0
    assert json.loads(report.read_text())["ok"] is True

    (fixture.root / "instructions" / "IconQA" / "train.json").write_text("[{")
    assert job.main([*args, "--skip-bad"]) == 1  # a file that does not parse cannot be skipped
    assert "malformed JSON" in capsys.readouterr().err
    assert job.main(["--stream", "ucit", "--root", str(clean.root), "--option", "colour=red"]) == 2
    assert job.main(["--stream", "nope", "--root", str(clean.root), "--report", str(report)]) == 2
    assert "unknown stream 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("stream_name", STREAMS)
def test_job_parquet_shards_read_back_as_the_same_samples(tmp_path: Path, stream_name: str) -> None:
    job = _job()
    fixture = write_fixture(stream_name, tmp_path / "data", problems=["undecodable_image"])
    out = tmp_path / "parquet"
    args = ["--stream", stream_name, "--root", str(fixture.root), "--report", str(tmp_path / "r.json")]
    assert job.main([*args, "--parquet", str(out), "--shard-rows", "2"]) == 1  # problems: nothing written
    assert not out.exists()
    assert job.main([*args, "--skip-bad", "--parquet", str(out), "--shard-rows", "2"]) == 0
    shards = sorted(p.name for p in out.glob("*.parquet"))
    per_task = -(-fixture.train_per_task // 2) + -(-fixture.test_per_task // 2)
    assert len(shards) == len(fixture.tasks) * per_task
    assert shards[0] == f"00-{fixture.tasks[0]}-test-00000.parquet"

    exported = build_stream(stream_name, out, {"source": "parquet"})
    clean, _ = read_clean_stream(stream_name, fixture.root, {})
    assert exported.task_names == clean.task_names
    assert _content(exported) == _content(clean)
    assert all(
        Path(s.image).parent == (out / ".mcl_cache" / "images").resolve() for s in exported.tasks[0].test
    )
    assert job.main([*args, "--skip-bad", "--parquet", str(out)]) == 2  # refuses to mix with old shards


def test_job_parquet_refuses_view_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_fixture("msvqa", tmp_path / "m").root
    args = ["--stream", "msvqa", "--root", str(root), "--parquet", str(tmp_path / "p")]
    assert _job().main([*args, "--option", "protocol=20step", "--option", "max_train_per_task=2"]) == 2
    assert "drop --option max_train_per_task, protocol" in capsys.readouterr().err
    assert _job().main([*args, "--no-images"]) == 2
    assert "drop --no-images" in capsys.readouterr().err


# --- end to end: check, convert, read, score -------------------------------------------------------------


def test_end_to_end_from_broken_folder_to_scores(tmp_path: Path) -> None:
    """A published MLLM-CL folder with bad samples -> report + Parquet (--skip-bad) -> stream -> the real
    scorers: the reference answers score 100% on every task, a wrong answer 0%."""
    fixture = write_fixture("mllm-cl-domain", tmp_path / "Domain_data", problems=PROBLEMS)
    out = tmp_path / "parquet"
    rc = _job().main(
        [
            "--stream",
            "mllm-cl-domain",
            "--root",
            str(fixture.root),
            "--report",
            str(tmp_path / "report.json"),
            "--skip-bad",
            "--parquet",
            str(out),
        ]
    )
    assert rc == 0
    assert json.loads((tmp_path / "report.json").read_text())["skipped"] == len(PROBLEMS)
    stream = build_stream("mllm-cl-domain", out, {"source": "parquet"})
    assert stream.task_names == ["RS", "Med", "AD", "Sci", "Fin"]
    injected = {p.sample_id for p in fixture.problems} - {
        fixture.problems[PROBLEMS.index("duplicate_id")].sample_id
    }
    for task in stream.tasks:
        assert len(task.test) == fixture.test_per_task and not injected & {s.id for s in task.test}
        right = [score(s.answer, s.answer, s.answer_type) for s in task.test]
        wrong = [score("zzz qqq", s.answer, s.answer_type) for s in task.test]
        assert sum(right) / len(right) == 1.0, task.name
        assert sum(wrong) == 0.0, task.name
    types = {s.answer_type for task in stream.tasks for s in task.test}
    assert {"mllmcl_rs", "mllmcl_med", "mllmcl_ad", "mllmcl_fin", "mllmcl_sci_exact"} <= types


# --- runs: stream.skip_bad_samples --------------------------------------------------------------------------


def _run_config(root: Path, tmp_path: Path, *overrides: str):
    return load_config(
        None,
        [
            "stream.name=coin",
            f"stream.root={root}",
            "stream.options={}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.output_dir={tmp_path}/runs",
            *overrides,
        ],
    )


def test_skip_bad_samples_drops_exactly_the_bad_samples(tmp_path: Path, tiny_model_path: str) -> None:
    from mcl.run import prepare_run

    fixture = write_fixture("coin", tmp_path / "coin", problems=PROBLEMS)
    # The default: a data problem stops the run (the first one found: repeated ids are found last).
    with pytest.raises(DataError, match="escapes the image root"):
        prepare_run(_run_config(fixture.root, tmp_path), log=lambda _m: None)
    logs: list[str] = []
    prep = prepare_run(_run_config(fixture.root, tmp_path, "stream.skip_bad_samples=true"), log=logs.append)
    clean = write_fixture("coin", tmp_path / "clean")
    assert _content(prep.stream) == _content(build_stream("coin", clean.root, {}))
    assert prep.data_report is not None and prep.data_report.skipped == 4
    assert logs[0].startswith("stream.skip_bad_samples: left out 4 bad samples ScienceQA/test 4 (")
    assert prep.data_report.skipped_metrics()["data_skipped_ScienceQA_test"] == 4.0

    unchecked = prepare_run(
        _run_config(fixture.root, tmp_path, "stream.skip_bad_samples=true", "stream.check_images=false"),
        log=lambda _m: None,
    )
    assert unchecked.data_report is not None and unchecked.data_report.skipped == 2  # images not opened
    with pytest.raises(ConfigError, match=r"stream\.skip_bad_samples: must be true or false"):
        load_config(None, ["stream.skip_bad_samples=maybe"])


def test_skipped_counts_are_logged_on_the_parent_run(
    tmp_path: Path, tiny_model_path: str, failing_executor: Any
) -> None:
    from mlflow import MlflowClient

    from mcl.run import run_experiment

    def stop(_run_dir: Path) -> None:
        raise RuntimeError("stop after the parent run's params")

    fixture = write_fixture("coin", tmp_path / "coin", problems=["missing_image", "escaping_path"])
    cfg = _run_config(fixture.root, tmp_path, "stream.skip_bad_samples=true")
    with pytest.raises(RuntimeError, match="stop after"):
        run_experiment(cfg, log=lambda _m: None, executor=failing_executor(stop))
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`mcl.kind` = 'stream_run'")
    metrics = parent.data.metrics
    assert metrics["data_skipped_total"] == 2.0
    assert metrics["data_skipped_ScienceQA_test"] == 2.0 and metrics["data_skipped_GQA_train"] == 0.0
    assert parent.data.params["stream.skip_bad_samples"] == "True"
    report = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "data_report.json", str(tmp_path))).read_text()
    )
    assert report["problems"] == {"escaping_path": 1, "missing_image": 1}
