"""One phase of a task as a recipe: set up, (evaluate the untrained model,) train, evaluate, save, clean up.

:func:`train_and_evaluate_task` runs the recipe for one phase. It runs in a plain process (the GPU benchmarks
call it through :func:`mcl.worker.local.run_task_locally`) and inside Ray Train workers
(:mod:`mcl.worker.ray_loop`), where ``torch.distributed`` is already initialised; the data arrives as
iterables of preprocessed numpy batches either way.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mcl.adapters import projector_module_names
from mcl.config import config_from_dict
from mcl.data import collate
from mcl.evaluation.generation import AnswerLimits, GenerationEvaluator, phase_scores, score_phase
from mcl.logs import quiet_known_warnings
from mcl.methods_api import TaskContext, build_method
from mcl.run.rundir import PhaseDir
from mcl.worker.checkpoint import should_checkpoint, skip_batches
from mcl.worker.engine import (
    StepEngine,
    all_reduce_mean,
    all_reduce_sum,
    dist_rank_world,
    enable_gradient_checkpointing,
    seed_everything,
    to_device,
    zero3_loading_context,
)
from mcl.worker.job import TaskJob, TaskResult
from mcl.worker.losses import StepShare, per_sample_loss, step_counts

Batches = Iterable[dict[str, np.ndarray]]


class StepCheckpoints(Protocol):
    """Mid-phase step checkpoints (see :mod:`mcl.worker.checkpoint`): ``every`` optimiser steps (0 = never),
    :meth:`save` writes this rank's part with ``client_state`` (the loss log, the baseline, the method's
    running sums); :meth:`restore` loads the last one of phase ``key`` into ``engine`` and returns
    ``(step, client_state)``, or None when there is none to resume."""

    every: int

    def save(self, engine: StepEngine, key: str, step: int, client_state: dict[str, Any]) -> None: ...

    def restore(self, engine: StepEngine, key: str) -> tuple[int, dict[str, Any]] | None: ...


class PhaseRecipe:
    """The steps of one phase on one rank; :func:`train_and_evaluate_task` runs them in order."""

    def __init__(self, job: TaskJob, device: Any = None, log: Callable[[str], None] = print) -> None:
        self.job = job
        self.cfg = config_from_dict(job.config)
        self.rank, self.world = dist_rank_world()
        self.device = device
        self.say = log if self.rank == 0 else (lambda _msg: None)
        name = job.task_names[job.task_index]
        phase_tag = "" if job.phase == "train" else f" {job.phase}"
        self.tag = f"[task {job.task_index + 1}/{len(job.task_names)} {name}{phase_tag}]"
        self.micro = self.cfg.micro_batch
        self.accumulation = self.cfg.accumulation_steps
        self.train_log: list[dict[str, float]] = []
        self.timing: dict[str, float] = {}
        self.baseline: dict[str, float] | None = None
        self.baseline_probes: dict[str, float] | None = None
        self.start_step = 0  # > 0 when the phase resumes from a step checkpoint

    # -- setup
    def setup(self) -> None:
        """Build the method, load the base model, let the method wrap it, build the step engine."""
        import torch

        from mcl.models import load_model_and_processor

        t0 = time.perf_counter()
        cfg, job = self.cfg, self.job
        self.device = self.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, cfg.model.dtype)
        self.method = build_method(cfg.method.name, cfg.method.params)
        seed_everything(cfg.train.seed + job.task_index)
        # Under ZeRO-3, transformers loads the weights straight into partitions (deepspeed.zero.Init) while
        # this object is alive, so no rank ever holds the whole model.
        self._zero3_loading = zero3_loading_context(cfg, self.world)
        base, self.processor = load_model_and_processor(
            job.model_path,
            trust_remote_code=cfg.model.trust_remote_code,
            dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation,
        )
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(base)
        self.ctx = self._context()
        model = self.method.setup_model(base, self.ctx)
        self.method.before_task(model, self.ctx)
        self.engine = StepEngine(
            model,
            cfg,
            self.world,
            self.device,
            optimize=job.optimize,
            total_steps=job.steps,
            lr_rules=self._lr_rules(model),
        )
        self.device = next(self.engine.module.parameters()).device
        self.evaluator = GenerationEvaluator(
            self.engine.module,
            self.method,
            self.processor,
            AnswerLimits(
                cfg.eval.max_new_tokens, cfg.eval.max_new_tokens_by_type, cfg.eval.stop_strings_by_type
            ),
            self.device,
            self.dtype,
            synced_gpus=self.engine.zero3 and self.world > 1,
        )
        self.timing["setup_s"] = time.perf_counter() - t0

    def _lr_rules(self, model: Any) -> list[tuple[str, float]]:
        """The method's own learning-rate groups, then the projector's (``train.projector_lr``)."""
        rules = list(self.method.learning_rates(self.ctx).items())
        if self.cfg.train.projector_lr > 0:
            names = "|".join(re.escape(n) for n in projector_module_names(model))
            rules.append((rf"(^|\.)({names})\.", self.cfg.train.projector_lr))
        return rules

    def _context(self) -> TaskContext:
        job = self.job
        return TaskContext(
            task_index=job.task_index,
            task_names=tuple(job.task_names),
            lora=self.cfg.model.lora,
            previous_state_dir=Path(job.previous_state_dir) if job.previous_state_dir else None,
            rank=self.rank,
            world_size=self.world,
            seed=self.cfg.train.seed,
            processor=self.processor,
            phase=job.phase,
        )

    # -- evaluate
    def evaluate_baseline(self, batches: Batches) -> None:
        """Accuracy of the untrained model on every task and probe (rank 0; None elsewhere)."""
        self.say(f"{self.tag} evaluating the untrained model on all tasks (baseline for forward transfer)")
        records = self.evaluator.predict(batches, dataclasses.replace(self.ctx, stage="baseline"))
        if self.rank == 0:
            scores = phase_scores(records, self.job.task_names, self.job.probe_names)
            self.baseline, self.baseline_probes = scores.accuracy, scores.probes

    # -- step checkpoints
    def resume_from(self, checkpoints: StepCheckpoints) -> bool:
        """Continue from the last step checkpoint of this phase, if there is one (after :meth:`setup`)."""
        found = checkpoints.restore(self.engine, self.job.key)
        if found is None:
            return False
        self.start_step, meta = found
        self.train_log, self.baseline = meta["train_log"], meta["baseline"]
        self.baseline_probes = meta.get("baseline_probes")
        if meta.get("method") is not None:
            self.method.load_step_state(meta["method"], self.ctx)
        self.say(f"{self.tag} resuming at step {self.start_step}/{self.job.steps} from a step checkpoint")
        return True

    def _checkpoint(self, checkpoints: StepCheckpoints | None, step: int) -> None:
        if checkpoints is None or not should_checkpoint(step, checkpoints.every, self.job.steps):
            return
        meta = {
            "train_log": self.train_log,
            "baseline": self.baseline,
            "baseline_probes": self.baseline_probes,
            "method": self.method.step_state(self.ctx),
        }
        checkpoints.save(self.engine, self.job.key, step, meta)

    def evaluate(self, batches: Batches) -> list[dict[str, Any]]:
        """Prediction records of every task after training (rank 0; ``[]`` elsewhere)."""
        t0 = time.perf_counter()
        records = self.evaluator.predict(batches, self.ctx) if self.job.evaluate else []
        self.timing["eval_s"] = time.perf_counter() - t0
        return records

    # -- train
    def train(self, batches: Batches, checkpoints: StepCheckpoints | None = None) -> None:
        """``job.steps`` optimiser steps, each over ``accumulation`` consecutive micro-batches of this rank's
        shard. After a resume from a step checkpoint, the micro-batches of the steps already taken are
        skipped (rows are sharded by position, so the rest are exactly those of the uninterrupted phase)."""
        self.engine.module.train()
        wants_gradients = self.method.wants_gradients(self.ctx)
        clock = _StepClock()
        step = self.start_step
        micro_batches = skip_batches(batches, self.start_step * self.accumulation)
        for np_batches in clock.timed(_in_steps(micro_batches, self.accumulation)):
            loss, extra = self._train_step(np_batches, wants_gradients)
            step += 1
            clock.step_done(step - self.start_step, self.cfg.train.batch_size)
            self._log_step(step, loss, extra, clock)
            self._checkpoint(checkpoints, step)
        if step != self.job.steps:
            raise RuntimeError(
                f"{self.tag} rank {self.rank} got {step} training steps of {self.accumulation} micro-batches, "
                f"expected {self.job.steps}"
            )
        self.timing.update(clock.timing((step - self.start_step) * self.cfg.train.batch_size))
        self.method.after_task(self.engine.module, self.ctx)

    def _train_step(self, np_batches: list[dict[str, np.ndarray]], wants_gradients: bool) -> tuple[Any, Any]:
        """One optimiser step: the loss terms of each micro-batch written as its share of the step's means
        (:class:`StepShare`), backpropagated one micro-batch at a time. Returns the step's mean task loss and
        mean extra loss (None without one) on this rank."""
        engine, method = self.engine, self.method
        pad = self.processor.tokenizer.pad_token_id
        batches = [to_device(collate(b, pad, left_pad=False), self.device, self.dtype) for b in np_batches]
        ctx = dataclasses.replace(self.ctx, step=self._step_share(batches))
        losses, extras = [], []
        for i, batch in enumerate(batches):
            with engine.micro_batch(last=i == len(batches) - 1):
                outputs = engine.forward(batch)
                loss = per_sample_loss(outputs.logits, batch["labels"], ctx.step)
                extra = method.extra_loss(engine.module, batch, outputs, ctx)
                engine.backward(loss + extra if extra is not None else loss)
            if wants_gradients and i == len(batches) - 1:
                method.on_gradients(engine.module, batch, engine.full_grad, ctx)
            engine.step()
            losses.append(loss.detach())
            extras += [extra.detach()] if extra is not None else []
        mean_extra = sum(extras) / len(batches) if extras else None
        return sum(losses) / len(batches), mean_extra

    def _step_share(self, batches: list[dict[str, Any]]) -> StepShare:
        """The step's totals (the engine's counts and the method's, summed over its micro-batches and every
        rank): one small all-reduce per step."""
        counts: dict[str, float] = {}
        for batch in batches:
            for source in (step_counts(batch), self.method.step_counts(batch, self.ctx)):
                for name, value in source.items():
                    counts[name] = counts.get(name, 0.0) + float(value)
        names = sorted(counts)  # the same order on every rank
        totals = all_reduce_sum([counts[n] for n in names], self.world, self.device)
        return StepShare(dict(zip(names, totals, strict=True)), parts=len(batches) * self.world)

    def _log_step(self, step: int, loss: Any, extra: Any, clock: _StepClock) -> None:
        steps_per_epoch = max(1, self.job.steps // self.cfg.train.epochs)
        loss_value = all_reduce_mean(float(loss.detach()), self.world, self.device)
        entry = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": loss_value}
        if self.method.has_extra_loss():  # reduced on every rank, also where this batch had none: no hang
            extra_value = float(extra.detach()) if extra is not None else 0.0
            entry["extra_loss"] = all_reduce_mean(extra_value, self.world, self.device)
        self.train_log.append(entry)
        if step % self.cfg.train.log_every == 0 or step == self.job.steps:
            done = step - self.start_step
            rate = clock.samples_per_s(done * self.cfg.train.batch_size)
            eta = (self.job.steps - step) * clock.elapsed() / done
            self.say(
                f"{self.tag} step {step}/{self.job.steps} epoch {entry['epoch'] + 1} loss {loss_value:.4f} "
                f"({rate:.1f} samples/s, ETA {eta:.0f}s)"
            )

    # -- save
    def save(self, out: PhaseDir) -> None:
        """Rank 0 writes the method's state (and the driver state) into ``out``; every rank takes part in
        gathering ZeRO-3 partitions."""
        method, module = self.method, self.engine.module
        out.path.mkdir(parents=True, exist_ok=True)
        with self.engine.gathered(method.state_parameters(module)):
            if self.rank == 0:
                method.save_state(module, out.state, self.ctx)
                if self.job.driver_state is not None:
                    out.write_driver_state(self.job.driver_state)
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def result(self, records: list[dict[str, Any]]) -> TaskResult:
        """The phase's result (rank 0), printed as it is built."""
        job = self.job
        tasks = job.task_names if job.eval_tasks is None else job.eval_tasks
        scores, method_metrics = (
            score_phase(records, tasks, job.probe_names, self.method, self.ctx)
            if job.evaluate
            else (None, {})
        )
        accuracy = scores.accuracy if scores is not None else {}
        if accuracy:
            self.say(f"{self.tag} accuracy " + ", ".join(f"{t} {a:.1f}" for t, a in accuracy.items()))
        if scores is not None and scores.probes:
            self.say(f"{self.tag} probes " + ", ".join(f"{p} {a:.1f}" for p, a in scores.probes.items()))
        if method_metrics:
            self.say(f"{self.tag} " + ", ".join(f"{k} {v:.2f}" for k, v in method_metrics.items()))
        timing = {**self.timing, "eval_samples": float(len(records))}
        return TaskResult(
            task_index=job.task_index,
            task_names=list(job.task_names),
            accuracy=accuracy,
            baseline_accuracy=self.baseline,
            train_log=self.train_log,
            predictions=records,
            timing={k: timing[k] for k in _TIMING_KEYS},
            memory=self.method.memory_report(self.engine.module),
            method_metrics=method_metrics,
            phase=job.phase,
            resumed_at_step=self.start_step,
            probe_accuracy=scores.probes if scores is not None else {},
            baseline_probe_accuracy=self.baseline_probes,
        )

    # -- cleanup
    def cleanup(self) -> None:
        """Let go of ZeRO-3's loading context (it stayed visible to transformers through loading and synced
        generation) and of the step engine (after :meth:`result`, which reads the model's memory report)."""
        self._zero3_loading = None
        if getattr(self, "engine", None) is not None:
            self.engine.close()


