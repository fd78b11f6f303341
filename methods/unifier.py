"""UNIFIER: per-scenario vision branches fused by a shared projector, kept consistent by a KL constraint.

Paper: K. Jiang, S. Huang, X. Chen, J. Shao, H. Zhang, P. Luo, X. Li, "Multimodal Continual Learning with
MLLMs from Multi-scenario Perspectives" (arXiv 2511.18507, 2025; ICML 2026), which also introduces the MSVQA
benchmark (high-altitude, underwater, low-altitude and indoor scenarios, 5- and 20-step streams).

What the method does:

* **Vision Representation Expansion (VRE).** In every block of the vision encoder, K bottleneck branches
  (one per scenario: down-projection, activation, up-projection) read the same input as the block's MLP.
  Their outputs are concatenated and fused by a projector shared by all scenarios (``Linear(K * d, d)``),
  and the result is added to the MLP's output. Training scenario k updates branch k and the shared projector
  only; the other branches and the base vision tower stay frozen, so what a branch learnt for its scenario
  is never overwritten, and later tasks of the same scenario keep training the same branch (knowledge
  accumulates within a scenario). Inference is a single pass with every branch active (no routing).
* **Vision Consistency Constraint (VCC).** Each branch's output is averaged over tokens (a vector over
  channels), turned into a distribution over channels (softmax), and the KL divergence of every seen
  scenario's branch from the mean of those distributions is penalised; so is the KL between the outputs of
  the shared projector as it was at the start of the task (a frozen copy) and as it is now. The loss is
  ``task + lambda * VCC``. Both terms are exactly zero when the branches agree and the projector has not
  moved (:func:`branch_consistency_kl`, :func:`projector_kl`).

How it is implemented here:

* The vision tower is the one the model-family table names (:func:`mcl.adapters.vision_tower`; or the
  outermost module named ``vision_module`` when set, for a model of no known family), and in it
  :func:`find_vision_blocks` takes the encoder blocks, i.e. the members of a ``ModuleList`` with the family's
  MLP child (:func:`mcl.adapters.vision_mlp_names`) whose first ``Linear`` reads the hidden size the last
  one writes. This covers CLIP and SigLIP (``vision_tower.encoder.layers[i].mlp``), Qwen2.5-VL
  (``visual.blocks[i].mlp``, whose inputs are 2-D ``(tokens, hidden)``), InternVL and others; patch mergers
  and pooling heads (not in a block list) are left alone. The hidden size comes from
  ``in_features`` of the MLP's first ``Linear`` (also valid under ZeRO-3, where weights are partitioned).
* The branches of a block are a :class:`ScenarioBranches` child module of the block (``unifier_branches``)
  applied by a forward hook on the MLP, so the base model's parameter names are untouched. Up-projections
  start at zero (the model's output is unchanged until a branch is trained); the projector starts as K
  identity blocks (a new branch first acts like a plain adapter added to the MLP; ours). The number of
  branches is the number of scenarios of the whole stream, all created at the first task with a seeded
  generator, so every rank and every restart builds the same tensors; branches of unseen scenarios output
  zero until their scenario comes.
* Scenarios: by default every distinct task name is a scenario. ``scenarios`` (a list of names) instead maps
  a task to the first scenario its name starts with (MSVQA's 20-step streams repeat scenarios:
  ``aerial_2`` trains branch ``aerial`` again).
* Language model: the facts we hold about the paper describe the vision side only, while the answers of
  its benchmark (counts, names, boxes) and the methods it is compared with (QUAD among them) need a trained
  language side. Measured on the tiny LLaVA, first task of the generated stream: with the language model
  and the multimodal projector frozen, the branches alone reach 17.5% (55% at ``train.lr=0.02``); also
  training the multimodal projector gives 97.5%, a LoRA on the language model 100%. So by default
  (``language_lora=True``) one LoRA on the language model (the experiment's ``model.lora``, with the
  multimodal projector when ``model.lora.train_projector``) is trained through the stream as in sequential
  LoRA fine-tuning: the other methods' budget plus the branches. With ``language_lora=False`` the language
  model stays frozen and only the branches, the shared projectors and (per ``model.lora.train_projector``)
  the multimodal projector learn.
* Limitation: the isolation is of parameters, not of function. Every branch is active at inference and the
  shared parts (block projectors, LoRA, multimodal projector) are trained on the current scenario only, so
  when scenarios need different answers to similar questions (the generated stream) the latest scenario
  overrides the earlier ones much as in sequential fine-tuning; the VCC compares channel distributions of
  the current data and does not prevent it.
* State (``state/``): ``unifier_branches.safetensors`` (every branch of every block and the shared
  projectors), ``unifier.json`` (scenarios, shapes; checked on reload), the LoRA adapter (``adapter/``) or,
  without LoRA, ``multimodal_projector.safetensors``. Works under DeepSpeed ZeRO-2 and ZeRO-3 (the branch
  modules are ordinary parameters added after loading, which DeepSpeed partitions like peft's).

Hyper-parameters (``method.params``); the paper's text we hold gives no values, so every default is ours:

* ``bottleneck`` (16): width of each branch's down-projection; small, as in adapters.
* ``activation`` (``gelu``): the branch non-linearity (``gelu``, ``relu``, ``silu`` or ``tanh``).
* ``vcc_weight`` (1.0): lambda, the weight of the VCC term.
* ``vcc_temperature`` (1.0): softmax temperature over channels in both KL terms.
* ``scenarios`` (None): scenario names, see above; None = one scenario per distinct task name.
* ``language_lora`` (True): train a LoRA on the language model too, see above.
* ``vision_module`` (""): name of the vision tower module, for a model the model-family table does not know.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcl.adapters import (
    ADAPTER_DIR,
    continue_lora,
    full_numel,
    projector_modules,
    save_lora,
    vision_mlp_names,
    vision_tower,
)
from mcl.methods_api import ConfigError, Method, TaskContext, TrainingData, TrainingRequest, register_method

BRANCH_ATTR = "unifier_branches"
BRANCHES_FILE = "unifier_branches.safetensors"
META_FILE = "unifier.json"
PROJECTOR_FILE = "multimodal_projector.safetensors"
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class UnifierParams:
    """UNIFIER's hyper-parameters (see the module docstring; all defaults are ours)."""

    bottleneck: int = field(default=16, metadata={"help": "Width of each branch's down-projection (>= 1)."})
    activation: str = field(
        default="gelu", metadata={"help": f"Branch non-linearity, one of {', '.join(ACTIVATIONS)}."}
    )
    vcc_weight: float = field(default=1.0, metadata={"help": "lambda, the weight of the VCC term (>= 0)."})
    vcc_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature over channels in both KL terms (> 0)."}
    )
    scenarios: list[str] | None = field(
        default=None,
        metadata={
            "help": "Scenario names (a task trains the first its name starts with); null: one per task."
        },
    )
    language_lora: bool = field(
        default=True, metadata={"help": "Also train a LoRA on the language model through the stream."}
    )
    vision_module: str = field(
        default="", metadata={"help": "Name of the vision tower module, for a model of no known family."}
    )

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck: must be an integer >= 1, got {self.bottleneck!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if not self.vcc_weight >= 0:
            raise ValueError(f"vcc_weight: must be a number >= 0, got {self.vcc_weight!r}")
        if not self.vcc_temperature > 0:
            raise ValueError(f"vcc_temperature: must be a number > 0, got {self.vcc_temperature!r}")
        if self.scenarios is not None:
            names = self.scenarios
            if not names or not all(n for n in names):
                raise ValueError(f"scenarios: must be a non-empty list of non-empty names, got {names!r}")
            if len(set(names)) != len(names):
                raise ValueError(f"scenarios: names must be unique, got {names!r}")
            self.scenarios = list(names)


# -- the Vision Consistency Constraint (pure functions) ------------------------------------------------------


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, per row; exactly 0 where ``q`` equals ``p`` element for element."""
    tiny = torch.finfo(q.dtype).tiny
    return (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(tiny))).sum(-1)


def branch_consistency_kl(branch_features: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Mean over branches (and rows) of KL(p_k || mean_j p_j), where p_k is the softmax over channels of
    branch k's token-averaged features (each ``(rows, channels)``). Exactly zero when all branches agree."""
    if not branch_features:
        raise ValueError("branch_consistency_kl needs at least one branch")
    probs = [F.softmax(f.float() / temperature, dim=-1) for f in branch_features]
    # The mean as the first distribution plus the mean deviation: bit-identical to it when all agree.
    mean = probs[0] + torch.stack([p - probs[0] for p in probs]).mean(0)
    return torch.stack([_kl(p, mean) for p in probs]).mean()


def projector_kl(old: torch.Tensor, new: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of KL(p_old || p_new) of the token-averaged projector outputs ``(rows, channels)``
    (softmax over channels); ``old`` is the target. Exactly zero when the outputs are equal."""
    p_old = F.softmax(old.detach().float() / temperature, dim=-1)
    p_new = F.softmax(new.float() / temperature, dim=-1)
    return _kl(p_old, p_new).mean()


def token_average(x: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens, channels)`` -> ``(batch, channels)``; a 2-D ``(tokens, channels)`` input (Qwen2-VL's
    packed vision tokens) -> ``(1, channels)``; deeper inputs average every dim between first and last."""
    if x.dim() == 2:
        return x.mean(0, keepdim=True)
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)


# -- Vision Representation Expansion ----------------------------------------------------------------------


class ScenarioBranches(nn.Module):
    """K bottleneck branches (down, activation, up) beside one vision block's MLP and the shared projector
    ``Linear(K * hidden, hidden)`` fusing their concatenated outputs.

    Up-projections start at zero (the block's output is unchanged) and the projector as K identity blocks.
    While gradients are enabled the module records, per forward, the token-averaged outputs of the branches
    in :attr:`vcc_branches` and of the projector (new and frozen start-of-task copy) for the VCC.
    """

    def __init__(
        self,
        hidden: int,
        bottleneck: int,
        num_branches: int,
        activation: str,
        generator: torch.Generator,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.hidden, self.bottleneck, self.num_branches = hidden, bottleneck, num_branches
        self.down = nn.ModuleList(
            nn.utils.skip_init(nn.Linear, hidden, bottleneck, device=device, dtype=dtype)
            for _ in range(num_branches)
        )
        self.act = ACTIVATIONS[activation]()
        self.up = nn.ModuleList(
            nn.utils.skip_init(nn.Linear, bottleneck, hidden, device=device, dtype=dtype)
            for _ in range(num_branches)
        )
        self.projector = nn.utils.skip_init(
            nn.Linear, num_branches * hidden, hidden, device=device, dtype=dtype
        )
        with torch.no_grad():
            bound = 1.0 / math.sqrt(hidden)
            for down, up in zip(self.down, self.up, strict=True):
                down.weight.copy_(_uniform((bottleneck, hidden), bound, generator))
                down.bias.copy_(_uniform((bottleneck,), bound, generator))
                up.weight.zero_()
                up.bias.zero_()
            self.projector.weight.copy_(torch.eye(hidden).repeat(1, num_branches))
            self.projector.bias.zero_()
        self.register_buffer("old_weight", self.projector.weight.detach().clone(), persistent=False)
        self.register_buffer("old_bias", self.projector.bias.detach().clone(), persistent=False)
        self.key = ""  # the block's path inside the vision tower (names the tensors in saved state)
        self.vcc_branches: list[int] = []
        self.records: list[dict[str, Any]] = []

    def snapshot_projector(self) -> None:
        """Freeze a copy of the projector as the start-of-task reference of the VCC."""
        with torch.no_grad():
            self.old_weight = self.projector.weight.detach().clone()
            self.old_bias = self.projector.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [up(self.act(down(x))) for down, up in zip(self.down, self.up, strict=True)]
        joined = torch.cat(outs, dim=-1)
        fused = self.projector(joined)
        if torch.is_grad_enabled() and self.vcc_branches:
            with torch.no_grad():
                old = F.linear(joined, self.old_weight.to(joined.dtype), self.old_bias.to(joined.dtype))
            self.records.append(
                {
                    "branches": [token_average(outs[k]) for k in self.vcc_branches],
                    "new": token_average(fused),
                    "old": token_average(old),
                }
            )
        return fused


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def _add_branch_output(
    branches: ScenarioBranches, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> torch.Tensor:
    """Forward hook on a block's MLP: add the fused branch output (the branches read the MLP's input)."""
    x = args[0] if args else next(iter(kwargs.values()))
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"UNIFIER: the MLP {type(module).__name__} returned {type(output).__name__}, not a tensor"
        )
    return output + branches(x)


@dataclass
class VisionBlock:
    """One encoder block of the vision tower: its path inside the tower, the block and its MLP."""

    key: str
    block: nn.Module
    mlp: nn.Module
    hidden: int


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def find_vision_tower(model: nn.Module, name: str = "") -> tuple[str, nn.Module]:
    """The vision tower and its path: the outermost module named ``name`` if given, else the one the
    model-family table names (:func:`mcl.adapters.vision_tower`)."""
    try:
        return vision_tower(model, name)
    except ConfigError as exc:
        field_name = "method.params.vision_module"
        raise ConfigError(
            f"{field_name}: {exc}; set {field_name} to the name of its vision encoder module"
        ) from None


def find_vision_blocks(model: nn.Module, vision_module: str = "") -> tuple[str, list[VisionBlock]]:
    """The vision tower's path and its encoder blocks: members of a ``ModuleList`` that have the family's
    MLP child (:func:`mcl.adapters.vision_mlp_names`) mapping the hidden size back onto itself."""
    tower_name, tower = find_vision_tower(model, vision_module)
    mlp_names = vision_mlp_names(model)
    blocks: list[VisionBlock] = []
    for list_name, container in tower.named_modules():
        if not isinstance(container, nn.ModuleList):
            continue
        for index, block in enumerate(container):
            for child_name in mlp_names:
                mlp = getattr(block, child_name, None)
                linears = _linears(mlp) if isinstance(mlp, nn.Module) else []
                if linears and linears[0].in_features == linears[-1].out_features:
                    key = f"{list_name}.{index}" if list_name else str(index)
                    blocks.append(VisionBlock(key, block, mlp, linears[0].in_features))
                    break
    if not blocks:
        raise ConfigError(
            f"method.params.vision_module: the vision tower {tower_name!r} ({type(tower).__name__}) has no "
            f"encoder blocks with an MLP child named {', '.join(mlp_names)}"
        )
    return tower_name, blocks


def attach_branches(
    model: nn.Module,
    num_branches: int,
    bottleneck: int,
    activation: str,
    seed: int,
    vision_module: str = "",
) -> list[ScenarioBranches]:
    """Add a :class:`ScenarioBranches` to every encoder block of ``model``'s vision tower (in place).

    Each block's branches are initialised from a generator seeded with ``seed`` and the block's position,
    so every rank builds the same tensors. Returns the branch modules in block order.
    """
    _, blocks = find_vision_blocks(model, vision_module)
    added = []
    for position, vb in enumerate(blocks):
        if hasattr(vb.block, BRANCH_ATTR):
            raise RuntimeError(f"UNIFIER branches are already attached to vision block {vb.key!r}")
        weight = _linears(vb.mlp)[0].weight
        generator = torch.Generator().manual_seed(seed * 1_000_003 + position)
        branches = ScenarioBranches(
            vb.hidden, bottleneck, num_branches, activation, generator, weight.dtype, weight.device
        )
        branches.key = vb.key
        vb.block.add_module(BRANCH_ATTR, branches)
        vb.mlp.register_forward_hook(partial(_add_branch_output, branches), with_kwargs=True)
        added.append(branches)
    return added


def branch_modules(model: nn.Module) -> list[ScenarioBranches]:
    """Every :class:`ScenarioBranches` of ``model`` (also inside a peft wrapper), in block order."""
    return [m for m in model.modules() if isinstance(m, ScenarioBranches)]


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


# -- the method -------------------------------------------------------------------------------------------


@register_method
class Unifier(Method):
    """UNIFIER (see the module docstring)."""

    name = "unifier"
    Params = UnifierParams

    def __init__(self, params: UnifierParams) -> None:
        super().__init__(params)
        self.params: UnifierParams = params
        self._scenarios: list[str] = []  # this stream's scenarios, set by setup_model (memory_report)

    # -- scenarios ---------------------------------------------------------------------------------------
    def scenario_names(self, task_names: Sequence[str]) -> list[str]:
        """The scenarios (one branch each): ``scenarios`` if given, else the distinct task names in order."""
        if self.params.scenarios is not None:
            return list(self.params.scenarios)
        return list(dict.fromkeys(task_names))

    def scenario_index(self, task_name: str, task_names: Sequence[str]) -> int:
        """The branch that trains on task ``task_name``."""
        scenarios = self.scenario_names(task_names)
        if self.params.scenarios is None:
            return scenarios.index(task_name)
        for index, scenario in enumerate(scenarios):
            if task_name.startswith(scenario):
                return index
        raise ConfigError(
            f"method.params.scenarios: task {task_name!r} starts with none of the scenarios "
            f"{', '.join(map(repr, scenarios))}"
        )

    def seen_scenarios(self, ctx: TaskContext) -> list[int]:
        """Branches of the scenarios trained so far, the current one included (the VCC compares these)."""
        return sorted({self.scenario_index(n, ctx.task_names) for n in ctx.task_names[: ctx.task_index + 1]})

    def training_data(self, request: TrainingRequest) -> TrainingData:
        names = [t.name for t in request.tasks]
        for name in names:  # fail in the driver, before any worker starts, if a task has no scenario
            self.scenario_index(name, names)
        return super().training_data(request)

    # -- worker side ---------------------------------------------------------------------------------------
    def _meta(self, task_names: Sequence[str], branches: Sequence[ScenarioBranches]) -> dict[str, Any]:
        return {
            "scenarios": self.scenario_names(task_names),
            "bottleneck": self.params.bottleneck,
            "activation": self.params.activation,
            "blocks": {b.key: b.hidden for b in branches},
            "language_lora": self.params.language_lora,
        }

    def setup_model(self, model: nn.Module, ctx: TaskContext) -> nn.Module:
        p = self.params
        scenarios = self.scenario_names(ctx.task_names)
        self.scenario_index(ctx.task_name, ctx.task_names)
        self._scenarios = scenarios
        branches = attach_branches(
            model, len(scenarios), p.bottleneck, p.activation, ctx.seed, p.vision_module
        )
        previous = ctx.previous_state_dir
        if previous is not None:
            self._load_branches(previous, ctx.task_names, branches)
        seen = self.seen_scenarios(ctx)
        for b in branches:
            b.snapshot_projector()
            b.vcc_branches = seen if p.vcc_weight > 0 else []
        if p.language_lora:
            return continue_lora(model, ctx)
        if previous is not None and ctx.lora.train_projector:
            self._load_projector(model, previous)
        return model

    def _load_branches(
        self, state_dir: Path, task_names: Sequence[str], branches: list[ScenarioBranches]
    ) -> None:
        from safetensors.torch import load_file

        saved = json.loads((state_dir / META_FILE).read_text())
        expected = self._meta(task_names, branches)
        for key in ("scenarios", "bottleneck", "activation", "blocks", "language_lora"):
            if saved.get(key) != expected[key]:
                raise ConfigError(
                    f"method.params: the saved UNIFIER state in {state_dir} has {key}={saved.get(key)!r} but "
                    f"this run has {expected[key]!r}; resume with the parameters it was trained with"
                )
        tensors = load_file(str(state_dir / BRANCHES_FILE))
        for b in branches:
            own = {k[len(b.key) + 1 :]: v for k, v in tensors.items() if k.startswith(b.key + ".")}
            b.load_state_dict(own, strict=True)

    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        """Train branch k (this task's scenario) and the shared projectors; freeze every other branch and the
        base vision tower. The language side is left as peft set it (LoRA), or frozen but for the multimodal
        projector (per ``model.lora.train_projector``) without LoRA."""
        current = self.scenario_index(ctx.task_name, ctx.task_names)
        if not self.params.language_lora:
            for param in model.parameters():
                param.requires_grad = False
            if ctx.lora.train_projector:
                for _, module in multimodal_projectors(model):
                    module.requires_grad_(True)
        for b in branch_modules(model):
            for k in range(b.num_branches):
                for param in (*b.down[k].parameters(), *b.up[k].parameters()):
                    param.requires_grad = k == current
            for param in b.projector.parameters():
                param.requires_grad = True
            b.records.clear()

    def extra_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any, ctx: TaskContext
    ) -> torch.Tensor | None:
        """lambda * VCC, averaged over the vision blocks (each block: branch consistency + projector KL)."""
        if self.params.vcc_weight == 0:
            return None
        terms = []
        temperature = self.params.vcc_temperature
        for b in branch_modules(model):
            for record in b.records:
                consistency = branch_consistency_kl(record["branches"], temperature)
                terms.append(consistency + projector_kl(record["old"], record["new"], temperature))
            b.records.clear()
        if not terms:
            return None
        return self.params.vcc_weight * torch.stack(terms).mean()

    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        for b in branch_modules(model):
            b.records.clear()

    def state_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        params = {id(p): p for p in super().state_parameters(model)}
        for b in branch_modules(model):
            params.update({id(p): p for p in b.parameters()})
        if not self.params.language_lora:
            for _, module in multimodal_projectors(model):
                params.update({id(p): p for p in module.parameters()})
        return list(params.values())

    def save_state(self, model: nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        branches = branch_modules(model)
        tensors = {
            f"{b.key}.{name}": p.detach().to("cpu").clone().contiguous()
            for b in branches
            for name, p in b.named_parameters()
        }
        save_file(tensors, str(out_dir / BRANCHES_FILE))
        (out_dir / META_FILE).write_text(json.dumps(self._meta(ctx.task_names, branches), indent=2))
        if self.params.language_lora:
            save_lora(model, out_dir / ADAPTER_DIR)
        elif ctx.lora.train_projector:
            projector = {
                f"{path}.{name}": p.detach().to("cpu").clone().contiguous()
                for path, module in multimodal_projectors(model)
                for name, p in module.named_parameters()
            }
            save_file(projector, str(out_dir / PROJECTOR_FILE))

    def _load_projector(self, model: nn.Module, state_dir: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(state_dir / PROJECTOR_FILE))
        for path, module in multimodal_projectors(model):
            own = {k[len(path) + 1 :]: v for k, v in tensors.items() if k.startswith(path + ".")}
            module.load_state_dict(own, strict=True)

    def memory_report(self, model: nn.Module) -> dict[str, float]:
        """Branch parameters per scenario (``branch_params_<scenario>``), the shared projectors, their frozen
        start-of-task copies (a buffer), the LoRA, peft's trained copies of saved modules (the multimodal
        projector) and the method's extra parameters in total (branches + projectors + LoRA + copies)."""
        report = super().memory_report(model)
        branches = branch_modules(model)
        names = [_metric_name(s) for s in self._scenarios]
        per_branch = [0] * len(names)
        projector = old_copy = 0
        for b in branches:
            for k in range(b.num_branches):
                per_branch[k] += sum(full_numel(p) for p in (*b.down[k].parameters(), *b.up[k].parameters()))
            projector += sum(full_numel(p) for p in b.projector.parameters())
            old_copy += b.old_weight.numel() + b.old_bias.numel()
        for name, count in zip(names, per_branch, strict=True):
            report[f"branch_params_{name}"] = float(count)
        lora = sum(full_numel(p) for n, p in model.named_parameters() if "lora_" in n)
        saved_modules = sum(full_numel(p) for n, p in model.named_parameters() if "modules_to_save" in n)
        report.update(
            branch_params_total=float(sum(per_branch)),
            shared_projector_params=float(projector),
            old_projector_numel=float(old_copy),
            lora_params=float(lora),
            saved_module_params=float(saved_modules),
            extra_params=float(sum(per_branch) + projector + lora + saved_modules),
        )
        return report


def multimodal_projectors(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The multimodal projector modules of ``model`` with their full paths
    (:func:`mcl.adapters.projector_modules`)."""
    return projector_modules(model)
