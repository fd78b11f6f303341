"""The optimiser step behind one interface for DeepSpeed ZeRO and plain torch (DDP when distributed)."""

from __future__ import annotations

import contextlib
import random
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


def zero3_loading_context(cfg: ExperimentConfig, world_size: int) -> Any:
    """Under ZeRO-3, an object that makes transformers load weights straight into partitions while alive."""
    if not cfg.scaling.deepspeed or cfg.scaling.zero_stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config(cfg, cfg.train.batch_size // world_size))


class StepEngine:
    """The optimiser step behind one interface for DeepSpeed and plain torch (DDP when distributed).

    Attributes:
        engine: What the forward runs through (DeepSpeed's engine, DDP, or the model).
        module: The model itself (what methods' hooks and saving see).
        optimizer, scheduler: The (wrapped) optimizer and learning-rate schedule.
        deepspeed, zero3: Which engine runs the step.
    """

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
            deepspeed.init_distributed(dist_backend=backend_for(device), auto_mpi_discovery=False)
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