_TIMING_KEYS = (
    "setup_s",
    "train_s",
    "eval_s",
    "train_samples_per_s",
    "steady_samples_per_s",
    "steady_data_wait_s",
    "steady_train_s",
    "eval_samples",
)


def _in_steps(batches: Iterable[dict[str, np.ndarray]], size: int) -> Iterator[list[dict[str, np.ndarray]]]:
    """Consecutive micro-batches in lists of ``size``, one list per optimiser step (a short last list is
    dropped: the shard holds whole steps, which :meth:`PhaseRecipe.train` checks)."""
    iterator = iter(batches)
    while chunk := list(itertools.islice(iterator, size)):
        if len(chunk) == size:
            yield chunk


class _StepClock:
    """Training throughput: overall, and in steady state (after the first 2 steps, which pay for warm-up),
    with the time spent waiting on the input pipeline (tells an input-bound run)."""

    def __init__(self) -> None:
        self.t_start = time.perf_counter()
        self.t_steady: float | None = None
        self.steady_samples = 0
        self.data_wait_s = 0.0
        self._step = 0

    def timed(self, batches: Iterable[Any]) -> Iterable[Any]:
        iterator = iter(batches)
        while True:
            t_wait = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                return
            if self._step >= 2:
                self.data_wait_s += time.perf_counter() - t_wait
            yield batch

    def step_done(self, step: int, samples: int) -> None:
        self._step = step
        if step == 2:
            self.t_steady = time.perf_counter()
        elif step > 2:
            self.steady_samples += samples

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def samples_per_s(self, samples: int) -> float:
        return samples / self.elapsed()

    def timing(self, samples: int) -> dict[str, float]:
        train_s = self.elapsed()
        steady_s = time.perf_counter() - self.t_steady if self.t_steady is not None else float("nan")
        steady = self.steady_samples / steady_s if self.steady_samples and steady_s > 0 else float("nan")
        return {
            "train_s": train_s,
            "train_samples_per_s": samples / train_s if train_s > 0 else float("nan"),
            "steady_samples_per_s": steady,
            "steady_data_wait_s": self.data_wait_s,
            "steady_train_s": steady_s,
        }


