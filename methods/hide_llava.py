"""HiDe-LLaVA: one LoRA slice per task, fused in the lower layers and mixed per sample at the top layer.

Paper: Guo et al., "HiDe-LLaVA: Hierarchical Decoupling for Continual Instruction Tuning of Multimodal Large
Language Model" (ACL 2025). Code: ``Ghy0501/HiDe-LLaVA`` and MCITlib's copy (``Ghy0501/MCITlib``, ``HiDe/``),
which is how MCITlib benchmarks it on MLLM-DCL and UCIT. File references below are to MCITlib's copy.

What the method does (a layer-wise CKA analysis finds the top layer task-specific, the others task-general):

- **Task slices.** Every targeted linear layer of the language model holds one LoRA slice per task of the
  stream: ``A_i`` (``r_t x in``) and ``B_i`` (``out x r_t``), ``A_i ~ N(0, 0.01)``, ``B_i = 0``
  (``HiDeMOELinearA/B`` and the init in ``HiDe/HiDe/peft/tuners/clitmoelora.py``). The scaling is
  ``model.lora.alpha / model.lora.r`` (``lora_alpha / r`` of the whole LoRA there, ``r`` split over the
  tasks). Task ``t`` trains slice ``t`` alone, in every layer; the forward pass uses only that slice while
  training (``clitmoelora.py`` lines 407-410), so earlier slices get no gradient. They are frozen here as well
  (not in the optimiser): they stay bit-identical.
- **Anchors.** While task ``t`` trains, the mean image feature and the mean text feature of its training
  samples are kept as the task's anchors (``llava/model/llava_arch.py`` lines 183-195). The text is the
  instruction only: the chat template and the answer are cut off (lines 167-178).
- **Task-general fusion (lower layers).** At inference every layer below the top one uses the sum of the seen
  slices' ``A`` and the sum of their ``B``: ``dW = s * (sum_i B_i)(sum_i A_i)``, cross terms included
  (``HiDeMOELinearA.forward`` / ``HiDeMOELinearB.forward``, ``clitmoelora.py`` lines 462-528, merge weight 1).
- **Task-specific expansion (top layer).** The last decoder layer keeps the slices apart and mixes them per
  sample: ``y = W x + s * sum_i w_i B_i A_i x`` with ``w = softmax(((cos(f_img, a_img_i) + cos(f_txt,
  a_txt_i)) / 2) / 0.1)`` (``llava_arch.py`` lines 196-228; ``clitmoelora.py`` lines 416-424), computed once
  per sample at the prompt's forward and kept for every generated token.

Deviations, and why:

- **Features.** HiDe loads a separate CLIP (``clip-vit-large-patch14-336``): the image feature is
  ``CLIPVisionModelWithProjection.image_embeds``, the text feature ``CLIPTextModel.pooler_output`` of the
  instruction. mcl loads no second model: the image feature is the pooled output of the model's own vision
  tower (for LLaVA the same CLIP's CLS token after its last layer norm, without the projection), the text
  feature the mean of the language model's input embeddings over the instruction's tokens. Both come from
  frozen modules, so anchors stay comparable across tasks. They are read by forward hooks on the vision tower
  and the input embeddings, so selection costs no extra forward pass.
- **The softmax runs over the tasks seen so far.** HiDe's runs over the benchmark's total task count, where
  unseen slots have random anchors and zero ``B``: they take a little weight and add nothing. Over the seen
  tasks, the seen slices' weights sum to 1, the intent of the rule.
- **Anchors are exact means over all ranks** (sums and counts all-reduced after the task). HiDe keeps each
  GPU's own running mean in a bf16 counter (it saturates near 1024 samples) and saves rank 0's.
- **Weights per sample** in a batch. HiDe evaluates with batch 1 and takes a ``.max()`` over the batch.
- **The projector** is trained and shared when ``model.lora.train_projector`` is on (HiDe trains it on every
  task at ``mm_projector_lr``), as MoELoRA's is.
- **Slice rank.** ``task_rank`` 0 splits ``model.lora.r`` over the stream's tasks (``r // tasks``; HiDe's
  scripts: rank 96 over 6 UCIT tasks, 160 over 5 MLLM-DCL tasks).

Hyper-parameters (``method.params``): ``task_rank`` (0 = ``model.lora.r // tasks``), ``temperature`` (0.1),
``image_weight`` (0.5: the weight of the image cosine, ``1 - image_weight`` goes to the text cosine).

:mod:`methods.disco` reuses the slices and anchors with another inference rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mcl.adapters import full_numel, lora_target_modules, projector_modules, vision_tower
from mcl.data import build_prompt
from mcl.methods_api import LoraConfig, Method, TaskContext, register_method
from methods.moelora import copy_into

STATE_WEIGHTS = "task_slices.safetensors"
STATE_FILE = "task_slices.json"
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_PROBES = ("what is shown ?", "the image .")  # differ in their first and last tokens in any tokenizer


@dataclass
class HiDeParams:
    """HiDe-LLaVA hyper-parameters (see the module docstring for the released code's values)."""

    task_rank: int = field(
        default=0, metadata={"help": "Rank of each task's LoRA slice (>= 0; 0 = model.lora.r // tasks)."}
    )
    temperature: float = field(
        default=0.1, metadata={"help": "Softmax temperature of the per-sample task weights (> 0)."}
    )
    image_weight: float = field(
        default=0.5,
        metadata={"help": "Weight of the image cosine in the task similarity, in [0, 1] (text: the rest)."},
    )

    def __post_init__(self) -> None:
        if self.task_rank < 0:
            raise ValueError(f"task_rank: must be >= 0 (0 = model.lora.r // tasks), got {self.task_rank!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ValueError(f"image_weight: must be in [0, 1], got {self.image_weight!r}")


# -- the layer ------------------------------------------------------------------------------------------
class TaskSliceLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one LoRA slice per task (``lora_A_<i>``, ``lora_B_<i>``: plain parameters
    of this module, so ZeRO-3 gathers them with it).

    Training uses slice ``current`` alone. At inference the layer either fuses the ``seen`` slices
    (``mixing = "fused"``: ``(sum B_i)(sum A_i)``) or mixes them with the per-sample weights of ``selector``
    (``mixing = "mixed"``)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        num_slots: int,
        slot_rank: int,
        scaling: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.num_slots, self.slot_rank, self.scaling = num_slots, slot_rank, scaling
        device = base_layer.weight.device
        for i in range(num_slots):  # adapters in float32 (as peft's); DeepSpeed casts them if it runs bf16
            a = torch.empty(slot_rank, self.in_features, device=device, dtype=torch.float32)
            b = torch.zeros(self.out_features, slot_rank, device=device, dtype=torch.float32)
            setattr(self, f"lora_A_{i}", nn.Parameter(a))
            setattr(self, f"lora_B_{i}", nn.Parameter(b))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.current, self.seen = 0, 1
        self.mixing = "fused"
        self.selector: TaskSelector | None = None
        self.reset_parameters(generator)

    def slot_a(self, i: int) -> nn.Parameter:
        return getattr(self, f"lora_A_{i}")

    def slot_b(self, i: int) -> nn.Parameter:
        return getattr(self, f"lora_B_{i}")

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Every slice: ``A ~ N(0, 0.01)``, ``B = 0`` (``clitmoelora.py``'s init)."""
        with torch.no_grad():
            for i in range(self.num_slots):
                a = self.slot_a(i)
                a.copy_(torch.randn(a.shape, generator=generator, dtype=torch.float32) * 0.01)
                self.slot_b(i).zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        hidden = self.dropout(x).to(torch.float32)
        if self.training:
            update = F.linear(F.linear(hidden, self.slot_a(self.current)), self.slot_b(self.current))
        elif self.mixing == "fused":
            a = torch.stack([self.slot_a(i) for i in range(self.seen)]).sum(0)
            b = torch.stack([self.slot_b(i) for i in range(self.seen)]).sum(0)
            update = F.linear(F.linear(hidden, a), b)
        else:
            if self.selector is None:
                raise RuntimeError("a mixed task-slice layer has no task selector")
            weights = self.selector.weights(x.shape[0]).to(hidden.device)  # (n, seen)
            a = torch.cat([self.slot_a(i) for i in range(self.seen)])  # (seen * r, in)
            b = torch.cat([self.slot_b(i) for i in range(self.seen)], dim=1)  # (out, seen * r)
            low = F.linear(hidden, a).unflatten(-1, (self.seen, self.slot_rank))
            shape = (weights.shape[0],) + (1,) * (low.dim() - 3) + (self.seen, 1)
            update = F.linear((low * weights.view(shape)).flatten(-2), b)
        return result + (update * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return f"slots={self.num_slots}, slot_rank={self.slot_rank}, mixing={self.mixing}"


# -- features and anchors ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptLayout:
    """Where the instruction sits in a prompt's token ids: ``after_image`` template tokens between the last
    image token and the question, then the question, then the template's ``suffix`` (e.g. ``ASSISTANT:``)."""

    image_token_id: int
    after_image: int
    suffix: tuple[int, ...]
    pad_token_id: int


def prompt_layout(processor: Any, image_token_id: int) -> PromptLayout:
    """The layout of the model's chat template, found by tokenising it around two probe questions."""
    tokenizer = processor.tokenizer
    a, b = (list(tokenizer(build_prompt(processor, q), add_special_tokens=False)["input_ids"]) for q in _PROBES)
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    images = [i for i, t in enumerate(a[:prefix]) if t == image_token_id]
    if not images:
        raise ValueError(
            f"the chat template puts no image token (id {image_token_id}) before the question; the "
            "instruction's tokens cannot be told apart from the template's"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else -1
    return PromptLayout(image_token_id, prefix - images[-1] - 1, tuple(a[len(a) - suffix :]), pad)


def question_mask(input_ids: torch.Tensor, layout: PromptLayout) -> torch.Tensor:
    """``(n, L)`` bool: the instruction's tokens of each row (after the image and the template's tokens after
    it, before the first occurrence of the template's suffix: the answer and padding are left out, left or
    right padded alike). A row without an image token or suffix falls back to all its non-padding tokens."""
    mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    k = len(layout.suffix)
    for row, ids in enumerate(input_ids.tolist()):
        images = [i for i, t in enumerate(ids) if t == layout.image_token_id]
        start = images[-1] + 1 + layout.after_image if images else 0
        end = next((i for i in range(start, len(ids) - k + 1) if tuple(ids[i : i + k]) == layout.suffix), -1)
        if images and end > start:
            mask[row, start:end] = True
        else:
            mask[row] = torch.tensor([t != layout.pad_token_id for t in ids])
    return mask


def text_features(embeddings: torch.Tensor, input_ids: torch.Tensor, layout: PromptLayout) -> torch.Tensor:
    """``(n, hidden)``: the mean input embedding over each row's instruction tokens, in float32."""
    mask = question_mask(input_ids.cpu(), layout).to(embeddings.device)
    summed = (embeddings.detach().float() * mask[..., None]).sum(1)
    return summed / mask.sum(1, keepdim=True).clamp(min=1)


def image_features(output: Any, rows: int | None = None) -> torch.Tensor:
    """``(n, d)`` pooled image features from a vision tower's output: its ``pooler_output`` (CLIP, SigLIP:
    the class token after the last layer norm), else the mean of ``last_hidden_state`` over the tokens."""
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        hidden = getattr(output, "last_hidden_state", output)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(
                "the vision tower gives no per-image output (pooler_output or a (images, tokens, dim) "
                f"last_hidden_state), but {type(output).__name__}; task anchors need one feature per image"
            )
        pooled = hidden.mean(1)
    return pooled.detach().float()


class TaskSelector:
    """Reads each prompt's image and instruction features (forward hooks on the vision tower and the input
    embeddings), keeps the task anchors, and turns features into per-sample task weights.

    While the model trains (``accumulate`` set), the hooks add the features to task ``current``'s sums.
    At inference, a prompt's forward (more than one token) starts a new selection; the first mixed layer
    computes the weights from the features read, and the generated tokens reuse them."""

    def __init__(
        self, num_slots: int, text_dim: int, image_dim: int, layout: PromptLayout, params: HiDeParams
    ) -> None:
        self.layout, self.params = layout, params
        self.text_sum = torch.zeros(num_slots, text_dim, dtype=torch.float64)
        self.image_sum = torch.zeros(num_slots, image_dim, dtype=torch.float64)
        self.text_count = torch.zeros(num_slots, dtype=torch.float64)
        self.image_count = torch.zeros(num_slots, dtype=torch.float64)
        self.current, self.seen = 0, 1
        self.accumulate = False
        self._text: torch.Tensor | None = None
        self._image: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.hooks: list[Any] = []

    # hooks
    def attach(self, embeddings: nn.Module, tower: nn.Module) -> None:
        self.detach()
        self.hooks = [
            embeddings.register_forward_hook(self._on_embeddings),
            tower.register_forward_hook(self._on_image),
        ]

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _on_embeddings(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        input_ids = args[0] if args else None
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
            return  # a generated token: the prompt's selection stays
        text = text_features(output, input_ids, self.layout)
        self._text, self._weights = text, None
        if self.accumulate and module.training:
            self.text_sum[self.current] += text.double().sum(0).cpu()
            self.text_count[self.current] += text.shape[0]

    def _on_image(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        image = image_features(output)
        self._image, self._weights = image, None
        if self.accumulate and module.training:
            self.image_sum[self.current] += image.double().sum(0).cpu()
            self.image_count[self.current] += image.shape[0]

    # anchors and weights
    def anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The seen tasks' mean text and image features, ``(seen, dim)`` each."""
        s = self.seen
        text = self.text_sum[:s] / self.text_count[:s, None].clamp(min=1)
        image = self.image_sum[:s] / self.image_count[:s, None].clamp(min=1)
        return text.float(), image.float()

    def similarity(self, text: torch.Tensor | None, image: torch.Tensor | None) -> torch.Tensor:
        """``(n, seen)``: ``(1 - image_weight) * cos(text, text anchors) + image_weight * cos(image, image
        anchors)``; a missing modality (no image in the prompt) leaves its term out."""
        text_anchor, image_anchor = self.anchors()
        w = self.params.image_weight
        terms: list[torch.Tensor] = []
        if text is not None and w < 1.0:
            terms.append((1.0 - w) * F.cosine_similarity(text[:, None, :].cpu(), text_anchor[None], dim=-1))
        if image is not None and w > 0.0:
            terms.append(w * F.cosine_similarity(image[:, None, :].cpu(), image_anchor[None], dim=-1))
        if not terms:
            raise RuntimeError("no prompt features were read before a mixed layer needed the task weights")
        return torch.stack(terms).sum(0)

    def weights(self, rows: int) -> torch.Tensor:
        """The per-sample task weights of the current prompt, ``(rows, seen)``."""
        if self._weights is None:
            sim = self.similarity(self._text, self._image)
            self._weights = torch.softmax(sim / self.params.temperature, dim=-1)
            self.last_weights = self._weights
        if self._weights.shape[0] != rows:
            raise RuntimeError(f"task weights for {self._weights.shape[0]} samples, the layer sees {rows}")
        return self._weights

    def reset(self) -> None:
        self._text = self._image = self._weights = self.last_weights = None

    # state
    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "anchors.text_sum": self.text_sum.clone(),
            "anchors.image_sum": self.image_sum.clone(),
            "anchors.text_count": self.text_count.clone(),
            "anchors.image_count": self.image_count.clone(),
        }

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for key in ("text_sum", "image_sum", "text_count", "image_count"):
            value = tensors[f"anchors.{key}"].to(torch.float64)
            if value.shape != getattr(self, key).shape:
                expected = tuple(getattr(self, key).shape)
                raise RuntimeError(f"anchors.{key}: saved shape {tuple(value.shape)}, expected {expected}")
            setattr(self, key, value.clone())

    def sum_over_ranks(self, device: torch.device) -> None:
        """Add up task ``current``'s anchor sums and counts over the data-parallel ranks (each rank read its
        own share of the task's samples; the earlier tasks' rows are already totals)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for key in ("text_sum", "image_sum", "text_count", "image_count"):
            row = getattr(self, key)[self.current].to(device)
            dist.all_reduce(row)
            getattr(self, key)[self.current] = row.cpu()


# -- helpers ---------------------------------------------------------------------------------------------
def wrap_task_slices(
    model: nn.Module, lora: LoraConfig, num_slots: int, slot_rank: int, seed: int
) -> list[str]:
    """Replace every targeted ``nn.Linear`` (:func:`mcl.adapters.lora_target_modules`) by a
    :class:`TaskSliceLinear`, initialised from a generator seeded by ``seed``; returns the wrapped names."""
    targets = lora_target_modules(model, lora)
    pattern = re.compile(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
    if not names:
        raise ValueError(f"model.lora.target_modules: {targets!r} matches no linear layer of the model")
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        scaling = lora.alpha / lora.r
        setattr(parent, child, TaskSliceLinear(base, num_slots, slot_rank, scaling, lora.dropout, generator))
    return names


def top_layer_names(names: list[str]) -> list[str]:
    """The wrapped layers of the last decoder layer (the highest ``.layers.<i>.`` index among ``names``)."""
    indexed = [(int(m.group(1)), n) for n in names if (m := _LAYER_INDEX.search(n))]
    if not indexed:
        raise ValueError(f"no wrapped layer sits in a numbered decoder layer (e.g. {names[0]!r})")
    top = max(i for i, _ in indexed)
    return [n for i, n in indexed if i == top]


def slice_layers(model: nn.Module) -> dict[str, TaskSliceLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TaskSliceLinear)}


def image_token_id(model: nn.Module) -> int:
    config = model.config
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    raise ValueError(f"model type {config.model_type!r} names no image token (image_token_id) in its config")


def selection_metrics(records: list[dict[str, Any]], ctx: TaskContext) -> dict[str, float]:
    """``selection_acc_<task>``: percent of a seen task's test samples whose selected task (``selected_task``,
    the largest weight) is their own; ``selection_acc``: their mean (from the second task: a choice)."""
    if ctx.task_index == 0:
        return {}
    metrics: dict[str, float] = {}
    for i, task in enumerate(ctx.task_names[: ctx.task_index + 1]):
        own = [r for r in records if r["task"] == task and r.get("selected_task", -1) >= 0]
        if own:
            metrics[f"selection_acc_{task}"] = 100.0 * sum(r["selected_task"] == i for r in own) / len(own)
    if metrics:
        metrics["selection_acc"] = sum(metrics.values()) / len(metrics)
    return metrics


# -- the method ------------------------------------------------------------------------------------------
@register_method
class HiDeLLaVA(Method):
    name = "hide_llava"
    Params = HiDeParams
    # Which layers mix the slices per sample at inference ("top": the last decoder layer, the rest fused).
    mixed_layers: ClassVar[str] = "top"

    def __init__(self, params: HiDeParams) -> None:
        super().__init__(params)
        self.wrapped: list[str] = []
        self.train_projector = True
        self.selector: TaskSelector | None = None

    def _slot_rank(self, lora: LoraConfig, tasks: int) -> int:
        rank = self.params.task_rank or lora.r // tasks
        if rank < 1:
            raise ValueError(
                f"method.params.task_rank: model.lora.r={lora.r} is smaller than the stream's {tasks} tasks, so "
                "it leaves no rank per task; set method.params.task_rank or raise model.lora.r"
            )
        return rank

    def setup_model(self, model: nn.Module, ctx: TaskContext) -> nn.Module:
        if ctx.processor is None:
            raise ValueError(f"{self.name} reads the instruction's tokens and needs the model's processor")
        slots = ctx.num_tasks
        rank = self._slot_rank(ctx.lora, slots)
        self.train_projector = ctx.lora.train_projector
        self.wrapped = wrap_task_slices(model, ctx.lora, slots, rank, seed=ctx.seed * 1000 + ctx.task_index)
        embeddings = model.get_input_embeddings()
        _, tower = vision_tower(model)
        image_dim = int(model.config.vision_config.hidden_size)
        layout = prompt_layout(ctx.processor, image_token_id(model))
        self.selector = TaskSelector(slots, embeddings.embedding_dim, image_dim, layout, self.params)
        self.selector.attach(embeddings, tower)
        if ctx.previous_state_dir is not None:
            self._load_state(model, Path(ctx.previous_state_dir), rank)
        self._set_task(model, ctx.task_index)
        return model

    def _set_task(self, model: nn.Module, t: int) -> None:
        assert self.selector is not None
        self.selector.current, self.selector.seen = t, t + 1
        mixed = set(self.wrapped if self.mixed_layers == "all" else top_layer_names(self.wrapped))
        for name, layer in slice_layers(model).items():
            layer.current, layer.seen = t, t + 1
            layer.mixing = "mixed" if name in mixed else "fused"
            layer.selector = self.selector

    def _load_state(self, model: nn.Module, state_dir: Path, rank: int) -> None:
        from safetensors.torch import load_file

        saved = json.loads((state_dir / STATE_FILE).read_text())
        slots = self.selector.text_sum.shape[0] if self.selector is not None else -1
        if (saved["task_rank"], saved["num_slots"]) != (rank, slots):
            raise ValueError(
                f"{state_dir}: holds slices of rank {saved['task_rank']} for {saved['num_slots']} tasks; this "
                f"run needs rank {rank} for {slots} tasks (method.params.task_rank, model.lora.r, the stream)"
            )
        tensors = load_file(str(state_dir / STATE_WEIGHTS))
        targets = self._state_params(model)
        missing = sorted(set(targets) - set(tensors))
        if missing:
            raise RuntimeError(f"{state_dir}: task-slice state lacks {missing[:5]}")
        for name, param in targets.items():
            copy_into(param, tensors[name])
        assert self.selector is not None
        self.selector.load(tensors)

    def _state_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for name, layer in slice_layers(model).items():
            for i in range(layer.num_slots):
                params[f"{name}.lora_A_{i}"] = layer.slot_a(i)
                params[f"{name}.lora_B_{i}"] = layer.slot_b(i)
        if self.train_projector:
            for path, projector in projector_modules(model):
                params.update({f"{path}.{n}": p for n, p in projector.named_parameters()})
        return params

    def _trainable(self, model: nn.Module, t: int) -> set[int]:
        ids = set()
        for layer in slice_layers(model).values():
            ids |= {id(layer.slot_a(t)), id(layer.slot_b(t))}
        if self.train_projector:
            ids |= {id(p) for _, projector in projector_modules(model) for p in projector.parameters()}
        return ids

    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        """Only task ``t``'s slices (and the shared projector, when trained) train; the anchors of task ``t``
        start from zero."""
        trainable = self._trainable(model, ctx.task_index)
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        assert self.selector is not None
        t = ctx.task_index
        for key in ("text_sum", "image_sum", "text_count", "image_count"):
            getattr(self.selector, key)[t] = 0
        self.selector.accumulate = True

    def step_state(self, ctx: TaskContext) -> dict[str, Any] | None:
        assert self.selector is not None
        return self.selector.tensors()

    def load_step_state(self, state: dict[str, Any], ctx: TaskContext) -> None:
        assert self.selector is not None
        self.selector.load(state)

    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        """The task's anchors: the features read while it trained, summed over the ranks."""
        assert self.selector is not None
        self.selector.accumulate = False
        self.selector.sum_over_ranks(next(iter(model.parameters())).device)

    def generate(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        generate_kwargs: dict[str, Any],
        ctx: TaskContext,
    ) -> tuple[torch.Tensor, dict[str, list[Any]]]:
        """Greedy answers; each sample's task weights are computed at its prompt's forward (the selector's
        hooks), and the task of the largest weight is kept with the prediction (``selected_task``)."""
        assert self.selector is not None
        self.selector.reset()
        out = model.generate(**batch, **generate_kwargs)
        weights = self.selector.last_weights
        n = batch["input_ids"].shape[0]
        chosen = weights.argmax(-1).tolist() if weights is not None else [-1] * n
        self.selector.reset()
        return out[:, batch["input_ids"].shape[1] :], {"selected_task": chosen}

    def eval_metrics(self, records: list[dict[str, Any]], ctx: TaskContext) -> dict[str, float]:
        return selection_metrics(records, ctx)

    def state_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(self._state_params(model).values())

    def save_state(self, model: nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        """Every slice of every layer, the projector when trained, and the anchors' sums and counts (one
        safetensors file); the shape in a JSON."""
        from safetensors.torch import save_file

        assert self.selector is not None
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self._state_params(model).items()}
        tensors.update(self.selector.tensors())
        save_file(tensors, str(out_dir / STATE_WEIGHTS))
        layers = slice_layers(model)
        first = next(iter(layers.values()))
        state = {
            "method": self.name,
            "num_slots": first.num_slots,
            "task_rank": first.slot_rank,
            "scaling": first.scaling,
            "task_names": list(ctx.task_names),
            "trained_tasks": list(ctx.task_names[: ctx.task_index + 1]),
            "mixed_layers": sorted(n for n, m in layers.items() if m.mixing == "mixed"),
            "train_projector": self.train_projector,
            "params": asdict(self.params),
        }
        (out_dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    def memory_report(self, model: nn.Module) -> dict[str, float]:
        layers = slice_layers(model)
        per_task = sum(full_numel(m.slot_a(0)) + full_numel(m.slot_b(0)) for m in layers.values())
        trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
        return {
            "slice_params_per_task": float(per_task),
            "slice_params_total": float(per_task * (next(iter(layers.values())).num_slots if layers else 0)),
            "trainable_params": float(trainable),
        }
