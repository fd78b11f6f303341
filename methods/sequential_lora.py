"""Sequential LoRA fine-tuning: the lower bound every continual-learning method is compared with.

One LoRA adapter (plus the multimodal projector, when ``model.lora.train_projector``) is trained on each
task in turn, starting from the adapter left by the previous task. Nothing protects earlier tasks, so it
shows how much plain fine-tuning forgets. Hyper-parameters: none beyond the experiment's ``model.lora``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mcl.adapters import ADAPTER_DIR, continue_lora, save_lora
from mcl.methods_api import Method, TaskContext, register_method


@register_method
class SequentialLoRA(Method):
    name = "sequential_lora"

    def setup_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        return continue_lora(model, ctx)

    def save_state(self, model: torch.nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        save_lora(model, out_dir / ADAPTER_DIR)