def train_and_evaluate_task(
    job: TaskJob,
    train_batches: Batches,
    eval_batches: Callable[[], Batches],
    out_dir: str | Path,
    device: Any = None,
    log: Callable[[str], None] = print,
    checkpoints: StepCheckpoints | None = None,
    baseline_batches: Callable[[], Batches] | None = None,
) -> TaskResult | None:
    """Train the method through one phase, evaluate all tasks, save state. Returns the result on rank 0.

    Args:
        job: What to train (see :class:`TaskJob`).
        train_batches: This rank's preprocessed training batches, ``job.steps`` of them, in order.
        eval_batches: A callable returning this rank's preprocessed evaluation batches (the test samples of
            the tasks and probes the phase evaluates); called once.
        baseline_batches: The same for the untrained model's evaluation (``job.evaluate_before``; default
            ``eval_batches``).
        out_dir: Where rank 0 writes the phase folder (state and result).
        device: Torch device (default: CUDA if available, else CPU).
        log: Progress printer (rank 0 only).
        checkpoints: Step checkpoints to save during training and to resume from (None: neither).
    """
    quiet_known_warnings()  # library deprecation warnings raised while the model is wrapped and trained
    recipe = PhaseRecipe(job, device, log)
    try:
        recipe.setup()
        resumed = checkpoints is not None and checkpoints.every > 0 and recipe.resume_from(checkpoints)
        if job.evaluate_before and not resumed:
            recipe.evaluate_baseline((baseline_batches or eval_batches)())
        recipe.train(train_batches, checkpoints)
        records = recipe.evaluate(eval_batches() if job.evaluate else [])
        out = PhaseDir(out_dir)
        recipe.save(out)
        if recipe.rank != 0:
            return None
        result = recipe.result(records)
    finally:
        recipe.cleanup()
    result.save(out.path)
    return result
