"""The ``ray_data`` evaluation backend on the real path: Ray Train trains, a Ray Data actor pool evaluates.

One Ray instance for the module, started here with the runtime env mcl gives its runs plus the test method
of ``eval_pool_methods`` (shipped to every worker and imported through ``$MCL_METHOD_MODULES``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
HELPERS = "eval_pool_methods"
# Both tests' runs: 2 tasks of the generated stream at 16 train / 8 test samples, 1 epoch, 2-token answers.
SMALL_RUN = (
    "stream.options.train_per_task=16",
    "stream.options.test_per_task=8",
    "stream.options.tasks=[aerial,underwater]",
    "train.epochs=1",
    "train.batch_size=8",
    "eval.max_new_tokens=2",
    "scaling.ray_num_cpus=4",
)


@pytest.fixture(scope="module")
def ray_with_test_methods():
    import os

    import ray

    from mcl.methods_api import METHOD_MODULES_ENV
    from mcl.run.cluster import runtime_env

    patch = pytest.MonkeyPatch()
    patch.syspath_prepend(str(HERE))
    patch.setenv(METHOD_MODULES_ENV, HELPERS)
    env = runtime_env(use_gpu=False, local=True)
    env["py_modules"].append(str(HERE / HELPERS))
    env["env_vars"][METHOD_MODULES_ENV] = HELPERS
    ray.init(num_cpus=4, runtime_env=env)
    assert os.environ[METHOD_MODULES_ENV] == HELPERS
    yield
    ray.shutdown()
    patch.undo()


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    from mcl.streams import build_stream

    root = tmp_path_factory.mktemp("data") / "generated"
    build_stream("generated", root, {"train_per_task": 16, "test_per_task": 8})
    return root


def _config(tmp_path: Path, root: Path, *overrides: str):
    from mcl.config import load_config

    return load_config(
        "jobs/configs/default.yaml",
        [
            f"stream.root={root}",
            *SMALL_RUN,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.output_dir={tmp_path}/runs",
            *overrides,
        ],
    )


def _benchmark_job():
    import importlib.util

    path = HERE.parents[1] / "jobs" / "benchmark_eval.py"
    spec = importlib.util.spec_from_file_location("mcl_benchmark_eval_job", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_actor_pool_gives_the_workers_matrix_for_mr_lora(ray_with_test_methods, small_root, tmp_path):
    """MR-LoRA (experts, router, routed answers) through 2 tasks, run by the evaluation benchmark's own
    comparison (``jobs/benchmark_eval.py``, each backend in turn, 2 Train workers under ZeRO-3 with every
    parameter partitioned, where the workers answer in lockstep with ``synced_gpus``; the contract suite
    compares the actor with the workers under ZeRO-2): the actor pool's matrix, baseline row, predictions and
    router metrics equal the in-worker evaluation's, and the benchmark's figures come out."""
    lines: list[str] = []
    figures, runs = _benchmark_job().run_backends(
        [
            f"stream.root={small_root}",
            *SMALL_RUN,
            "method.name=mr_lora",
            "method.params.router_samples_per_task=8",
            "method.params.router_epochs=2",
            "eval.num_actors=1",
            "eval.resources_per_actor={CPU: 1}",
            "scaling.zero_stage=3",
            "scaling.zero3_param_persistence_threshold=0",
        ],
        config="jobs/configs/default.yaml",
        root=tmp_path,
        log=lines.append,
    )
    workers, pool = runs["workers"], runs["ray_data"]
    assert pool.matrix == workers.matrix and figures["matrix_equal"] is True
    assert pool.baseline == workers.baseline and pool.baseline is not None
    assert pool.metrics == workers.metrics
    for a, b in zip(workers.task_results, pool.task_results, strict=True):
        assert sorted((r["id"], r["prediction"], r["expert"]) for r in b.predictions) == sorted(
            (r["id"], r["prediction"], r["expert"]) for r in a.predictions
        )
        assert b.method_metrics == a.method_metrics and "router_acc" in b.method_metrics
        assert b.timing["eval_samples"] == len(b.predictions) == 16
    for backend in ("workers", "ray_data"):
        assert figures[backend]["samples"] == 32 and figures[backend]["samples_per_s"] > 0
    assert figures["ratio_pool_vs_workers"] > 0
    assert any("ray_data / workers samples/s" in line for line in lines), lines


def test_a_failing_actor_fails_the_run_clearly_and_logs_no_half_task(
    ray_with_test_methods, small_root, tmp_path
):
    """An actor whose method raises in ``generate``: the run fails with an error naming the phase and the
    actor's error; the task's MLflow run has no metric logged, and the phase's result holds no records."""
    from mlflow import MlflowClient

    from mcl.evaluation.actor_pool import EvaluationError
    from mcl.run import RunDir, run_experiment
    from mcl.worker.job import TaskResult

    cfg = _config(
        tmp_path,
        small_root,
        "method.name=failing_generate",
        "stream.options.tasks=[aerial]",
        "tracking.run_name=failing",
        "eval.backend=ray_data",
    )
    with pytest.raises(
        EvaluationError,
        match=r"phase 0:train .* failed: RuntimeError: failing_generate: this method cannot answer \(the",
    ):
        run_experiment(cfg, log=lambda _m: None)
    run_dir = RunDir(Path(cfg.tracking.output_dir) / "failing")
    progress = run_dir.read_progress()
    assert progress.tasks_done == [] and progress.phases == {}
    result = TaskResult.load(run_dir.phase("task00-aerial").path)
    assert result.predictions == [] and result.accuracy == {}
    client = MlflowClient(cfg.tracking.uri)
    task_run = client.get_run(progress.task_runs["0"])
    assert task_run.info.status == "FAILED"
    assert task_run.data.metrics == {}
