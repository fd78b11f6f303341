"""The optimiser step behind one interface for DeepSpeed ZeRO and plain torch (DDP when distributed)."""

from __future__ import annotations

import contextlib
import functools
import math
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mcl.config import ExperimentConfig


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deepspeed_config(
    cfg: ExperimentConfig, micro_batch: int, hidden_size: int | None = None
) -> dict[str, Any]:
    """DeepSpeed's config for ``cfg``: ZeRO stage and offload, micro-batch and gradient accumulation,
    clipping, precision.

    ``hidden_size`` (the language model's, :func:`model_hidden_size`) sizes the communication buckets as
    transformers' ``"auto"`` does for the LLaVA recipes' zero2/zero3 JSONs (``transformers.integrations.
    deepspeed``): reduce bucket hidden_size², ZeRO-3 prefetch bucket 0.9 x hidden_size². Without it
    DeepSpeed's defaults hold (5e8 elements): ZeRO-3 then reserves a 1.9 GB fp32 gradient bucket per engine
    whatever the model's size (measured: about 10 GB of address space per tiny two-task run in one process,
    which later ``fork`` calls failed on)."""
    zero: dict[str, Any] = {"stage": cfg.scaling.zero_stage}
    if hidden_size:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
    if cfg.scaling.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.scaling.zero3_param_persistence_threshold
        if hidden_size:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
    pin = cfg.scaling.use_gpu  # pinned host memory speeds GPU<->CPU copies; a CPU run has none to pin
    if cfg.scaling.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.scaling.offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.accumulation_steps,
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def model_hidden_size(model: Any) -> int | None:
    """The language model's hidden size from ``model.config`` (or its ``text_config``, as in LLaVA and
    Qwen-VL); None when neither has one."""
    config = getattr(model, "config", None)
    for part in (config, getattr(config, "text_config", None)):
        size = getattr(part, "hidden_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None


def _clear_zero3_release_cache() -> None:
    """Empty ZeRO-3's class-wide, unbounded ``lru_cache`` of which parameters to release after each module
    (``PartitionedParameterCoordinator.__params_to_release``, keyed by coordinator and module): it holds every
    model a process ever wrapped. Clearing it is safe for live engines, which rebuild their entries. The cache
    sits inside DeepSpeed's ``instrument_w_nvtx`` wrapper, which keeps it in its closure (no ``__wrapped__``)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    fn = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
    for candidate in (fn, *cells):
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """The learning-rate multiplier before optimiser step ``step`` (0-based) of a phase of ``total`` steps:
    a linear warm-up over ``warmup`` steps (``(step + 1) / warmup``), then ``constant`` 1, or ``linear`` /
    ``cosine`` decay to 0 at ``total`` (transformers' ``get_cosine_schedule_with_warmup`` shape)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(
    model: Any, base_lr: float, rules: Sequence[tuple[str, float]] = ()
) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` as optimizer groups, one per learning rate: a parameter takes
    the learning rate of the first ``(regex, lr)`` rule whose regex matches its name (``re.search``), else
    ``base_lr``. Groups keep the model's parameter order; each carries ``name`` for logs."""
    compiled = [(re.compile(pattern), lr) for pattern, lr in rules]
    groups: dict[float, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = next((lr for pattern, lr in compiled if pattern.search(name)), base_lr)
        group = groups.setdefault(lr, {"params": [], "lr": lr, "name": f"lr={lr:g}"})
        group["params"].append(param)
    if not groups:
        raise RuntimeError("the method left no trainable parameters")
    return list(groups.values())


def build_optimizer(
    model: Any,
    cfg: ExperimentConfig,
    optimize: bool = True,
    total_steps: int = 0,
    lr_rules: Sequence[tuple[str, float]] = (),
) -> tuple[Any, Any]:
    """AdamW over the trainable parameters (learning rate per group, see :func:`parameter_groups`) and the
    learning-rate schedule of a phase of ``total_steps`` optimiser steps (:func:`lr_factor`).

    With ``scaling.offload``, DeepSpeed's CPU Adam (AdamW mode) steps the optimizer states in host memory.
    ``optimize=False`` (a gradient-only phase) gives learning rate and weight decay 0: the engine keeps its
    usual backward/step bookkeeping (ZeRO's gradient partitions included) and the steps change nothing.
    """
    import torch

    train = cfg.train
    groups = parameter_groups(model, train.lr, lr_rules)
    decay = train.weight_decay if optimize else 0.0
    if not optimize:
        for group in groups:
            group["lr"] = 0.0
    if cfg.scaling.offload != "none":
        optimizer = cpu_adam(groups, decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=decay)
    warmup = train.warmup_for(total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(lr_factor, warmup=warmup, total=total_steps, schedule=train.lr_schedule),
    )
    return optimizer, scheduler


def use_interpreter_ninja() -> None:
    """Put this interpreter's ``bin`` folder first on ``PATH`` when it holds a ``ninja``, as activating the
    environment would: DeepSpeed JIT-builds its CPU ops (the shared-memory all-reduce, CPU Adam) with the first
    ``ninja`` on ``PATH``, into one cache folder per op (``~/.cache/torch_extensions``). Ray starts its workers
    with the interpreter's folder first; a driver or test process started as ``.venv/bin/python`` without
    activation finds the system's ``ninja`` first. Two ninja releases keep incompatible build logs (1.11 writes
    format v5, the pip wheel's 1.13 format v7), so each took the other's build for stale and rebuilt the op:
    20-60 s every time a run's in-process DeepSpeed and its Ray workers took turns (measured 2026-12-06)."""
    import os
    import sys

    folder = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(folder, "ninja")):
        return
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [folder]:
        os.environ["PATH"] = os.pathsep.join([folder, *(p for p in path if p != folder)])


def cpu_adam(groups: list[dict[str, Any]], weight_decay: float) -> Any:
    """DeepSpeed's CPU Adam in AdamW mode (what ZeRO-Offload steps in host memory); its C++ op is built on
    first use. A clear error naming ``scaling.offload`` where it cannot be built."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, weight_decay=weight_decay, adamw_mode=True)
    except Exception as exc:  # the op's JIT build: no compiler, no ninja, an unsupported CPU
        raise RuntimeError(
            f"scaling.offload: DeepSpeed's CPU Adam could not be built on this worker ({exc}); "
            "set scaling.offload=none or install a C++ compiler and ninja"
        ) from exc


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model's forward takes from a collated batch (everything but the labels)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def to_device(batch: dict[str, Any], device: Any, dtype: Any) -> dict[str, Any]:
    """A collated batch on ``device``; floating inputs (pixel values) in the model's dtype, ids and masks as
    they are."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def backend_for(device: Any) -> str:
    return "nccl" if getattr(device, "type", str(device)) == "cuda" else "gloo"


def all_reduce_mean(value: float, world_size: int, device: Any) -> float:
    """The mean of ``value`` over all ranks (``value`` itself on one)."""
    if world_size == 1:
        return value
    import torch
    import torch.distributed as td

    # On the compute device: NCCL groups (Ray Train on GPUs) refuse CPU tensors.
    t = torch.tensor([value], dtype=torch.float64, device=device)
    td.all_reduce(t)
    return float(t.item()) / world_size


def all_reduce_sum(values: list[float], world_size: int, device: Any) -> list[float]:
    """``values`` summed element-wise over all ranks (themselves on one), in one collective."""
    if world_size == 1:
        return list(values)
    import torch
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return t.tolist()


def enable_gradient_checkpointing(model: Any) -> None:
    """Activation checkpointing on every module of ``model`` that supports it (transformers'
    ``activation_checkpointing_enable``, ``gradient_checkpointing_enable`` before transformers 5),
    non-reentrant: it needs no inputs that require gradients (a frozen base under LoRA) and works with
    DeepSpeed ZeRO-3's parameter gathering. Only in training mode: generation recomputes nothing."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def zero3_loading_context(cfg: ExperimentConfig, world_size: int) -> Any:
    """Under ZeRO-3, an object that makes transformers load weights straight into partitions while alive."""
    if not cfg.scaling.deepspeed or cfg.scaling.zero_stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config(cfg, cfg.micro_batch))


class StepEngine:
    """The optimiser step behind one interface for DeepSpeed and plain torch (DDP when distributed).

    One optimiser step is ``accumulation`` micro-batches: run each under :meth:`micro_batch` (forward and
    :meth:`backward`), then :meth:`step` after each; the update happens after the last one. Gradients are
    averaged over the micro-batches and the workers, as DeepSpeed does: a loss written as the micro-batch's
    share of the step's objective times ``accumulation * world_size`` gives the gradient of that objective.

    Attributes:
        engine: What the forward runs through (DeepSpeed's engine, DDP, or the model).
        module: The model itself (what methods' hooks and saving see).
        optimizer, scheduler: The (wrapped) optimizer and learning-rate schedule.
        deepspeed, zero3: Which engine runs the step.
        accumulation: Micro-batches per optimiser step.
    """

    def __init__(
        self,
        model: Any,
        cfg: ExperimentConfig,
        world_size: int,
        device: Any,
        optimize: bool = True,
        total_steps: int = 0,
        lr_rules: Sequence[tuple[str, float]] = (),
    ) -> None:
        if cfg.scaling.deepspeed:
            use_interpreter_ninja()  # before the first op build (CPU Adam in build_optimizer, shm comm)
        optimizer, scheduler = build_optimizer(model, cfg, optimize, total_steps, lr_rules)
        self.cfg = cfg
        self.deepspeed = cfg.scaling.deepspeed
        self.zero3 = self.deepspeed and cfg.scaling.zero_stage == 3
        self.accumulation = cfg.accumulation_steps
        self._last = True
        if self.deepspeed:
            import deepspeed

            # The process group exists already (Ray Train, or run_task_locally); DeepSpeed adopts it.
            deepspeed.init_distributed(dist_backend=backend_for(device), auto_mpi_discovery=False)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=deepspeed_config(cfg, cfg.micro_batch, model_hidden_size(model)),
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

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward; ``last``: the step's last micro-batch (DDP syncs
        gradients, DeepSpeed reduces them, only then)."""
        self._last = last
        if self.deepspeed:
            self.engine.set_gradient_accumulation_boundary(last)
        # DDP all-reduces in every backward unless told not to; DeepSpeed decides from the boundary above.
        no_sync = getattr(self.engine, "no_sync", None) if not self.deepspeed else None
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            yield

    def forward(self, batch: dict[str, Any]) -> Any:
        # No KV cache in a training forward: nothing reads it, and it is incompatible with checkpointing.
        return self.engine(**model_inputs(batch), use_cache=False)

    def backward(self, loss: Any) -> None:
        if self.deepspeed:
            self.engine.backward(loss)  # scales by 1 / accumulation itself
        else:
            (loss / self.accumulation if self.accumulation > 1 else loss).backward()

    def full_grad(self, param: Any) -> Any:
        """The whole averaged gradient of ``param`` after the step's last :meth:`backward`, before its
        :meth:`step` (a collective under ZeRO: every rank asks for the same parameters in the same order)."""
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_grad

            return safe_get_full_grad(param)
        return param.grad

    def step(self) -> None:
        """After each micro-batch: the optimiser update (clipping, learning-rate schedule) happens after the
        step's last one."""
        import torch

        if self.deepspeed:
            self.engine.step()  # DeepSpeed updates at the accumulation boundary only
            return
        if not self._last:
            return
        if self.cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.module.parameters() if p.requires_grad], self.cfg.train.max_grad_norm
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Release DeepSpeed's engine, its buffers and the model at the end of a phase: without this, every
        engine of a 4-phase run in one process was still alive after it (measured), one more per phase in a
        worker that trains several. ``destroy()`` removes the engine's hooks (both ZeRO-2 and ZeRO-3 need it);
        ZeRO-3 also holds the model in two module-level places, emptied here. A no-op without DeepSpeed."""
        if not self.deepspeed:
            return
        self.engine.destroy()
        if self.zero3:
            # ZeRO-3 pushes the model onto a module-level stack when it wraps it and never pops it (DeepSpeed
            # 0.19, runtime/zero/parameter_offload.py: FWD_MODULE_STACK), which keeps the model, its engine and
            # its buffers alive for as long as the process lives.
            from deepspeed.runtime.zero import parameter_offload

            stack = parameter_offload.FWD_MODULE_STACK
            stack[:] = [m for m in stack if m is not self.module]
            _clear_zero3_release_cache()

    def gathered(self, params: list[Any]) -> contextlib.AbstractContextManager[Any]:
        """``params`` materialised on every rank (a no-op below ZeRO-3)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
