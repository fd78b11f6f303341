"""O-LoRA: orthogonal subspace learning for continual learning.

Paper: Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", Findings of EMNLP
2023 (code: github.com/cmnfriend/O-LoRA).

What the method does: every task gets a new LoRA adapter. The adapters of earlier tasks stay frozen and stay
active, so the model's update is the sum of all task adapters and inference needs no task identity. While
task ``t`` trains, its adapter's down-projection ``A_t`` is pushed into a subspace orthogonal to every earlier
``A_i`` of the same layer:

    loss = task loss + lambda_1 * sum_{i<t} sum_layers orth(A_i A_t^T) + lambda_2 * ||adapter t||^2

How it is implemented here:
- Adapters are peft LoRA adapters named ``task0, task1, ...``, saved together (``adapters/<name>/``) after
  every task. A task loads the earlier ones frozen, adds its own, and activates all of them
  (``set_adapter([...])``). peft's ``set_adapter`` with a list makes *every* listed adapter trainable, so
  :meth:`OLoRA.before_task` sets ``requires_grad`` of every parameter explicitly: only the new adapter trains.
- The new adapter's ``A`` is drawn (peft's Kaiming-uniform init, ``B = 0``) from a generator seeded by the
  experiment seed and the task index, so it is the same whether or not ZeRO-3 loaded the model.
- The earlier ``A`` matrices for the orthogonality term are read from the saved safetensors into plain
  tensors (concatenated per layer, no gradient), not taken from the model's parameters: under ZeRO-3 those
  parameters are partitioned outside their module's forward. The new ``A_t`` (and ``B_t`` for the L2 term)
  is used inside a forward hook on its own LoRA module, where ZeRO-3 has it gathered; the hook keeps the
  differentiable terms and :meth:`OLoRA.extra_loss` adds them up after the forward pass. The same path runs
  without DeepSpeed and under ZeRO-2.
- Multimodal projector: a shared, fully trained projector would be one more set of weights every task
  overwrites, undoing the isolation the method is about; per-task projector copies would need the task
  identity at inference, which O-LoRA does not have (all adapters are summed for every input). So when
  ``model.lora.train_projector`` is on, the projector's linear layers get LoRA adapters too, under the same
  per-task freezing and orthogonality constraint as the language model's; when it is off the projector stays
  frozen.

Hyper-parameters (``method.params``):
- ``lambda_1`` (0.5, the paper's / released scripts' value): weight of the orthogonality term.
- ``lambda_2`` (0.0, the released scripts' value): weight of the L2 term on the new adapter's parameters
  (squared L2 norm here; the released code uses the plain norm; with the default 0 it makes no difference).
- ``orthogonality`` (``"abs"``): how the overlap matrix ``O = A_i A_t^T`` is reduced. ``"abs"`` sums
  ``|O|`` as the released code does (the configuration that produced the paper's numbers with
  ``lambda_1 = 0.5``); ``"squared"`` sums ``O**2`` as the paper's equation writes it.
The LoRA shape (rank, alpha, dropout, target modules) is the experiment's ``model.lora``; every task adapter
has that rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mcl.adapters import full_numel, lora_target_modules, peft_lora_config, projector_modules
from mcl.methods_api import LoraConfig, Method, TaskContext, register_method

ADAPTERS_DIR = "adapters"
STATE_FILE = "olora.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ORTHOGONALITY = ("abs", "squared")


@dataclass
class OLoRAParams:
    """O-LoRA hyper-parameters (see the module docstring for the paper's values)."""

    lambda_1: float = field(
        default=0.5, metadata={"help": "Weight of the orthogonality term (>= 0; paper: 0.5)."}
    )
    lambda_2: float = field(
        default=0.0, metadata={"help": "Weight of the L2 term on the new adapter's parameters (>= 0)."}
    )
    orthogonality: str = field(
        default="abs",
        metadata={"help": "Reduction of the overlap A_i A_t^T: abs (released code) or squared (paper)."},
    )

    def __post_init__(self) -> None:
        if not self.lambda_1 >= 0:
            raise ValueError(f"lambda_1: must be >= 0, got {self.lambda_1!r}")
        if not self.lambda_2 >= 0:
            raise ValueError(f"lambda_2: must be >= 0, got {self.lambda_2!r}")
        if self.orthogonality not in _ORTHOGONALITY:
            raise ValueError(
                f"orthogonality: must be one of {', '.join(_ORTHOGONALITY)}, got {self.orthogonality!r}"
            )


def adapter_name(task_index: int) -> str:
    """The name of task ``task_index``'s adapter."""
    return f"task{task_index}"


def projector_linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers inside the multimodal projector."""
    return [
        f"{path}.{sub}" if sub else path
        for path, projector in projector_modules(model)
        for sub, module in projector.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]


def target_regex(model: torch.nn.Module, lora: LoraConfig) -> str:
    """The experiment's LoRA target regex, extended by the projector's linear layers when the projector is
    trained (see the module docstring)."""
    targets = lora_target_modules(model, lora)
    if not lora.train_projector:
        return targets
    names = projector_linear_names(model)
    if not names:
        return targets
    return f"(?:{targets})|(?:{'|'.join(re.escape(n) for n in names)})"


def _seeded_init(model: torch.nn.Module, adapter: str, seed: int) -> None:
    """Re-draw the new adapter's A (peft's Kaiming-uniform init; B stays zero) from a generator seeded by the
    experiment seed and task: the same init however the model was loaded (ZeRO-3's partitioned loading draws
    from the global generator differently)."""
    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                weight = module.lora_A[adapter].weight
                fresh = torch.empty(weight.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                weight.copy_(fresh)


def _is_adapter_param(name: str, adapter: str) -> bool:
    parts = name.split(".")
    return any(p in ("lora_A", "lora_B") and q == adapter for p, q in zip(parts, parts[1:], strict=False))


@register_method
class OLoRA(Method):
    name = "olora"
    Params = OLoRAParams

    def __init__(self, params: OLoRAParams) -> None:
        super().__init__(params)
        self.adapters: list[str] = []  # all adapters of this task, the new one last
        self.old_A: dict[str, torch.Tensor] = {}  # LoRA layer name -> earlier A's stacked (sum r_i, in)
        self._old_cache: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._orth_terms: list[torch.Tensor] = []
        self._l2_terms: list[torch.Tensor] = []
        self._hooks: list[Any] = []

    # -- model -------------------------------------------------------------------------------------------
    def setup_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        from peft import PeftModel, get_peft_model

        new = adapter_name(ctx.task_index)
        old = self._previous_adapters(ctx)
        if new in old:
            raise RuntimeError(
                f"O-LoRA: the previous state already holds adapter {new!r} (task {ctx.task_index})"
            )
        config = peft_lora_config(ctx.lora, target_regex(model, ctx.lora))
        if not old:
            peft_model = get_peft_model(model, config, adapter_name=new)
        else:
            assert ctx.previous_state_dir is not None
            folder = ctx.previous_state_dir / ADAPTERS_DIR
            peft_model = PeftModel.from_pretrained(model, str(folder / old[0]), adapter_name=old[0])
            for name in old[1:]:
                peft_model.load_adapter(str(folder / name), adapter_name=name, is_trainable=False)
            peft_model.add_adapter(new, config)
            self.old_A = self._load_old_A(folder, old)
        self.adapters = [*old, new]
        _seeded_init(peft_model, new, seed=ctx.seed * 1000 + ctx.task_index)
        # All adapters take part in the forward pass (their updates add up); trainability is set in before_task.
        peft_model.base_model.set_adapter(self.adapters)
        self._register_hooks(peft_model, new)
        return peft_model

    def load_for_evaluation(
        self, model: torch.nn.Module, state_dir: Path, ctx: TaskContext
    ) -> torch.nn.Module:
        """Every saved adapter, all active (their updates add up), as after the task's training."""
        from peft import PeftModel

        saved = self._previous_adapters(dataclasses.replace(ctx, previous_state_dir=Path(state_dir)))
        folder = Path(state_dir) / ADAPTERS_DIR
        peft_model = PeftModel.from_pretrained(model, str(folder / saved[0]), adapter_name=saved[0])
        for name in saved[1:]:
            peft_model.load_adapter(str(folder / name), adapter_name=name, is_trainable=False)
        self.adapters = saved
        peft_model.base_model.set_adapter(saved)
        return peft_model

    def before_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        new = self.adapters[-1]
        for name, p in model.named_parameters():
            p.requires_grad_(_is_adapter_param(name, new))

    def _previous_adapters(self, ctx: TaskContext) -> list[str]:
        if ctx.previous_state_dir is None:
            return []
        path = ctx.previous_state_dir / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"O-LoRA: no {STATE_FILE} in the previous state {ctx.previous_state_dir}")
        return list(json.loads(path.read_text())["adapters"])

    @staticmethod
    def _load_old_A(folder: Path, old: list[str]) -> dict[str, torch.Tensor]:
        """Earlier adapters' A matrices from their saved files, stacked per LoRA layer (model names)."""
        from safetensors.torch import load_file

        stacked: dict[str, list[torch.Tensor]] = {}
        for name in old:
            weights = load_file(str(folder / name / _ADAPTER_WEIGHTS))
            for key, value in weights.items():
                if key.endswith(".lora_A.weight"):
                    stacked.setdefault(key[: -len(".lora_A.weight")], []).append(value.float())
        counts = {len(v) for v in stacked.values()}
        if counts != {len(old)}:
            raise RuntimeError(f"O-LoRA: the saved adapters {old} do not cover the same layers")
        return {layer: torch.cat(parts, 0) for layer, parts in stacked.items()}

    def _register_hooks(self, model: torch.nn.Module, new: str) -> None:
        from peft.tuners.lora import LoraLayer

        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or new not in module.lora_A:
                continue
            if self.old_A and name not in self.old_A:
                raise RuntimeError(f"O-LoRA: layer {name} has no adapter from the earlier tasks")
            if self.old_A:
                self._hooks.append(module.lora_A[new].register_forward_hook(self._orthogonality_hook(name)))
            if self.params.lambda_2 > 0:
                for sub in (module.lora_A[new], module.lora_B[new]):
                    self._hooks.append(sub.register_forward_hook(self._l2_hook))

    # -- loss terms (computed in the forward pass, where ZeRO-3 has the new adapter's weights gathered) ----
    def _orthogonality_hook(self, layer: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, _inputs: Any, _output: Any) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            weight = module.weight.float()
            overlap = self._old(layer, weight.device) @ weight.T  # (sum_i r_i, r_t)
            reduced = overlap.abs().sum() if self.params.orthogonality == "abs" else overlap.pow(2).sum()
            self._orth_terms.append(reduced)

        return hook

    def _l2_hook(self, module: torch.nn.Module, _inputs: Any, _output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._l2_terms.append(module.weight.float().pow(2).sum())

    def _old(self, layer: str, device: torch.device) -> torch.Tensor:
        key = (layer, device)
        if key not in self._old_cache:
            self._old_cache[key] = self.old_A[layer].to(device)
        return self._old_cache[key]

    def extra_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any, ctx: TaskContext
    ) -> torch.Tensor | None:
        orth, l2 = self._orth_terms, self._l2_terms
        self._orth_terms, self._l2_terms = [], []
        if not orth and not l2:
            return None
        total = outputs.logits.new_zeros((), dtype=torch.float32)
        if orth:
            total = total + self.params.lambda_1 * torch.stack(orth).sum()
        if l2:
            total = total + self.params.lambda_2 * torch.stack(l2).sum()
        return total

    def after_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._orth_terms, self._l2_terms = [], []

    # -- state -------------------------------------------------------------------------------------------
    def state_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for name, p in model.named_parameters() if "lora_" in name]

    def save_state(self, model: torch.nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir / ADAPTERS_DIR), safe_serialization=True)
        state = {"adapters": self.adapters, "tasks": list(ctx.task_names[: ctx.task_index + 1])}
        (out_dir / STATE_FILE).write_text(json.dumps({**state, "params": asdict(self.params)}, indent=1))

    def memory_report(self, model: torch.nn.Module) -> dict[str, float]:
        adapter_params = frozen = 0
        for name, p in model.named_parameters():
            if "lora_" in name:
                adapter_params += full_numel(p)
                frozen += 0 if p.requires_grad else full_numel(p)
        return {
            "adapters": float(len(self.adapters)),
            "adapter_params": float(adapter_params),
            "frozen_adapter_params": float(frozen),
            "trainable_params": float(adapter_params - frozen),
            "old_A_numel": float(sum(t.numel() for t in self.old_A.values())),
        }
