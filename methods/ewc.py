"""Elastic Weight Consolidation (EWC) on the LoRA adapter.

Paper: Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.

What it does: after each task, estimate how much every trainable parameter mattered for that task (the
diagonal of the Fisher information ``F``) and remember the parameters ``theta*``; while training later tasks,
add the quadratic penalty ``lambda / 2 * sum_i F_i (theta_i - theta*_i)^2``, so that parameters important to
earlier tasks move little while the others stay free.

How it is implemented here:

* The parameters are the trainable ones of sequential LoRA (the LoRA adapter, plus the multimodal projector
  when ``model.lora.train_projector``); each task continues from the previous task's adapter.
* Each task has two phases: ``train`` (the task loss plus the penalty; it evaluates) and ``fisher``
  (``optimize=False``, one epoch, no evaluation): the engine runs forward and backward on ``fisher_samples``
  of the task's training samples and takes zero-size optimiser steps (the weights stay bit-identical), and
  :meth:`EWC.on_gradients` reads every batch's whole averaged gradient through the engine's ``full_grad``,
  also under ZeRO-2/3 where ``p.grad`` is None. The fisher phase saves ``F`` and the anchor ``theta*`` (the
  parameters after the task) as safetensors next to the adapter; the next task's train phase reads them.
* Fisher estimate (an *empirical* Fisher from mini-batch gradients, stated as such): the engine only hands
  over the gradient ``g_b`` of a global batch of ``B`` samples, the mean of ``B`` per-sample gradients (each
  the gradient of that sample's mean token cross-entropy on its answer). For per-sample gradients with mean
  ``mu`` and variance ``s^2``, ``E[B g_b^2] = s^2 + B mu^2``, while the per-sample empirical Fisher is
  ``E[g_i^2] = s^2 + mu^2``; so ``F_task = B * mean_b g_b^2`` estimates it well where the mean gradient is
  small (after training on the task, where the Fisher is taken), and over-weights the mean gradient
  otherwise. Smaller Fisher batches would be closer to per-sample but are only possible through
  ``train.batch_size``, which the experiment fixes for every phase. The labels are the data's answers
  (empirical Fisher), not samples from the model.
* Across tasks ("online EWC", Schwarz et al. 2018): one anchor (the parameters after the latest task) and an
  accumulated Fisher ``F <- gamma * F + F_task``. With ``gamma = 1`` this is the plain sum of the tasks'
  Fishers, Kirkpatrick's sum of per-task penalties with every anchor moved to the latest parameters.
* ZeRO-3: parameters are partitioned (``p.numel() == 0`` outside forward). The penalty gathers the
  trainable parameters (``deepspeed.zero.GatheredParameters``, a collective over the same parameters in the
  same order on every rank; only the small trainable set), builds the quadratic on the whole tensors, and
  lets DeepSpeed's gradient hooks reduce-scatter its gradient like any other (every rank adds the same full
  penalty; the gradient average over ranks is its gradient). ``F`` and ``theta*`` are held whole, in float32,
  on every rank (LoRA-sized).

Hyper-parameters:
    ewc_lambda: Penalty strength ``lambda``. The paper tunes it per experiment (no universal default); ours,
        ``2e4``, was chosen on the generated stream's default config, seed 0 (MFN: 2e3 -> 29, 2e4 -> 83,
        5e4 -> 62 with the 4th task not learnt, 2e5 -> 50 with tasks 3-4 not learnt; sequential LoRA 26).
        The Fisher of a converged task is small (its loss is near zero), so lambda must be large to matter;
        with ``gamma = 1`` the penalty grows with every task, which bounds lambda from above.
    gamma: Decay of the accumulated Fisher (1 = sum over tasks, the paper's multi-task penalty; < 1 = online
        EWC's decayed sum).
    fisher_samples: Training samples of the task the Fisher is estimated on (one epoch, padded by wrapping to
        whole global batches; the whole task when it has fewer). Ours: 160, the whole task on the default
        stream; the paper uses samples of the task's data without giving a count.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mcl.adapters import ADAPTER_DIR, continue_lora, full_shape, save_lora
from mcl.data import training_order
from mcl.methods_api import Method, Phase, TaskContext, TrainingData, TrainingRequest, register_method

FISHER_FILE = "ewc_fisher.safetensors"
ANCHOR_FILE = "ewc_anchor.safetensors"
FISHER_PHASE = "fisher"


@dataclass
class EWCParams:
    """EWC's hyper-parameters (see the module docstring)."""

    ewc_lambda: float = field(default=2e4, metadata={"help": "Penalty strength lambda (finite, >= 0)."})
    gamma: float = field(
        default=1.0, metadata={"help": "Decay of the accumulated Fisher in [0, 1] (1 = sum over tasks)."}
    )
    fisher_samples: int = field(
        default=160, metadata={"help": "Training samples of a task its Fisher is estimated on (>= 1)."}
    )

    def __post_init__(self) -> None:
        if not math.isfinite(self.ewc_lambda):
            raise ValueError(f"ewc_lambda must be a finite number, got {self.ewc_lambda!r}")
        if self.ewc_lambda < 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {self.ewc_lambda!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma!r}")
        if self.fisher_samples < 1:
            raise ValueError(f"fisher_samples must be >= 1, got {self.fisher_samples!r}")


