"""Bad user input fails in ``prepare_run`` (before Ray, MLflow or any training) with an error naming it."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from mcl.config import load_config
from mcl.errors import ConfigError, DataError, UnknownNameError
from mcl.run import PreparedRun, prepare_run
from mcl.streams import Sample, Stream, TaskData, register_stream

REPO = Path(__file__).resolve().parents[2]
EMPTY_TASK_STREAM = "test-bad-input-empty-task"


@register_stream(EMPTY_TASK_STREAM)
def _empty_task_stream(root: Path, options: dict) -> Stream:
    sample = Sample(id="only", image=str(root / "x.png"), question="q ?", answer="a", task="full")
    return Stream(
        EMPTY_TASK_STREAM,
        [TaskData("full", [sample], [sample]), TaskData("hollow", [sample], [])],
    )


def _run_stream_module():
    spec = importlib.util.spec_from_file_location("mcl_test_run_stream", REPO / "jobs" / "run_stream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def stream_copy(generated_root: Path, tmp_path: Path) -> Path:
    """A private copy of the generated stream (its stream.json still matches, so the cache is reused)."""
    root = tmp_path / "generated"
    shutil.copytree(generated_root, root)
    return root


def _prepare(*overrides: str) -> PreparedRun:
    return prepare_run(load_config(None, list(overrides)), log=lambda _: None)


def test_valid_run_prepares(stream_copy: Path, tiny_model_path: str) -> None:
    logs: list[str] = []
    prep = prepare_run(load_config(None, [f"stream.root={stream_copy}"]), log=logs.append)
    assert prep.model_path == tiny_model_path  # the session's cache, no second build
    assert prep.stream.task_names == ["aerial", "underwater", "street", "indoor"]
    assert prep.method.name == "sequential_lora"
    assert len(logs) == 1 and "4 tasks" in logs[0]


def test_malformed_annotation_file(stream_copy: Path) -> None:
    train = stream_copy / "street" / "train.json"
    train.write_text(train.read_text()[:500])  # truncated mid-document
    with pytest.raises(DataError, match=r"street/train\.json: malformed JSON at line \d+, column \d+"):
        _prepare(f"stream.root={stream_copy}")


def test_annotation_row_missing_field(stream_copy: Path) -> None:
    path = stream_copy / "indoor" / "test.json"
    rows = json.loads(path.read_text())
    del rows[3]["answer"]
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"indoor/test\.json: row 3: missing required field 'answer'"):
        _prepare(f"stream.root={stream_copy}")


def test_missing_image(stream_copy: Path) -> None:
    (stream_copy / "underwater" / "images" / "underwater-train-00007.png").unlink()
    with pytest.raises(
        DataError, match=r"1 of \d+ samples have bad images: sample 'underwater-train-00007' .* is missing"
    ):
        _prepare(f"stream.root={stream_copy}")


def test_undecodable_image(stream_copy: Path) -> None:
    (stream_copy / "aerial" / "images" / "aerial-test-00002.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"sample 'aerial-test-00002' \(task 'aerial'\): .* does not decode"):
        _prepare(f"stream.root={stream_copy}")


def test_truncated_image(stream_copy: Path) -> None:
    image = stream_copy / "street" / "images" / "street-test-00000.png"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(DataError, match=r"sample 'street-test-00000' .* does not decode"):
        _prepare(f"stream.root={stream_copy}")


def test_images_are_not_checked_when_disabled(stream_copy: Path) -> None:
    (stream_copy / "aerial" / "images" / "aerial-test-00002.png").write_bytes(b"garbage")
    assert _prepare(f"stream.root={stream_copy}", "stream.check_images=false").stream.tasks


def test_image_path_escaping_the_root(stream_copy: Path) -> None:
    path = stream_copy / "underwater" / "test.json"
    rows = json.loads(path.read_text())
    rows[1]["image"] = "../../x.png"
    path.write_text(json.dumps(rows))
    sample_id = rows[1]["question_id"]
    with pytest.raises(
        DataError, match=rf"sample '{sample_id}': image path '\.\./\.\./x\.png' escapes the image root"
    ):
        _prepare(f"stream.root={stream_copy}")


def test_absolute_image_path(stream_copy: Path) -> None:
    path = stream_copy / "aerial" / "train.json"
    rows = json.loads(path.read_text())
    rows[0]["image"] = "/etc/passwd"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"image path '/etc/passwd' is absolute"):
        _prepare(f"stream.root={stream_copy}")


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(
        UnknownNameError, match=r"unknown method 'nope'; valid methods: .*sequential_lora"
    ) as info:
        _prepare("method.name=nope")
    assert "joint" in str(info.value)


def test_unknown_method_param() -> None:
    with pytest.raises(
        ConfigError, match=r"method\.params\.alpha: unknown parameter of method 'sequential_lora'"
    ):
        _prepare("method.params.alpha=1")


def test_unknown_stream_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match=r"unknown stream 'nope'; valid streams: .*generated"):
        _prepare("stream.name=nope", f"stream.root={tmp_path}")


def test_unknown_stream_option(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"unknown option\(s\) 'colour' for stream 'generated'; valid options"
    ):
        _prepare(f"stream.root={tmp_path / 'g'}", "stream.options.colour=red")


def test_unknown_model_lists_forms() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown model 'nope'.*tiny-llava.*hub id"):
        _prepare("model.name=nope")


def test_empty_task(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"stream '{EMPTY_TASK_STREAM}': task 'hollow' has no test samples"):
        _prepare(f"stream.name={EMPTY_TASK_STREAM}", f"stream.root={tmp_path}")


# -- the CLI -------------------------------------------------------------------------------------------------


def _assert_no_mlflow_run(db: Path) -> None:
    if not db.exists():
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
    assert not runs, f"a failed validation created MLflow runs: {runs}"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.lr=fast", "train.lr"),
        ("train.lrr=1", "train.lrr"),
        ("scaling.zero_stage=4", "scaling.zero_stage"),
    ],
)
def test_cli_bad_override_exits_2(
    override: str, field: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    code = _run_stream_module().main([override, f"tracking.uri=sqlite:///{db}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {field}:"), err
    _assert_no_mlflow_run(db)
    assert not (tmp_path / "mcl_runs").exists()


def test_cli_corrupted_annotation_exits_2(
    stream_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (stream_copy / "aerial" / "test.json").write_text('[{"question_id": "a", ')
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    db = work / "mlflow.db"
    code = _run_stream_module().main([f"stream.root={stream_copy}", f"tracking.uri=sqlite:///{db}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "aerial/test.json: malformed JSON" in err, err
    _assert_no_mlflow_run(db)
    assert list(work.iterdir()) == [], "nothing (MLflow db, run folder) is written before validation passes"


def test_cli_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = _run_stream_module().main(["--config", str(tmp_path / "nope.yaml")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_answer_type_is_caught_before_training(stream_copy: Path) -> None:
    path = stream_copy / "aerial" / "test.json"
    rows = json.loads(path.read_text())
    rows[2]["answer_type"] = "fuzzy"
    path.write_text(json.dumps(rows))
    with pytest.raises(
        DataError, match=r"sample 'aerial-test-00002': unknown answer_type 'fuzzy'; valid types: .*exact"
    ):
        _prepare(f"stream.root={stream_copy}")


def test_fewer_test_samples_than_workers(stream_copy: Path) -> None:
    with pytest.raises(DataError, match=r"task 'aerial' has 1 test samples for 2 workers"):
        _prepare(f"stream.root={stream_copy}", "eval.max_samples_per_task=1", "scaling.num_workers=2")


def test_text_only_model_folder_is_refused(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    folder = tmp_path / "text-only"
    LlamaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(folder)
    with pytest.raises(UnknownNameError, match=r"is a 'llama' model, not an image-text-to-text one"):
        _prepare(f"model.name={folder}")


def test_reused_run_name_is_refused_before_any_mlflow_run(stream_copy: Path, tmp_path: Path) -> None:
    from mcl.run import run_experiment

    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "config.yaml").write_text("x: 1\n")
    cfg = load_config(
        None,
        [
            f"stream.root={stream_copy}",
            "tracking.run_name=taken",
            f"tracking.output_dir={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        ],
    )
    with pytest.raises(ConfigError, match="tracking.run_name: .* already holds a run"):
        run_experiment(cfg, log=lambda _m: None)
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_check_validates_without_running(
    stream_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = _run_stream_module().main(["--check", f"stream.root={stream_copy}"])
    assert code == 0
    assert "check passed" in capsys.readouterr().out
    assert list(work.iterdir()) == [], "a check writes no MLflow store and no run folder"
    (stream_copy / "street" / "images" / "street-test-00001.png").unlink()
    assert _run_stream_module().main(["--check", f"stream.root={stream_copy}"]) == 2
    assert "street-test-00001" in capsys.readouterr().err


def test_task_order_reorders_the_stream_and_names_unknown_and_missing_tasks(generated_root: Path) -> None:
    order = ["street", "aerial", "indoor", "underwater"]
    prep = _prepare(
        f"stream.root={generated_root}", f"stream.task_order=[{','.join(order)}]", "stream.check_images=false"
    )
    assert prep.stream.task_names == order
    assert [t.name for t in prep.stream.tasks] == order and prep.stream.tasks[0].train[0].task == "street"
    with pytest.raises(
        ConfigError, match=r"^stream\.task_order: .*unknown tasks forest; .*missing underwater, indoor"
    ):
        _prepare(f"stream.root={generated_root}", "stream.task_order=[street,aerial,forest]")
    with pytest.raises(ConfigError, match=r"^stream\.task_order: names tasks more than once \(aerial\)"):
        load_config(None, ["stream.task_order=[aerial,aerial]"])
    with pytest.raises(ConfigError, match=r"^stream\.task_order: must be a list"):
        load_config(None, ["stream.task_order=aerial"])
