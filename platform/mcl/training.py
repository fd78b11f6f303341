"""The per-task train-and-evaluate function.

:func:`train_and_evaluate_task` is the whole of one task: load the base model, let the method wrap it,
train on the task's batches (DeepSpeed ZeRO or a plain torch optimizer), evaluate every task of the stream,
save the method's state and a ``task_result.json``. It runs in a plain process (the GPU benchmarks call it
through :func:`run_task_locally`) and inside Ray Train workers (:mod:`mcl.runner`), where
``torch.distributed`` is already initialised; the data arrives as iterables of preprocessed numpy batches
either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mcl.config import ExperimentConfig, config_from_dict
from mcl.data import Preprocessor, collate, local_batches, shard
from mcl.logs import quiet_known_warnings
from mcl.methods_api import DRIVER_STATE_FILE, Method, TaskContext, build_method
from mcl.worker.losses import per_sample_loss

RESULT_FILE = "task_result.json"
STATE_DIR = "state"


@dataclass
class TaskJob:
    """Everything one task's training needs; plain data so it pickles to Ray workers.

    Attributes:
        config: The resolved experiment config as a dict.
        model_path: Resolved model folder or hub id.
        task_index: Position of the task being trained.
        task_names: All task names of the stream.
        previous_state_dir: The method's state folder after the previous task, if any.
        steps: Optimiser steps of this phase (identical on every rank).
        evaluate_before: Also evaluate the untouched model first (the baseline row for forward transfer).
        phase: The phase of the task being trained (see :class:`mcl.methods_api.Phase`); ``config``
            already carries the phase's epochs and learning rate.
        evaluate: Evaluate all tasks at the end of this phase.
        optimize: Take optimiser steps (False: gradients only, for :meth:`Method.on_gradients`).
        driver_state: The method's driver-side state, saved with this phase's state by rank 0.
    """

    config: dict[str, Any]
    model_path: str
    task_index: int
    task_names: list[str]
    previous_state_dir: str | None
    steps: int
    evaluate_before: bool = False
    phase: str = "train"
    evaluate: bool = True
    optimize: bool = True
    driver_state: dict[str, Any] | None = None


@dataclass
class TaskResult:
    """What a task leaves behind (rank 0 writes it as ``task_result.json``)."""

    task_index: int
    task_names: list[str]
    accuracy: dict[str, float]
    baseline_accuracy: dict[str, float] | None
    train_log: list[dict[str, float]]
    predictions: list[dict[str, Any]]
    timing: dict[str, float]
    memory: dict[str, float] = field(default_factory=dict)
    method_metrics: dict[str, float] = field(default_factory=dict)
    phase: str = "train"

    def save(self, out_dir: Path) -> Path:
        path = out_dir / RESULT_FILE
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> TaskResult:
        return cls(**json.loads((Path(out_dir) / RESULT_FILE).read_text()))


def _dist() -> tuple[int, int]:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deepspeed_config(cfg: ExperimentConfig, micro_batch: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.scaling.zero_stage}
    if cfg.scaling.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.scaling.zero3_param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: Any, cfg: ExperimentConfig, optimize: bool = True) -> tuple[Any, Any]:
    """AdamW over the trainable parameters and the warmup-then-constant learning-rate schedule.

    ``optimize=False`` (a gradient-only phase) gives learning rate and weight decay 0: the engine keeps its
    usual backward/step bookkeeping (ZeRO's gradient partitions included) and the steps change nothing.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the method left no trainable parameters")
    lr, decay = (cfg.train.lr, cfg.train.weight_decay) if optimize else (0.0, 0.0)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    warmup = cfg.train.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model's forward takes from a collated batch (everything but the labels)."""
    return {k: v for k, v in batch.items() if k != "labels"}


class _Trainer:
    """The optimiser step behind one interface for DeepSpeed and plain torch (DDP when distributed)."""

    def __init__(
        self, model: Any, cfg: ExperimentConfig, world_size: int, device: Any, optimize: bool = True
    ) -> None:
        optimizer, scheduler = build_optimizer(model, cfg, optimize)
        self.cfg = cfg
        self.deepspeed = cfg.scaling.deepspeed
        self.zero3 = self.deepspeed and cfg.scaling.zero_stage == 3
        if self.deepspeed:
            import deepspeed

            micro = cfg.train.batch_size // world_size
            # The process group exists already (Ray Train, or run_task_locally); DeepSpeed adopts it.
            deepspeed.init_distributed(dist_backend=_backend(device), auto_mpi_discovery=False)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, micro)
            )
            self.module = self.engine.module
        else:
            model.to(device)
            self.engine = model
            if world_size > 1:
                from torch.nn.parallel import DistributedDataParallel

                self.engine = DistributedDataParallel(model)
            self.module = model
            self.optimizer, self.scheduler = optimizer, scheduler

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.engine(**model_inputs(batch))

    def backward(self, loss: Any) -> None:
        if self.deepspeed:
            self.engine.backward(loss)
        else:
            loss.backward()

    def full_grad(self, param: Any) -> Any:
        """The whole averaged gradient of ``param`` between :meth:`backward` and :meth:`step` (a collective
        under ZeRO: every rank asks for the same parameters in the same order)."""
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_grad

            return safe_get_full_grad(param)
        return param.grad

    def step(self) -> None:
        import torch

        if self.deepspeed:
            self.engine.step()
            return
        if self.cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.module.parameters() if p.requires_grad], self.cfg.train.max_grad_norm
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def gathered(self, params: list[Any]) -> contextlib.AbstractContextManager[Any]:
        """``params`` materialised on every rank (a no-op below ZeRO-3)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _zero3_loading_context(cfg: ExperimentConfig, world_size: int) -> Any:
    if cfg.scaling.zero_stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config(cfg, cfg.train.batch_size // world_size))


def _backend(device: Any) -> str:
    return "nccl" if getattr(device, "type", str(device)) == "cuda" else "gloo"


def _all_reduce_mean(value: float, world_size: int, device: Any) -> float:
    if world_size == 1:
        return value
    import torch
    import torch.distributed as td

    # On the compute device: NCCL groups (Ray Train on GPUs) refuse CPU tensors.
    t = torch.tensor([value], dtype=torch.float64, device=device)
    td.all_reduce(t)
    return float(t.item()) / world_size


def to_device(batch: dict[str, Any], device: Any, dtype: Any) -> dict[str, Any]:
    # Floating model inputs (pixel values) follow the model's dtype; ids, masks and grids keep theirs.
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def evaluate(
    trainer: _Trainer,
    method: Method,
    ctx: TaskContext,
    batches: Iterable[dict[str, np.ndarray]],
    processor: Any,
    cfg: ExperimentConfig,
    device: Any,
    dtype: Any,
) -> list[dict[str, Any]]:
    """Greedy answers for this rank's evaluation batches, gathered on rank 0 (other ranks get ``[]``).

    Ranks may hold different numbers of batches; under ZeRO-3 every forward is collective, so a rank that
    has run out repeats its last batch (outputs discarded) until all are done, and generation runs with
    ``synced_gpus``.
    """
    import torch
    import torch.distributed as td

    rank, world = _dist()
    tokenizer = processor.tokenizer
    gen_kwargs = {
        "max_new_tokens": cfg.eval.max_new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if trainer.zero3 and world > 1:
        gen_kwargs["synced_gpus"] = True
    model = trainer.module
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    iterator: Iterator[dict[str, np.ndarray]] = iter(batches)
    last: dict[str, np.ndarray] | None = None
    with torch.no_grad():
        while True:
            batch = next(iterator, None)
            if world > 1:
                more = torch.tensor([int(batch is not None)], device=device)
                td.all_reduce(more, op=td.ReduceOp.MAX)
                if not more.item():
                    break
                if batch is None and last is None:
                    raise RuntimeError(f"rank {rank} has no evaluation data while others do")
            elif batch is None:
                break
            dummy = batch is None
            batch = last if dummy else batch
            last = batch
            inputs = to_device(collate(batch, tokenizer.pad_token_id, left_pad=True), device, dtype)
            generated = method.generate(model, inputs, gen_kwargs, ctx)
            new_tokens, extras = generated if isinstance(generated, tuple) else (generated, {})
            if dummy:
                continue
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in enumerate(texts):
                records.append(
                    {
                        "id": str(batch["id"][i]),
                        "task": str(batch["task"][i]),
                        "prediction": text.strip(),
                        "answer": str(batch["answer"][i]),
                        "answer_type": str(batch["answer_type"][i]),
                        **{key: values[i] for key, values in extras.items()},
                    }
                )
    model.train(was_training)
    if world > 1:
        gathered: list[Any] = [None] * world if rank == 0 else []
        td.gather_object(records, gathered if rank == 0 else None, dst=0)
        records = [r for part in gathered for r in part] if rank == 0 else []
    return records


def score_records(records: list[dict[str, Any]], task_names: list[str]) -> dict[str, float]:
    """Accuracy in percent per task from scored predictions (mutates records: adds ``score``)."""
    from mcl.evaluation.scoring import score

    totals: dict[str, list[float]] = {t: [] for t in task_names}
    for r in records:
        r["score"] = score(r["prediction"], r["answer"], r["answer_type"])
        totals.setdefault(r["task"], []).append(r["score"])
    return {t: 100.0 * sum(v) / len(v) if v else float("nan") for t, v in totals.items()}


def train_and_evaluate_task(
    job: TaskJob,
    train_batches: Iterable[dict[str, np.ndarray]],
    eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]],
    out_dir: str | Path,
    device: Any = None,
    log: Callable[[str], None] = print,
) -> TaskResult | None:
    """Train the method on one task, evaluate all tasks, save state. Returns the result on rank 0.

    Args:
        job: What to train (see :class:`TaskJob`).
        train_batches: This rank's preprocessed training batches, ``job.steps`` of them, in order.
        eval_batches: A callable returning this rank's preprocessed evaluation batches (all tasks' test
            samples); called once, or twice when ``job.evaluate_before``.
        out_dir: Where rank 0 writes ``state/`` and ``task_result.json``.
        device: Torch device (default: CUDA if available, else CPU).
        log: Progress printer (rank 0 only).
    """
    import torch

    from mcl.models import load_model_and_processor

    quiet_known_warnings()  # library deprecation warnings raised while the model is wrapped and trained
    cfg = config_from_dict(job.config)
    rank, world = _dist()
    out = Path(out_dir)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.model.dtype)
    say = log if rank == 0 else (lambda _msg: None)
    name = job.task_names[job.task_index]
    phase_tag = "" if job.phase == "train" else f" {job.phase}"
    tag = f"[task {job.task_index + 1}/{len(job.task_names)} {name}{phase_tag}]"

    t0 = time.perf_counter()
    method = build_method(cfg.method.name, cfg.method.params)
    seed_everything(cfg.train.seed + job.task_index)
    # Under ZeRO-3, transformers loads the weights straight into partitions (deepspeed.zero.Init) while
    # this object is alive, so no rank ever holds the whole model.
    zero3_loading = _zero3_loading_context(cfg, world) if cfg.scaling.deepspeed else None
    base, processor = load_model_and_processor(
        job.model_path, trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype
    )
    ctx = TaskContext(
        task_index=job.task_index,
        task_names=tuple(job.task_names),
        lora=cfg.model.lora,
        previous_state_dir=Path(job.previous_state_dir) if job.previous_state_dir else None,
        rank=rank,
        world_size=world,
        seed=cfg.train.seed,
        processor=processor,
        phase=job.phase,
    )
    model = method.setup_model(base, ctx)
    method.before_task(model, ctx)
    trainer = _Trainer(model, cfg, world, device, optimize=job.optimize)
    wants_gradients = method.wants_gradients(ctx)
    device = next(trainer.module.parameters()).device
    setup_s = time.perf_counter() - t0

    baseline = None
    if job.evaluate_before:
        say(f"{tag} evaluating the untrained model on all tasks (baseline for forward transfer)")
        records = evaluate(trainer, method, ctx, eval_batches(), processor, cfg, device, dtype)
        baseline = score_records(records, job.task_names) if rank == 0 else None

    trainer.module.train()
    train_log: list[dict[str, float]] = []
    t_train = time.perf_counter()
    t_steady, steady_samples = None, 0
    micro = cfg.train.batch_size // world
    steps_per_epoch = max(1, job.steps // cfg.train.epochs)
    step = 0
    data_wait_s = 0.0  # time blocked on the input pipeline (steady state): tells an input-bound run
    batches = iter(train_batches)
    while True:
        t_wait = time.perf_counter()
        np_batch = next(batches, None)
        if np_batch is None:
            break
        if step >= 2:
            data_wait_s += time.perf_counter() - t_wait
        batch = to_device(collate(np_batch, processor.tokenizer.pad_token_id, left_pad=False), device, dtype)
        outputs = trainer.forward(batch)
        loss = per_sample_loss(outputs.logits, batch["labels"])
        extra = method.extra_loss(trainer.module, batch, outputs, ctx)
        total = loss + extra if extra is not None else loss
        trainer.backward(total)
        if wants_gradients:
            method.on_gradients(trainer.module, batch, trainer.full_grad, ctx)
        trainer.step()
        step += 1
        if step == 2:
            t_steady = time.perf_counter()
        elif step > 2:
            steady_samples += micro * world
        loss_value = _all_reduce_mean(float(loss.detach()), world, device)
        entry = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": loss_value}
        if method.has_extra_loss():  # reduced on every rank, also where this batch had none: no hang
            extra_value = float(extra.detach()) if extra is not None else 0.0
            entry["extra_loss"] = _all_reduce_mean(extra_value, world, device)
        train_log.append(entry)
        if step % cfg.train.log_every == 0 or step == job.steps:
            rate = step * micro * world / (time.perf_counter() - t_train)
            say(
                f"{tag} step {step}/{job.steps} epoch {entry['epoch'] + 1} loss {loss_value:.4f} ({rate:.1f} samples/s)"
            )
    if step != job.steps:
        raise RuntimeError(f"{tag} rank {rank} got {step} training batches, expected {job.steps}")
    train_s = time.perf_counter() - t_train
    steady_s = time.perf_counter() - t_steady if t_steady is not None else float("nan")
    method.after_task(trainer.module, ctx)

    t_eval = time.perf_counter()
    records = []
    if job.evaluate:
        records = evaluate(trainer, method, ctx, eval_batches(), processor, cfg, device, dtype)
    eval_s = time.perf_counter() - t_eval

    out.mkdir(parents=True, exist_ok=True)
    with trainer.gathered(method.state_parameters(trainer.module)):
        if rank == 0:
            method.save_state(trainer.module, out / STATE_DIR, ctx)
            if job.driver_state is not None:
                (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
                (out / STATE_DIR / DRIVER_STATE_FILE).write_text(json.dumps(job.driver_state))
    if world > 1:
        import torch.distributed as td

        td.barrier()
    del zero3_loading  # ZeRO-3 stayed visible to transformers (loading, synced generate) until here
    if rank != 0:
        return None
    accuracy = score_records(records, job.task_names) if job.evaluate else {}
    method_metrics = method.eval_metrics(records, ctx) if job.evaluate else {}
    if accuracy:
        say(f"{tag} accuracy " + ", ".join(f"{t} {a:.1f}" for t, a in accuracy.items()))
    if method_metrics:
        say(f"{tag} " + ", ".join(f"{k} {v:.2f}" for k, v in method_metrics.items()))
    result = TaskResult(
        task_index=job.task_index,
        task_names=list(job.task_names),
        accuracy=accuracy,
        baseline_accuracy=baseline,
        train_log=train_log,
        predictions=records,
        timing={
            "setup_s": setup_s,
            "train_s": train_s,
            "eval_s": eval_s,
            "train_samples_per_s": step * micro * world / train_s if train_s > 0 else float("nan"),
            "steady_samples_per_s": steady_samples / steady_s
            if steady_samples and steady_s > 0
            else float("nan"),
            "steady_data_wait_s": data_wait_s,
            "steady_train_s": steady_s,
            "eval_samples": float(len(records)),
        },
        memory=method.memory_report(trainer.module),
        method_metrics=method_metrics,
        phase=job.phase,
    )
    result.save(out)
    return result


def run_task_locally(
    job: TaskJob,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    out_dir: str | Path,
    device: Any = None,
    log: Callable[[str], None] = print,
) -> TaskResult:
    """Run one task in this process, without Ray (single worker). Used by the GPU benchmarks and tests.

    With ``scaling.deepspeed`` on, a one-process gloo/nccl group is created for DeepSpeed.
    """
    cfg = config_from_dict(job.config)
    if cfg.scaling.num_workers != 1:
        raise ValueError("run_task_locally runs one worker; set scaling.num_workers=1")
    if cfg.scaling.deepspeed:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        _init_single_process_group()
    trust = cfg.model.trust_remote_code
    train_pre = Preprocessor(job.model_path, train=True, trust_remote_code=trust)
    eval_pre = Preprocessor(job.model_path, train=False, trust_remote_code=trust)
    result = train_and_evaluate_task(
        job,
        local_batches(shard(train_rows, 0, 1), train_pre, cfg.train.batch_size),
        lambda: local_batches(eval_rows, eval_pre, cfg.eval.batch_size),
        out_dir,
        device=device,
        log=log,
    )
    assert result is not None
    return result


def _init_single_process_group() -> None:
    """A one-process group for DeepSpeed outside Ray (a free loopback port, rank 0 of 1)."""
    import socket

    import torch
    import torch.distributed as td

    if td.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # DeepSpeed insists on these (normally set by its launcher); Ray Train sets its own in its workers.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    td.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
