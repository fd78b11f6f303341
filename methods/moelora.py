"""MoELoRA: a mixture of LoRA experts with a per-token gate, trained sequentially (a CoIN baseline).

Papers: MoELoRA as used for continual instruction tuning in Chen et al., "CoIN: A Benchmark of Continual
Instruction tuNing for Multimodel Large Language Model" (arXiv 2024; NeurIPS 2024 Datasets and Benchmarks),
after the mixture-of-LoRA-experts designs of Liu et al. 2023 ("MOELoRA", multi-task medical applications) and
Luo et al. 2024 ("MoELoRA: contrastive learning guided mixture of experts").

What the method does: each targeted linear layer of the language model gets ``E`` LoRA experts and a gate,
a bias-free linear map of the layer input followed by a softmax over the experts, per token:

    y = base(x) + scaling * sum_e g_e(x) * B_e A_e dropout(x),    g(x) = softmax(W_gate x)

All experts, the gates (and the projector, when trained) are shared by every task and trained through the
stream one task after the other, as CoIN's baseline does: nothing protects earlier tasks, the experts only
give the model room to route different inputs to different low-rank updates. It forgets; it is a baseline.

How it is implemented here: our own module wrapper, :class:`MoELoRALinear`, replaces every ``nn.Linear``
whose name fully matches the LoRA target regex (``model.lora.target_modules``, by default the model
family's language-model projections). It holds the frozen base layer, the experts' ``A`` matrices stacked
as one ``(E*r, in)`` parameter and their ``B`` matrices as one ``(out, E*r)`` parameter (one matmul each
for all experts), and the gate ``nn.Linear(in, E)``. ``B`` starts at zero, so the wrapped model equals the
base model at the start. ``A`` uses peft's LoRA initialisation
(Kaiming-uniform, bound ``1/sqrt(in)``; CoIN draws ``N(0, 0.01)``, the same scale at LLaVA-7B's width
4096); the gate gets ``nn.Linear``'s default initialisation, as in CoIN. Both are drawn from a generator
seeded by the experiment seed and task index, so the init is the same however the model was loaded. The
multimodal projector is trained (shared) when ``model.lora.train_projector`` is on, as CoIN trains it.
State after each task: one safetensors file (experts, gates, projector) and a JSON of the shape; the next
task loads it. The new parameters are plain tensors created after the model is loaded, so
``deepspeed.initialize`` takes them over under ZeRO-2 and ZeRO-3 alike; projector weights loaded under
ZeRO-3 are gathered while they are written.

Hyper-parameters (``method.params``):
- ``num_experts`` (2): experts per layer. CoIN's released MoELoRA scripts (``scripts/CoIN/Train_MOE``) train
  with ``--expert_num 2``; its config class defaults to 4.
- ``expert_rank`` (0): rank of each expert; 0 splits ``model.lora.r`` evenly over the experts as CoIN does
  (``r // expert_num`` per expert, ``r`` must be divisible), so MoELoRA has the parameter budget of one LoRA
  of rank ``r`` plus the gates. The scaling is ``model.lora.alpha / model.lora.r`` either way (CoIN's).
- ``top_k`` (0): 0 mixes all experts (CoIN's dense gate); ``k > 0`` keeps the ``k`` largest gate weights per
  token (ours, optional), renormalised to sum to 1 for ``k >= 2``; ``k = 1`` keeps the raw probability as
  the Switch Transformer does, since a renormalised single weight (always 1) passes no gradient to the gate.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mcl.adapters import full_numel, lora_target_modules, projector_modules
from mcl.methods_api import LoraConfig, Method, TaskContext, register_method

STATE_WEIGHTS = "moelora.safetensors"
STATE_FILE = "moelora.json"


@dataclass
class MoELoRAParams:
    """MoELoRA hyper-parameters (see the module docstring for CoIN's values)."""

    num_experts: int = field(
        default=2, metadata={"help": "LoRA experts per layer (>= 1; CoIN's scripts: 2)."}
    )
    expert_rank: int = field(
        default=0, metadata={"help": "Rank of each expert (>= 0; 0 splits model.lora.r over the experts)."}
    )
    top_k: int = field(
        default=0, metadata={"help": "Gate weights kept per token, in [0, num_experts] (0 = all experts)."}
    )

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts: must be >= 1, got {self.num_experts!r}")
        if self.expert_rank < 0:
            raise ValueError(
                f"expert_rank: must be >= 0 (0 = model.lora.r / num_experts), got {self.expert_rank!r}"
            )
        if not 0 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k: must be in [0, num_experts={self.num_experts}] (0 = all experts), got {self.top_k!r}"
            )


class MoELoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``num_experts`` LoRA experts mixed per token by a softmax gate."""

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        expert_rank: int,
        scaling: float,
        dropout: float = 0.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.num_experts, self.expert_rank = num_experts, expert_rank
        self.scaling, self.top_k = scaling, top_k
        device = base_layer.weight.device
        # Adapters in float32 even on a half-precision base (peft does the same); DeepSpeed casts if it runs bf16.
        shape_a, shape_b = (
            (num_experts * expert_rank, self.in_features),
            (self.out_features, num_experts * expert_rank),
        )
        self.lora_A = nn.Parameter(torch.empty(shape_a, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(shape_b, device=device, dtype=torch.float32))
        self.gate = nn.Linear(self.in_features, num_experts, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Experts' A like peft's LoRA A (Kaiming-uniform with fan-in ``in_features``, one draw covers all
        experts alike), B zero, the gate like ``nn.Linear``'s default."""
        with torch.no_grad():
            for weight in (self.lora_A, self.gate.weight):
                fresh = torch.empty(weight.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                weight.copy_(fresh)
            self.lora_B.zero_()

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights ``(..., num_experts)``: the softmax of the gate; with ``top_k`` only the
        ``k`` largest are kept, renormalised to sum to 1 when ``k >= 2``. A single kept weight stays the raw
        probability (as in the Switch Transformer): renormalised it would be the constant 1, and the gate
        would get no gradient."""
        weights = torch.softmax(self.gate(x.to(self.gate.weight.dtype)).float(), dim=-1)
        if 0 < self.top_k < self.num_experts:
            top = weights.topk(self.top_k, dim=-1)
            weights = torch.zeros_like(weights).scatter(-1, top.indices, top.values)
            if self.top_k > 1:
                weights = weights / weights.sum(-1, keepdim=True)
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        weights = self.gate_weights(x)
        hidden = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., E*r)
        hidden = (
            hidden.unflatten(-1, (self.num_experts, self.expert_rank)) * weights.to(hidden.dtype)[..., None]
        )
        update = F.linear(hidden.flatten(-2), self.lora_B) * self.scaling
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, expert_rank={self.expert_rank}, top_k={self.top_k}"


def wrap_linear_layers(
    model: nn.Module,
    lora: LoraConfig,
    num_experts: int,
    expert_rank: int,
    top_k: int,
    seed: int = 0,
    layer_class: type[MoELoRALinear] = MoELoRALinear,
) -> list[str]:
    """Replace every ``nn.Linear`` whose full name matches the LoRA targets
    (:func:`mcl.adapters.lora_target_modules`) by a ``layer_class`` (:class:`MoELoRALinear` or a subclass
    with its constructor) initialised from a generator seeded by ``seed`` (the same init however the model
    was loaded: ZeRO-3's partitioned loading draws from the global generator differently); returns the
    wrapped names."""
    targets = lora_target_modules(model, lora)
    pattern = re.compile(targets)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and pattern.fullmatch(name) and not isinstance(module, MoELoRALinear)
    ]
    if not names:
        raise ValueError(f"model.lora.target_modules: {targets!r} matches no linear layer of the model")
    generator = torch.Generator().manual_seed(seed)
    scaling = lora.alpha / lora.r
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        wrapped = layer_class(base, num_experts, expert_rank, scaling, lora.dropout, top_k, generator)
        setattr(parent, child, wrapped)
    return names


def _projector_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {
        f"{path}.{name}": p
        for path, projector in projector_modules(model)
        for name, p in projector.named_parameters()
        if ".lora_A" not in f".{name}" and ".lora_B" not in f".{name}"
    }


def _expert_params(model: nn.Module) -> dict[str, nn.Parameter]:
    params: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELoRALinear):
            params[f"{name}.lora_A"] = module.lora_A
            params[f"{name}.lora_B"] = module.lora_B
            params[f"{name}.gate.weight"] = module.gate.weight
    return params


def copy_into(param: nn.Parameter, value: torch.Tensor) -> None:
    """Write a saved tensor into a parameter, gathering it first if ZeRO-3 has partitioned it."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            param.data.copy_(value.to(param.dtype))
        return
    if tuple(param.shape) != tuple(value.shape):
        raise RuntimeError(f"saved state: shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


@register_method
class MoELoRA(Method):
    name = "moelora"
    Params = MoELoRAParams
    layer_class: type[MoELoRALinear] = MoELoRALinear  # what wraps each targeted linear layer

    def __init__(self, params: MoELoRAParams) -> None:
        super().__init__(params)
        self.wrapped: list[str] = []
        self.train_projector = True

    def _expert_rank(self, lora: LoraConfig) -> int:
        if self.params.expert_rank:
            return self.params.expert_rank
        if lora.r % self.params.num_experts:
            raise ValueError(
                f"method.params.num_experts: model.lora.r={lora.r} does not split evenly over "
                f"{self.params.num_experts} experts; set method.params.expert_rank or change model.lora.r"
            )
        return lora.r // self.params.num_experts

    def setup_model(self, model: nn.Module, ctx: TaskContext) -> nn.Module:
        rank = self._expert_rank(ctx.lora)
        self.train_projector = ctx.lora.train_projector
        self.wrapped = wrap_linear_layers(
            model,
            ctx.lora,
            self.params.num_experts,
            rank,
            self.params.top_k,
            seed=ctx.seed * 1000 + ctx.task_index,
            layer_class=self.layer_class,
        )
        if ctx.previous_state_dir is not None:
            self._load_state(model, ctx.previous_state_dir, rank)
        return model

    def _load_state(self, model: nn.Module, state_dir: Path, rank: int) -> None:
        from safetensors.torch import load_file

        saved = json.loads((state_dir / STATE_FILE).read_text())
        shape = {"num_experts": self.params.num_experts, "expert_rank": rank}
        if {k: saved[k] for k in shape} != shape:
            raise ValueError(
                f"method.params: the previous state has {saved['num_experts']} experts of rank "
                f"{saved['expert_rank']}, this task {shape['num_experts']} of rank {shape['expert_rank']}"
            )
        tensors = load_file(str(state_dir / STATE_WEIGHTS))
        targets = self._state_params(model)
        missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
        if missing or unexpected:
            raise RuntimeError(
                f"MoELoRA state {state_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, param in targets.items():
            copy_into(param, tensors[name])

    def _state_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = _expert_params(model)
        if self.train_projector:
            params.update(_projector_params(model))
        return params

    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        trainable = {id(p) for p in self._state_params(model).values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)

    def state_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(self._state_params(model).values())

    def save_state(self, model: nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in self._state_params(model).items()
        }
        save_file(tensors, str(out_dir / STATE_WEIGHTS))
        shape = {
            "num_experts": self.params.num_experts,
            "expert_rank": self._expert_rank(ctx.lora),
            "top_k": self.params.top_k,
            "scaling": ctx.lora.alpha / ctx.lora.r,
            "train_projector": self.train_projector,
            "wrapped": self.wrapped,
            "tasks": list(ctx.task_names[: ctx.task_index + 1]),
        }
        (out_dir / STATE_FILE).write_text(json.dumps({**shape, "params": asdict(self.params)}, indent=1))

    def memory_report(self, model: nn.Module) -> dict[str, float]:
        experts = gates = 0
        for name, p in _expert_params(model).items():
            if name.endswith("gate.weight"):
                gates += full_numel(p)
            else:
                experts += full_numel(p)
        projector = (
            sum(full_numel(p) for p in _projector_params(model).values()) if self.train_projector else 0
        )
        trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
        return {
            "expert_params": float(experts),
            "gate_params": float(gates),
            "projector_params": float(projector),
            "trainable_params": float(trainable),
            "moe_layers": float(len(self.wrapped)),
        }

    def moe_layers(self, model: nn.Module) -> dict[str, MoELoRALinear]:
        """The wrapped layers by name (for diagnostics and tests)."""
        return {name: m for name, m in model.named_modules() if isinstance(m, MoELoRALinear)}