def ewc_penalty(
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    fisher: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    strength: float,
) -> torch.Tensor:
    """``strength / 2 * sum_i F_i (theta_i - theta*_i)^2`` over ``named_params`` found in ``fisher``.

    Under ZeRO-3 the parameters are gathered first (a collective: call it with the same parameters in the
    same order on every rank); the gradient then reaches each parameter through DeepSpeed's own hooks.
    Computed in float32 whatever the parameters' dtype.
    """
    used = [(n, p) for n, p in named_params if n in fisher]
    if not used:
        raise ValueError("ewc_penalty: none of the parameters has a Fisher entry")
    total: torch.Tensor | None = None
    with _gathered([p for _, p in used]):
        for name, p in used:
            if p.shape != fisher[name].shape:
                raise RuntimeError(
                    f"EWC: parameter {name} has shape {tuple(p.shape)} but its Fisher {tuple(fisher[name].shape)}"
                )
            diff = p.float() - anchor[name]
            term = (fisher[name] * diff * diff).sum()
            total = term if total is None else total + term
    assert total is not None
    return 0.5 * strength * total


def _gathered(params: list[torch.nn.Parameter]) -> AbstractContextManager[Any]:
    """ZeRO-3 partitioned parameters materialised on every rank; a no-op for anything else."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _trainable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters by name, in the model's (rank-independent) order."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path))


@register_method
class EWC(Method):
    """EWC with a diagonal empirical Fisher over the LoRA adapter (+ projector); see the module docstring."""

    name = "ewc"
    Params = EWCParams

    def __init__(self, params: EWCParams) -> None:
        super().__init__(params)
        self.fisher: dict[str, torch.Tensor] = {}  # accumulated over the finished tasks (float32)
        self.anchor: dict[str, torch.Tensor] = {}  # theta* after the latest finished task
        self._grad_sq: dict[str, torch.Tensor] = {}  # fisher phase: sum over batches of B * g_b^2
        self._fisher_batches = 0

    # -- driver side ---------------------------------------------------------------------------------
    def phases(self, task_index: int) -> list[Phase]:
        return [Phase("train"), Phase(FISHER_PHASE, evaluate=False, optimize=False, epochs=1)]

    def training_data(self, request: TrainingRequest) -> TrainingData:
        if request.phase.name != FISHER_PHASE:
            return super().training_data(request)
        samples = request.task.train
        if self.params.fisher_samples < len(samples):
            samples = random.Random(request.seed).sample(samples, self.params.fisher_samples)
        return TrainingData(
            training_order(
                samples, epochs=request.epochs, global_batch=request.global_batch, seed=request.seed
            )
        )

    # -- worker side ---------------------------------------------------------------------------------
    def setup_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        previous = ctx.previous_state_dir
        if previous is not None and (previous / FISHER_FILE).exists():
            self.fisher = _load_tensors(previous / FISHER_FILE)
            self.anchor = _load_tensors(previous / ANCHOR_FILE)
            if set(self.fisher) != set(self.anchor):
                raise RuntimeError(f"EWC state in {previous}: Fisher and anchor name different parameters")
        return continue_lora(model, ctx)

    def before_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        missing = [n for n in self.fisher if n not in dict(_trainable(model))]
        if missing:
            raise RuntimeError(
                f"EWC: {len(missing)} parameters of the saved Fisher are not trainable: {missing[0]}"
            )

    def extra_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any, ctx: TaskContext
    ) -> torch.Tensor | None:
        if ctx.phase == FISHER_PHASE or not self.fisher or self.params.ewc_lambda == 0:
            return None
        device = outputs.logits.device
        for store in (self.fisher, self.anchor):
            for name, t in store.items():
                if t.device != device:
                    store[name] = t.to(device)
        return ewc_penalty(list(_trainable(model)), self.fisher, self.anchor, self.params.ewc_lambda)

    def wants_gradients(self, ctx: TaskContext) -> bool:
        return ctx.phase == FISHER_PHASE

    def on_gradients(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        full_grad: Callable[[torch.nn.Parameter], torch.Tensor | None],
        ctx: TaskContext,
    ) -> None:
        # Every Fisher row is supervised, so the loss is the mean over the whole global batch (all the step's
        # micro-batches on every worker).
        global_batch = (
            ctx.step.totals["rows"] if ctx.step else int(batch["input_ids"].shape[0]) * ctx.world_size
        )
        for name, p in _trainable(model):  # the same parameters in the same order on every rank
            grad = full_grad(p)
            if grad is None:  # no gradient reached it (unused): contributes zero
                continue
            sq = global_batch * grad.detach().float().pow(2)
            # .to(): sums restored from a step checkpoint come back on the CPU.
            self._grad_sq[name] = self._grad_sq[name].to(sq.device) + sq if name in self._grad_sq else sq
        self._fisher_batches += 1

    def step_state(self, ctx: TaskContext) -> dict[str, Any] | None:
        """The Fisher phase's running sums, so a phase resumed from a step checkpoint counts every batch."""
        if ctx.phase != FISHER_PHASE:
            return None
        return {"grad_sq": dict(self._grad_sq), "fisher_batches": self._fisher_batches}

    def load_step_state(self, state: dict[str, Any], ctx: TaskContext) -> None:
        self._grad_sq = dict(state["grad_sq"])
        self._fisher_batches = int(state["fisher_batches"])

    def after_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        if ctx.phase != FISHER_PHASE:
            return
        if self._fisher_batches == 0:
            raise RuntimeError("EWC: the fisher phase saw no batches")
        fisher: dict[str, torch.Tensor] = {}
        for name, p in _trainable(model):
            shape = full_shape(p)
            task_fisher = self._grad_sq.get(name)
            if task_fisher is None:
                task_fisher = torch.zeros(shape, dtype=torch.float32)
            task_fisher = task_fisher.cpu() / self._fisher_batches
            previous = self.fisher.get(name)
            fisher[name] = (
                task_fisher if previous is None else self.params.gamma * previous.cpu() + task_fisher
            )
        self.fisher = fisher
        self._grad_sq.clear()

    def state_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for _, p in _trainable(model)]

    def save_state(self, model: torch.nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        save_lora(model, out_dir / ADAPTER_DIR)
        if ctx.phase == FISHER_PHASE:  # parameters gathered by the engine: theta* of this task
            self.anchor = {n: p.detach().float().cpu().clone() for n, p in _trainable(model)}
        if self.fisher:  # the train phase carries the previous tasks' Fisher to the fisher phase
            _save_tensors(self.fisher, out_dir / FISHER_FILE)
            _save_tensors(self.anchor, out_dir / ANCHOR_FILE)

    def memory_report(self, model: torch.nn.Module) -> dict[str, float]:
        fisher_numel = sum(t.numel() for t in self.fisher.values())
        return {
            **super().memory_report(model),
            "ewc_fisher_numel": float(fisher_numel),
            "ewc_fisher_bytes": float(sum(t.numel() * t.element_size() for t in self.fisher.values())),
            "ewc_anchor_bytes": float(sum(t.numel() * t.element_size() for t in self.anchor.values())),
        }
