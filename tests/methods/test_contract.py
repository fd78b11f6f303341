"""The contract every registered method meets, on the real path: Ray Data -> 2 Ray Train workers ->
DeepSpeed ZeRO-2 -> MLflow, two tasks of the generated stream.

Per method: the run trains both tasks; then its progress is cut back to "task 1 done" (as when the driver
dies during task 2) and the same run is resumed: task 1 is not trained again, task 2 is trained again from
task 1's checkpoint. The second execution of task 2 must equal the first: the same accuracy matrix and CL
metrics (same seed, same metrics), the same predictions sample by sample (restarting from a checkpoint
changes nothing), and the same saved state, tensor by tensor (experts, routers, buffers, Fisher, branches
survive the round trip through the checkpoint). MLflow ends with one run per task, none left RUNNING.

Both evaluation backends answer alike: an evaluation actor (``eval.backend: ray_data``'s
:class:`~mcl.evaluation.actor_pool.PhaseAnswerer`, called in-process) that loads task 2's evaluating phase through
the method's ``load_for_evaluation`` gives the workers' predictions sample by sample, and one that builds the
untrained model gives the workers' baseline predictions' scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcl.methods_api import _METHODS, available_methods

pytestmark = pytest.mark.slow


def _registered_methods() -> list[str]:
    # Only the methods package's own methods (tests may register helpers of their own).
    return [m for m in available_methods() if _METHODS[m].__module__.startswith("methods.")]


METHODS = _registered_methods()


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    from mcl.streams import build_stream

    root = tmp_path_factory.mktemp("data") / "generated"
    build_stream("generated", root, {"train_per_task": 32, "test_per_task": 8})
    return root


def _config(tmp_path: Path, root: Path, method: str, run_name: str, *extra: str):
    from mcl.config import load_config

    return load_config(
        "jobs/configs/default.yaml",
        [
            f"stream.root={root}",
            "stream.options.train_per_task=32",
            "stream.options.test_per_task=8",
            "stream.options.tasks=[aerial,underwater]",
            f"method.name={method}",
            "train.epochs=1",
            "train.batch_size=8",
            "eval.max_new_tokens=2",
            "scaling.num_workers=2",
            "scaling.deepspeed=true",
            "scaling.zero_stage=2",
            "scaling.ray_num_cpus=4",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.output_dir={tmp_path}/runs",
            f"tracking.run_name={run_name}",
            *extra,
        ],
    )


def _state_files(state_dir: str) -> dict[str, object]:
    """Every file of a state folder: safetensors as tensors, JSON as data, anything else as bytes."""
    from safetensors.torch import load_file

    out: dict[str, object] = {}
    for path in sorted(Path(state_dir).rglob("*")):
        if not path.is_file():
            continue
        key = str(path.relative_to(state_dir))
        if path.suffix == ".safetensors":
            out[key] = load_file(str(path))
        elif path.suffix == ".json":
            out[key] = json.loads(path.read_text())
        else:
            out[key] = path.read_bytes()
    return out


def _assert_same_state(a: dict[str, object], b: dict[str, object]) -> None:
    import torch

    assert sorted(a) == sorted(b)
    for key in a:
        if isinstance(a[key], dict) and a[key] and all(isinstance(v, torch.Tensor) for v in a[key].values()):
            assert sorted(a[key]) == sorted(b[key]), key
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), f"{key}: {name} differs"
        elif key.endswith("adapter_config.json"):
            # peft writes absolute paths of the base model (same here) and its version; compare all of it.
            assert a[key] == b[key], key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("method", METHODS)
def test_method_contract(method, ray_session, small_root, tmp_path, monkeypatch):
    import shutil

    from mlflow import MlflowClient

    from mcl.run import RunDir, run_experiment
    from mcl.run.executors.ray_train import RayTrainExecutor

    quiet = lambda _m: None  # noqa: E731
    cfg = _config(tmp_path, small_root, method, "contract")
    first = run_experiment(cfg, log=quiet)
    assert len(first.matrix) == 2 and all(len(row) == 2 for row in first.matrix)
    assert all(0.0 <= v <= 100.0 for row in first.matrix for v in row)
    _assert_actor_answers_like_the_workers(cfg, first)
    kept_state = tmp_path / "task2-state"
    shutil.copytree(first.state_dirs[1], kept_state)

    # The driver dies while task 2 is being trained: its progress ends with task 1.
    run_dir = RunDir(first.output_dir)
    progress = run_dir.read_progress()
    progress.tasks_done = [0]
    progress.phases = {k: v for k, v in progress.phases.items() if k.startswith("0:")}
    run_dir.write_progress(progress)
    client = MlflowClient(first.tracking_uri)
    client.update_run(progress.task_runs["1"], status="RUNNING")  # as a killed driver leaves it
    client.update_run(first.run_id, status="RUNNING")

    # The same command with resume: task 1 is not trained again, task 2 restarts from task 1's checkpoint.
    trained: list[int] = []

    class CountingExecutor(RayTrainExecutor):
        def run_phase(self, t, *args):
            trained.append(t)
            return super().run_phase(t, *args)

    again = run_experiment(cfg, log=quiet, resume=True, executor=CountingExecutor)
    assert trained and set(trained) == {1}, "task 1 was trained again after the restart"

    # Same seed, same starting checkpoint: the same metrics, predictions and state, bit for bit.
    assert again.matrix == first.matrix
    assert again.metrics == first.metrics
    for ra, rb in zip(first.task_results, again.task_results, strict=True):
        assert [(p["id"], p["prediction"]) for p in rb.predictions] == [
            (p["id"], p["prediction"]) for p in ra.predictions
        ]
        assert rb.method_metrics == ra.method_metrics
    _assert_same_state(_state_files(str(kept_state)), _state_files(again.state_dirs[1]))

    parent = client.get_run(again.run_id)
    assert again.run_id == first.run_id and parent.info.status == "FINISHED"
    assert parent.data.metrics["mfn"] == pytest.approx(again.metrics["mfn"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{again.run_id}'"
    )
    assert sorted(r.data.tags["mcl.task"] for r in children) == ["aerial", "underwater"]
    assert all(r.info.status == "FINISHED" for r in children)
    for child in children:
        assert any(k.startswith("mem_") for k in child.data.metrics), "no memory report logged"


def _actor_records(cfg, prep, spec) -> list[dict]:
    from mcl.data import Preprocessor, local_batches
    from mcl.evaluation.actor_pool import PhaseAnswerer
    from mcl.run.plan import eval_rows

    answerer = PhaseAnswerer(spec)
    pre = Preprocessor(prep.model_path, train=False)
    return [r for b in local_batches(eval_rows(prep), pre, cfg.eval.batch_size) for r in answerer.answer(b)]


def _assert_actor_answers_like_the_workers(cfg, summary) -> None:
    """The in-process actor of task 2's evaluating phase answers every sample as the workers did; the
    baseline actor scores the untrained model as the workers did."""
    from mcl.evaluation.actor_pool import AnswererSpec
    from mcl.evaluation.generation import score_records
    from mcl.run import RunDir
    from mcl.run.prepare import prepare_run

    prep = prepare_run(cfg, log=lambda _m: None)
    result = summary.task_results[1]
    progress = RunDir(summary.output_dir).read_progress()
    folder = Path(progress.phases[f"1:{result.phase}"])
    names = tuple(summary.task_names)
    spec = AnswererSpec(cfg.to_dict(), prep.model_path, 1, names, result.phase, str(folder / "state"))
    records = _actor_records(cfg, prep, spec)
    worker = sorted((dict(r, score=None) for r in result.predictions), key=lambda r: r["id"])
    assert sorted((dict(r, score=None) for r in records), key=lambda r: r["id"]) == worker

    first = summary.task_results[0]
    phases = [p.name for p in prep.method.phases(0)]
    before = phases[: phases.index(first.phase)]  # the evaluating phase starts from the one before it
    start = str(Path(progress.phases[f"0:{before[-1]}"]) / "state") if before else None
    base = AnswererSpec(cfg.to_dict(), prep.model_path, 0, names, first.phase, start, stage="baseline")
    assert score_records(_actor_records(cfg, prep, base), list(names)) == first.baseline_accuracy


ZERO3_LOCAL = (
    "scaling.num_workers=1",
    "scaling.zero_stage=3",
    "scaling.zero3_param_persistence_threshold=0",
)


@pytest.mark.parametrize("method", METHODS)
def test_method_contract_under_zero3(method, small_root, tmp_path):
    """The method under DeepSpeed ZeRO-3 with every parameter partitioned (threshold 0), in one process through
    the local executor (the same phase recipe the Ray Train workers run): both tasks train; task 2 continued
    from task 1's saved state equals the first pass (predictions, method metrics, saved state tensor by tensor);
    an evaluation actor loading task 2's state answers every sample as the ZeRO-3 model did."""
    from mcl.run import prepare_run, run_stream_locally

    quiet = lambda _m: None  # noqa: E731
    engines_before = _engines_alive()
    cfg = _config(tmp_path, small_root, method, "zero3", *ZERO3_LOCAL)
    prep = prepare_run(cfg, log=quiet)
    first = run_stream_locally(prep, tmp_path / "first", tasks=2, log=quiet)
    assert len(first.matrix) == 2 and all(0.0 <= v <= 100.0 for row in first.matrix for v in row)
    again = run_stream_locally(
        prep, tmp_path / "again", tasks=2, log=quiet, start_state=first.state_dirs[0], start_task=1
    )
    (ra,), rb = again.results, first.results[1]
    assert [(p["id"], p["prediction"]) for p in ra.predictions] == [
        (p["id"], p["prediction"]) for p in rb.predictions
    ]
    assert ra.method_metrics == rb.method_metrics and ra.accuracy == rb.accuracy
    _assert_same_state(_state_files(str(first.state_dirs[1])), _state_files(str(again.state_dirs[0])))

    from mcl.evaluation.actor_pool import AnswererSpec

    folder = first.phase_dirs[f"1:{rb.phase}"]
    spec = AnswererSpec(
        cfg.to_dict(),
        prep.model_path,
        1,
        tuple(t.name for t in prep.stream.tasks),
        rb.phase,
        str(folder / "state"),
    )
    records = _actor_records(cfg, prep, spec)
    worker = sorted((dict(r, score=None) for r in rb.predictions), key=lambda r: r["id"])
    assert sorted((dict(r, score=None) for r in records), key=lambda r: r["id"]) == worker
    assert not _engines_alive() - engines_before, "a phase's DeepSpeed engine outlived its phase"


def _engines_alive() -> set[int]:
    """The ids of the DeepSpeed engines alive in this process (ZeRO-3 kept every phase's engine and model alive
    through module-level references, and the suite's later forks failed for memory). Other tests may leave
    engines of their own, so a test compares with what was alive before it."""
    import gc

    from deepspeed.runtime.engine import DeepSpeedEngine

    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, DeepSpeedEngine)}
