"""The ``ray_data`` evaluation backend: a Ray Data ``map_batches`` over a pool of evaluation actors.

Each actor (:class:`PhaseAnswerer`) loads the base model plus one phase's saved state through the method's own
hook (:meth:`mcl.methods_api.Method.load_for_evaluation`) and answers preprocessed batches with the workers'
generation code (:meth:`mcl.evaluation.generation.GenerationEvaluator.answer`), so both backends give the same
predictions. :func:`evaluate_phase` runs the pool for a published phase (and, after the first task, the
untrained model's baseline row) and writes the records and scores into the phase's result: whole, or not at all.
Actors have their own resources (``eval.num_actors`` x ``eval.resources_per_actor``), apart from the Train
workers, so where the cluster has room they answer while the next phase trains.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mcl.errors import MclError

if TYPE_CHECKING:
    from mcl.run.prepare import PreparedRun
    from mcl.run.rundir import PhaseDir
    from mcl.worker.job import TaskJob

RECORD_COLUMN = "record"


class EvaluationError(MclError, RuntimeError):
    """The actor pool failed to evaluate a phase (nothing of that phase's evaluation was kept)."""


@dataclass(frozen=True)
class AnswererSpec:
    """What an evaluation actor loads; plain data (it pickles to actors).

    Attributes:
        config: The resolved experiment config as a dict.
        model_path: Resolved model folder or hub id.
        task_index: The task whose phase is evaluated; task_names: every task of the stream.
        phase: The evaluating phase's name.
        state_dir: ``trained``: the phase's saved state. ``baseline``: the state the phase started from (None
            at the start of the stream); the actor builds the model as that phase's workers did before
            training (:meth:`Method.setup_model`) and answers as the untrained model.
        stage: ``trained`` or ``baseline`` (see :class:`mcl.methods_api.TaskContext`).
    """

    config: dict[str, Any]
    model_path: str
    task_index: int
    task_names: tuple[str, ...]
    phase: str
    state_dir: str | None
    stage: str = "trained"


class PhaseAnswerer:
    """A Ray Data callable class: the model of one phase, answering preprocessed evaluation batches.

    Returns one JSON ``record`` per sample (``id``, ``task``, ``prediction``, ``answer``, ``answer_type`` and
    the method's extras), exactly what the workers' evaluator records. Runs in-process too (no Ray needed).
    """

    def __init__(self, spec: AnswererSpec, device: Any = None) -> None:
        import torch

        from mcl.config import config_from_dict
        from mcl.evaluation.generation import AnswerLimits, GenerationEvaluator
        from mcl.methods_api import TaskContext, build_method
        from mcl.models import load_model_and_processor
        from mcl.worker.engine import seed_everything

        cfg = config_from_dict(spec.config)
        self.method = build_method(cfg.method.name, cfg.method.params)
        seed_everything(cfg.train.seed + spec.task_index)  # as the phase's workers: same fresh adapters
        base, processor = load_model_and_processor(
            spec.model_path,
            trust_remote_code=cfg.model.trust_remote_code,
            dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation,
        )
        baseline = spec.stage == "baseline"
        self.ctx = TaskContext(
            task_index=spec.task_index,
            task_names=tuple(spec.task_names),
            lora=cfg.model.lora,
            previous_state_dir=Path(spec.state_dir) if baseline and spec.state_dir else None,
            seed=cfg.train.seed,
            processor=processor,
            phase=spec.phase,
            stage="baseline" if baseline else "trained",
        )
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if baseline:
            model = self.method.setup_model(base, self.ctx)
            self.method.before_task(model, self.ctx)
        else:
            assert spec.state_dir is not None
            model = self.method.load_for_evaluation(base, Path(spec.state_dir), self.ctx)
        model = model.to(self.device).eval()
        self.evaluator = GenerationEvaluator(
            model,
            self.method,
            processor,
            AnswerLimits(
                cfg.eval.max_new_tokens, cfg.eval.max_new_tokens_by_type, cfg.eval.stop_strings_by_type
            ),
            self.device,
            getattr(torch, cfg.model.dtype),
        )

    def answer(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Prediction records of one preprocessed batch."""
        import torch

        with torch.no_grad():
            return self.evaluator.answer(batch, self.ctx)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = self.answer(batch)
        return {RECORD_COLUMN: np.array([json.dumps(r, default=_plain) for r in records], dtype=object)}


def _plain(value: Any) -> Any:
    """numpy/torch scalars in a method's extras as plain JSON values."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {value!r}")


def root_error(exc: BaseException) -> str:
    """The actor's own error line (``RuntimeError: ...``) out of the Ray errors wrapping it; else the first line."""
    text = f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.splitlines()]
    own = [line for line in lines if _ERROR_LINE.match(line) and not line.startswith("ray.")]
    return own[-1] if own else lines[0]


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")


def actor_remote_args(resources: dict[str, float]) -> dict[str, Any]:
    """``eval.resources_per_actor`` as Ray's remote arguments (``CPU``/``GPU`` and custom resources)."""
    rest = {k: float(v) for k, v in resources.items() if k not in ("CPU", "GPU")}
    args: dict[str, Any] = {
        "num_cpus": float(resources.get("CPU", 0)),
        "num_gpus": float(resources.get("GPU", 0)),
    }
    if rest:
        args["resources"] = rest
    return args


def pool_records(
    prep: PreparedRun, spec: AnswererSpec, rows: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every record of ``rows`` answered by the actor pool, in the rows' order (in the order they came from,
    when ``rows`` is an :class:`~mcl.data.AnswerOrder`: see :func:`mcl.data.in_original_order`)."""
    import ray.data

    from mcl.data import Preprocessor, in_original_order, ray_dataset
    from mcl.run.cluster import data_tasks_per_rank

    cfg = prep.config
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    pre = Preprocessor(prep.model_path, train=False, trust_remote_code=cfg.model.trust_remote_code)
    answered = ray_dataset(rows, pre, cfg.eval.batch_size, data_tasks_per_rank(cfg)).map_batches(
        PhaseAnswerer,
        fn_constructor_kwargs={"spec": spec},
        batch_size=cfg.eval.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.eval.num_actors),
        **actor_remote_args(cfg.eval.resources_per_actor),
    )
    return in_original_order([json.loads(row[RECORD_COLUMN]) for row in answered.iter_rows()])


def phase_specs(prep: PreparedRun, job: TaskJob, state_dir: str, baseline: bool) -> list[AnswererSpec]:
    """The trained phase's spec, and (``baseline``) the untrained model's: the state the phase started from."""
    trained = AnswererSpec(
        job.config,
        job.model_path,
        job.task_index,
        tuple(job.task_names),
        job.phase,
        state_dir,
        "trained",
    )
    return [trained] + (
        [dataclasses.replace(trained, state_dir=job.previous_state_dir, stage="baseline")] if baseline else []
    )


def evaluate_phase(
    prep: PreparedRun,
    job: TaskJob,
    folder: PhaseDir,
    rows: Sequence[dict[str, Any]],
    baseline_rows: Sequence[dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Evaluate the published phase in ``folder`` on the actor pool (and the untrained model on
    ``baseline_rows``, when given) and write records, accuracy and method metrics into its result, atomically.
    Raises :class:`EvaluationError` naming the phase if an actor fails; the result is then left as the workers
    wrote it (no records)."""
    from mcl.worker.job import TaskResult

    specs = phase_specs(prep, job, str(folder.state), baseline_rows is not None)
    clock = [time.perf_counter()]
    try:
        records = pool_records(prep, specs[0], rows)
        clock.append(time.perf_counter())
        base_records = pool_records(prep, specs[1], baseline_rows) if baseline_rows is not None else None
    except Exception as exc:
        raise EvaluationError(
            f"evaluating phase {job.key} ({folder.path.name}) on the Ray Data actor pool failed: "
            f"{root_error(exc)} (the full trace is chained below)"
        ) from exc
    result = TaskResult.load(folder.path)
    result = with_scores(prep, job, result, records, base_records)
    # eval_s: the trained phase's evaluation alone (actor start, model load, answers), as the workers time theirs.
    result.timing.update({"eval_s": clock[1] - clock[0], "eval_samples": float(len(records))})
    result.save(folder.path)
    log(
        f"[task {job.task_index + 1} {job.phase}] evaluated by {prep.config.eval.num_actors} actor(s) "
        f"in {result.timing['eval_s']:.1f}s"
    )


def with_scores(
    prep: PreparedRun,
    job: TaskJob,
    result: Any,
    records: list[dict[str, Any]],
    base_records: list[dict[str, Any]] | None,
) -> Any:
    """``result`` with the pool's records scored by the workers' scoring code (:func:`score_phase`): the
    tasks the phase evaluates (``eval.tasks``) and, apart, the probes (``stream.probes``)."""
    from mcl.evaluation.generation import phase_scores, score_phase
    from mcl.methods_api import TaskContext

    ctx = TaskContext(job.task_index, tuple(job.task_names), prep.config.model.lora, phase=job.phase)
    tasks = list(job.task_names) if job.eval_tasks is None else list(job.eval_tasks)
    scores, method_metrics = score_phase(records, tasks, job.probe_names, prep.method, ctx)
    changes: dict[str, Any] = {
        "accuracy": scores.accuracy,
        "probe_accuracy": scores.probes,
        "method_metrics": method_metrics,
        "predictions": records,
    }
    if base_records is not None:  # the untrained model: every task (FWT, the zero-shot row) and the probes
        base = phase_scores(base_records, list(job.task_names), job.probe_names)
        changes.update(baseline_accuracy=base.accuracy, baseline_probe_accuracy=base.probes)
    return dataclasses.replace(result, **changes)


__all__ = [
    "AnswererSpec",
    "EvaluationError",
    "PhaseAnswerer",
    "actor_remote_args",
    "evaluate_phase",
    "phase_specs",
    "pool_records",
]
