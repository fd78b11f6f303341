"""Learning without Forgetting (LwF) on the LoRA adapter.

Paper: Li and Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017.

What it does: while training a new task, keep the model's outputs on the new task's data close to what
the model answered before the task (knowledge distillation from the previous model, Hinton et al. 2015):
no old data is stored, only the previous model. The loss is
``task + lambda * T^2 * KL(teacher_T || student_T)`` with both distributions softened by temperature ``T``
(the ``T^2`` keeps the distillation gradients' scale independent of ``T``, as in Hinton et al.).

How it is implemented here:

* The student is sequential LoRA's model: the adapter left by the previous task, trainable (plus the
  projector when ``model.lora.train_projector``). The teacher is the same saved adapter loaded a second time
  as a frozen peft adapter ``teacher`` beside it: the model as it was after the previous task. The
  student's trainable parameters are exactly sequential LoRA's (loading the teacher adds only frozen ones).
* The teacher's logits come from a no-grad forward of the same batch with every peft layer switched to the
  teacher adapter and every module in eval mode (:func:`mcl.adapters.using_adapter`, which says why not peft's
  ``set_adapter`` or ``adapter_names``); adapters and modes are restored afterwards. The teacher runs
  without dropout and draws no random numbers (the student's dropout stream is sequential LoRA's); its
  parameters never enter the optimiser, so they stay bit-identical. Under ZeRO-3 the teacher forward is one
  more collective forward per step, on every rank.
* Where: the supervised answer positions (the answer tokens and EOS), the positions the task loss trains;
  the answer here is the whole response, so these are all response positions. KL over the full vocabulary,
  averaged over each sample's supervised positions, then over the samples (like the engine's task loss, so
  a global batch's value does not depend on how it is split over workers).
* First task: no teacher, no extra loss. State after each task: the student adapter (the next teacher).

Known limit (measured on the generated stream, see the method's report): in the paper each task has its own
output head, so distilling the old heads never competes with the new task's loss on its new head. A
multimodal LLM has one shared vocabulary head, and here every scenario maps the same colours to different
words: on the new task's images the teacher predicts the old scenario's word at exactly the position where
the task loss asks for the new one, while the old scenario's images (where the old behaviour matters) are
never seen. With the paper's ``lambda = 1`` the old tasks survive one task (aerial keeps ~half its
accuracy after underwater) but not the stream; larger ``lambda`` keeps more of the first task only by
learning the new ones worse (lower MFT and MFN).

Hyper-parameters (paper defaults):
    distill_lambda: Weight ``lambda_o`` of the distillation term; the paper sets it to 1 for most
        experiments.
    temperature: Softening temperature ``T``; the paper uses 2 (as Hinton et al. suggest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mcl.adapters import ADAPTER_DIR, continue_lora, full_numel, using_adapter
from mcl.data import IGNORE_INDEX
from mcl.methods_api import Method, TaskContext, register_method

STUDENT = "default"
TEACHER = "teacher"


@dataclass
class LwFParams:
    """LwF's hyper-parameters (see the module docstring)."""

    distill_lambda: float = field(
        default=1.0, metadata={"help": "Weight lambda_o of the distillation term (finite, >= 0; paper: 1)."}
    )
    temperature: float = field(
        default=2.0, metadata={"help": "Softening temperature T (finite, > 0; paper: 2)."}
    )

    def __post_init__(self) -> None:
        for field_name in ("distill_lambda", "temperature"):
            value = getattr(self, field_name)
            if not math.isfinite(value):
                raise ValueError(f"{field_name} must be a finite number, got {value!r}")
        if self.distill_lambda < 0:
            raise ValueError(f"distill_lambda must be >= 0, got {self.distill_lambda!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``KL(teacher || student)`` of the temperature-softened next-token distributions at the supervised
    positions (those whose next token has a label), averaged per sample, then over the samples that have
    any; 0 for a batch without supervised tokens."""
    mask = labels[:, 1:] != IGNORE_INDEX
    student = F.log_softmax(student_logits[:, :-1, :].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1, :].float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    weights = mask.float()
    per_sample = (per_token * weights).sum(1) / weights.sum(1).clamp(min=1)
    has_target = (weights.sum(1) > 0).float()
    return (per_sample * has_target).sum() / has_target.sum().clamp(min=1)


@torch.no_grad()
def teacher_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the frozen ``teacher`` adapter on ``batch`` (no dropout, no random numbers drawn)."""
    with using_adapter(model, TEACHER):
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@register_method
class LwF(Method):
    """Learning without Forgetting: distil the previous adapter's outputs on the new task's data."""

    name = "lwf"
    Params = LwFParams

    def setup_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        peft_model = continue_lora(model, ctx, adapter_name=STUDENT)
        if ctx.previous_state_dir is not None:
            # load_adapter keeps the active (student) adapter and its trainability; the teacher comes in frozen.
            adapter = ctx.previous_state_dir / ADAPTER_DIR
            peft_model.load_adapter(str(adapter), adapter_name=TEACHER, is_trainable=False)
        return peft_model

    def before_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        leaked = [n for n, p in model.named_parameters() if p.requires_grad and f".{TEACHER}." in n]
        if leaked:
            raise RuntimeError(f"LwF: the teacher adapter must be frozen, but {leaked[0]} is trainable")

    def extra_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any, ctx: TaskContext
    ) -> torch.Tensor | None:
        if ctx.task_index == 0 or self.params.distill_lambda == 0:
            return None
        temperature = self.params.temperature
        kl = distillation_kl(outputs.logits, teacher_logits(model, batch), batch["labels"], temperature)
        return self.params.distill_lambda * temperature**2 * kl

    def state_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for n, p in model.named_parameters() if f".{TEACHER}." not in n and _is_adapter(n, p)]

    def save_state(self, model: torch.nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        # Only the student: it is the next task's starting point and teacher.
        model.save_pretrained(
            str(out_dir / ADAPTER_DIR), selected_adapters=[STUDENT], safe_serialization=True
        )

    def memory_report(self, model: torch.nn.Module) -> dict[str, float]:
        teacher = [p for n, p in model.named_parameters() if f".{TEACHER}." in n]
        numel = sum(full_numel(p) for p in teacher)
        return {
            **super().memory_report(model),
            "lwf_teacher_params": float(numel),
            "lwf_teacher_bytes": float(sum(full_numel(p) * p.element_size() for p in teacher)),
        }


def _is_adapter(name: str, p: torch.nn.Parameter) -> bool:
    return p.requires_grad or "lora_" in name or "modules_to_save" in name
