"""Joint multi-task training: the upper bound of a stream.

After task t, a fresh LoRA adapter is trained on the union of the training data of tasks 0..t, as if all
data seen so far were available at once. Its last row of the accuracy matrix is the usual "joint" upper
bound. Hyper-parameters: none beyond the experiment's ``model.lora``; costs grow with the number of tasks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mcl.adapters import ADAPTER_DIR, load_lora, new_lora, save_lora
from mcl.methods_api import Method, TaskContext, register_method


@register_method
class JointTraining(Method):
    name = "joint"

    def training_tasks(self, task_index: int) -> list[int]:
        return list(range(task_index + 1))

    def setup_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        return new_lora(model, ctx.lora)

    def load_for_evaluation(
        self, model: torch.nn.Module, state_dir: Path, ctx: TaskContext
    ) -> torch.nn.Module:
        # setup_model starts a fresh adapter each task; evaluation serves the one saved.
        return load_lora(model, state_dir / ADAPTER_DIR, trainable=False)

    def save_state(self, model: torch.nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        save_lora(model, out_dir / ADAPTER_DIR)
