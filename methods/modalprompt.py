"""ModalPrompt: a few prompt tokens per task instead of LoRA, chosen per sample by image and text prototypes.

Paper: Zeng et al., "ModalPrompt: Dual-Modality Guided Prompt for Continual Learning of Large Multimodal
Models" (EMNLP 2025). Code: ``AuroraZengfh/ModalPrompt`` and MCITlib's copy (``Ghy0501/MCITlib``,
``ModalPrompt/``). File references are to MCITlib's copy unless they name upstream.

What the method does:

- **Prompts.** Every task gets ``prompt_length`` new token embeddings (10 on UCIT, 20 on MLLM-DCL), each a copy
  of a random vocabulary embedding (``add_prompt_tokens``, ``llava/model/language_model/ModalPrompt.py``
  lines 114-133). They are placed right after the beginning-of-sequence token, before the rest of the prompt
  and the image (``llava/model/llava_arch.py`` lines 219-221). The whole model stays frozen (the projector too);
  task ``t`` trains only its own prompt and its own prototype transform; the earlier tasks' prompts and
  transforms are frozen (``set_cur_task``, ``training_step``'s reset of the other rows).
- **Prototypes.** A task's transform (``Linear(H, H) -> SiLU -> Linear(H, d)``, ModalPrompt.py lines 101-106) maps
  its prompt embeddings into the feature space; their mean over the prompt tokens is the task's prototype.
  Training pulls the current prototype to the task's image and text features: the loss adds
  ``(1 - cos(image, prototype)) + (1 - cos(text, prototype))`` (llava_arch.py lines 241-242, weight 1 each,
  ``llava_trainer.py`` line 272).
- **Dual-modality guided selection.** A sample's score for task ``k`` is ``0.5 cos(image, prototype_k) + 0.5
  cos(text, prototype_k)`` (llava_arch.py lines 208-215). At inference the ``transfer_num`` best tasks' prompts
  are concatenated, the best closest to the text; while task ``t >= transfer_num`` trains, the current prompt
  follows the ``transfer_num - 1`` best earlier ones (upstream ``llava_arch.py`` lines 223-254; before that,
  every learnt prompt in task order). Prompt *fusion* is this concatenation. The inference cost is bounded:
  at most ``transfer_num`` prompts, whatever the number of tasks.

Deviations, and why:

- **Features.** ModalPrompt loads a separate CLIP: ``image_embeds`` (projected, 768) and the text tower's
  ``pooler_output`` of the instruction (768), one shared 768-d space. mcl loads no second model: the image
  feature is the pooled output of the model's own vision tower, the text feature the mean input embedding of
  the instruction's tokens (:mod:`methods.hide_llava`'s features). Their sizes differ, so the transform's output
  has one part per modality (``text_dim + image_dim``) and each cosine uses its own part.
- **Prompt rows** are parameters beside the frozen embedding table (ids after the vocabulary), not rows added
  to it and reset after every step: the same forward, and no risk of the released code's empty reset mask for
  the last task, which leaves that task's prompt untrained.
- **Tasks chain.** MCITlib's scripts for tasks 2+ never pass ``--previous_task_model_path``, so every task
  starts from fresh prompts and the earlier ones are lost at evaluation; here every task loads the previous
  state, as the method intends.
- **transfer_num** is 3 as in the paper and upstream; MCITlib hard-codes 1 (``transfer_num: 1`` gives it).
- The baseline evaluation (the untrained model) inserts no prompt.

Hyper-parameters (``method.params``): ``prompt_length`` (10), ``transfer_num`` (3), ``image_weight`` (0.5),
``feature_loss_weight`` (1.0). The learning rate is ``train.lr`` (the released runs train the prompts at
``mm_projector_lr``, 2e-5, for 10 epochs per task).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcl.adapters import full_numel, vision_tower
from mcl.data import IGNORE_INDEX
from mcl.methods_api import Method, TaskContext, register_method
from methods.hide_llava import (
    PromptLayout,
    image_features,
    image_token_id,
    prompt_layout,
    selection_metrics,
    text_features,
)
from methods.moelora import copy_into

STATE_WEIGHTS = "modalprompt.safetensors"
STATE_FILE = "modalprompt.json"


@dataclass
class ModalPromptParams:
    """ModalPrompt hyper-parameters (see the module docstring for the released code's values)."""

    prompt_length: int = field(default=10, metadata={"help": "Prompt tokens per task (>= 1; UCIT 10, DCL 20)."})
    transfer_num: int = field(
        default=3, metadata={"help": "Prompts concatenated per sample (>= 1; paper 3, MCITlib 1)."}
    )
    image_weight: float = field(
        default=0.5, metadata={"help": "Weight of the image cosine in the selection score, in [0, 1]."}
    )
    feature_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of each (1 - cos) prototype term while training (>= 0)."}
    )

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ValueError(f"prompt_length: must be >= 1, got {self.prompt_length!r}")
        if self.transfer_num < 1:
            raise ValueError(f"transfer_num: must be >= 1, got {self.transfer_num!r}")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ValueError(f"image_weight: must be in [0, 1], got {self.image_weight!r}")
        if not self.feature_loss_weight >= 0:
            raise ValueError(f"feature_loss_weight: must be >= 0, got {self.feature_loss_weight!r}")


class PromptEmbedding(nn.Module):
    """The model's (frozen) input embedding plus ``num_slots`` prompts of ``length`` rows (``prompt_<t>``, token
    ids ``vocab + t * length + i``) and each task's prototype transform. The prompts are plain parameters of
    this module, so ZeRO-3 gathers them with its forward."""

    def __init__(self, base: nn.Embedding, num_slots: int, length: int, out_dim: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.vocab, self.num_slots, self.length = base.num_embeddings, num_slots, length
        hidden = base.embedding_dim
        device = base.weight.device
        for t in range(num_slots):
            setattr(self, f"prompt_{t}", nn.Parameter(torch.zeros(length, hidden, device=device)))
        self.transforms = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim)) for _ in range(num_slots)
        )
        with torch.no_grad():
            for transform in self.transforms:
                for layer in (transform[0], transform[2]):
                    for p in (layer.weight, layer.bias):
                        bound = 1 / layer.in_features**0.5  # nn.Linear's default init, from the seeded generator
                        p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)

    @property
    def weight(self) -> torch.Tensor:  # the vocabulary's table, for code that reads it (tied heads, resizing)
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def prompt(self, t: int) -> nn.Parameter:
        return getattr(self, f"prompt_{t}")

    def prompt_ids(self, t: int, device: Any = None) -> torch.Tensor:
        return torch.arange(self.vocab + t * self.length, self.vocab + (t + 1) * self.length, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_prompt = input_ids >= self.vocab
        out = self.base(input_ids.clamp(max=self.vocab - 1))
        if not bool(is_prompt.any()):
            return out
        table = torch.cat([self.prompt(t) for t in range(self.num_slots)])
        rows = table[(input_ids - self.vocab).clamp(min=0, max=table.shape[0] - 1)]
        return torch.where(is_prompt[..., None], rows.to(out.dtype), out)

    def prototypes(self, upto: int) -> torch.Tensor:
        """``(upto, out_dim)``: each of the first ``upto`` tasks' transformed prompt, averaged over its tokens."""
        return torch.stack([self.transforms[t](self.prompt(t).float()).mean(0) for t in range(upto)])


def insert_prompts(
    batch: dict[str, torch.Tensor], prompt_ids: torch.Tensor, bos_token_id: int | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``batch`` with each row's ``prompt_ids`` (``(n, k)``) inserted after its first attended token if that is
    the beginning-of-sequence token, else before it (left or right padded alike); per-token inputs get ones
    (attention mask), ``IGNORE_INDEX`` (labels) or zeros. Returns the batch and each row's insertion position."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n, length = ids.shape
    k = prompt_ids.shape[1]
    start = mask.long().argmax(1)
    if bos_token_id is not None:
        start = start + (ids.gather(1, start[:, None])[:, 0] == bos_token_id).long()
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if not (isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape):
            out[key] = value
            continue
        if key == "input_ids":
            middle = prompt_ids.to(value.dtype)
        elif key == "attention_mask":
            middle = torch.ones(n, k, dtype=value.dtype, device=value.device)
        elif key == "labels":
            middle = torch.full((n, k), IGNORE_INDEX, dtype=value.dtype, device=value.device)
        else:
            middle = torch.zeros(n, k, dtype=value.dtype, device=value.device)
        rows = [torch.cat([value[i, : start[i]], middle[i], value[i, start[i] :]]) for i in range(n)]
        out[key] = torch.stack(rows)
    return out, start


def drop_inserted(values: torch.Tensor, start: torch.Tensor, k: int) -> torch.Tensor:
    """``values`` (``(n, length + k, ...)``) without the ``k`` positions inserted at each row's ``start``."""
    n, total = values.shape[:2]
    positions = torch.arange(total - k, device=values.device)[None, :].expand(n, -1)
    keep = positions + (positions >= start.to(values.device)[:, None]).long() * k
    index = keep.view(n, total - k, *([1] * (values.dim() - 2))).expand(n, total - k, *values.shape[2:])
    return values.gather(1, index)


@register_method
class ModalPrompt(Method):
    name = "modalprompt"
    Params = ModalPromptParams

    def __init__(self, params: ModalPromptParams) -> None:
        super().__init__(params)
        self.embedding: PromptEmbedding | None = None
        self.layout: PromptLayout | None = None
        self.tower: nn.Module | None = None
        self.text_dim = self.image_dim = 0
        self.bos: int | None = None
        self.task = 0
        self._pending: dict[str, Any] = {}
        self._hooks: list[Any] = []

    # -- model -----------------------------------------------------------------------------------------
    def setup_model(self, model: nn.Module, ctx: TaskContext) -> nn.Module:
        if ctx.processor is None:
            raise ValueError("modalprompt reads the instruction's tokens and needs the model's processor")
        for p in model.parameters():
            p.requires_grad_(False)
        base = model.get_input_embeddings()
        self.text_dim = base.embedding_dim
        self.image_dim = int(model.config.vision_config.hidden_size)
        generator = torch.Generator().manual_seed(ctx.seed * 1000 + 17)
        self.embedding = PromptEmbedding(
            base, ctx.num_tasks, self.params.prompt_length, self.text_dim + self.image_dim, generator
        )
        self._init_prompts(base, generator)
        model.set_input_embeddings(self.embedding)
        _, self.tower = vision_tower(model)
        self.layout = prompt_layout(ctx.processor, image_token_id(model))
        self.bos = ctx.processor.tokenizer.bos_token_id
        self.task = ctx.task_index
        if ctx.previous_state_dir is not None:
            self._load_state(Path(ctx.previous_state_dir))
        if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3: each transform reads its prompt
            import deepspeed

            for t, transform in enumerate(self.embedding.transforms):
                deepspeed.zero.register_external_parameter(transform, self.embedding.prompt(t))
        for handle in self._hooks:
            handle.remove()
        self._hooks = [
            model.register_forward_pre_hook(self._insert_for_training, with_kwargs=True),
            model.register_forward_hook(self._drop_for_training),
        ]
        return model

    def _init_prompts(self, base: nn.Embedding, generator: torch.Generator) -> None:
        """Every prompt row a copy of a random vocabulary row (``add_prompt_tokens``), seeded."""
        import contextlib

        assert self.embedding is not None
        gathered = contextlib.nullcontext()
        if hasattr(base.weight, "ds_id"):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([base.weight])
        with gathered, torch.no_grad():
            table = base.weight.detach().float()
            for t in range(self.embedding.num_slots):
                rows = torch.randint(0, self.embedding.vocab, (self.embedding.length,), generator=generator)
                self.embedding.prompt(t).copy_(table[rows.to(table.device)])

    def _state_params(self) -> dict[str, nn.Parameter]:
        assert self.embedding is not None
        return {n: p for n, p in self.embedding.named_parameters() if not n.startswith("base.")}

    def _load_state(self, state_dir: Path) -> None:
        from safetensors.torch import load_file

        saved = json.loads((state_dir / STATE_FILE).read_text())
        if saved["prompt_length"] != self.params.prompt_length:
            raise ValueError(
                f"method.params.prompt_length: {state_dir} holds prompts of {saved['prompt_length']} tokens, "
                f"this task has {self.params.prompt_length}"
            )
        tensors = load_file(str(state_dir / STATE_WEIGHTS))
        params = self._state_params()
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise RuntimeError(f"{state_dir}: ModalPrompt state lacks {missing[:5]}")
        for name, param in params.items():
            copy_into(param, tensors[name])

    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        """Only task ``t``'s prompt and transform train."""
        assert self.embedding is not None
        t = ctx.task_index
        for p in model.parameters():
            p.requires_grad_(False)
        self.embedding.prompt(t).requires_grad_(True)
        for p in self.embedding.transforms[t].parameters():
            p.requires_grad_(True)

    # -- features and selection -------------------------------------------------------------------------
    def _features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.embedding is not None and self.layout is not None and self.tower is not None
        with torch.no_grad():
            ids = batch["input_ids"]
            text = text_features(self.embedding.base(ids.clamp(max=self.embedding.vocab - 1)), ids, self.layout)
            image = image_features(self.tower(batch["pixel_values"]))
        return text, image

    def scores(self, text: torch.Tensor, image: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """``(n, tasks)``: ``(1 - w) cos(text, prototype's text part) + w cos(image, its image part)``."""
        w = self.params.image_weight
        text_part, image_part = prototypes[:, : self.text_dim], prototypes[:, self.text_dim :]
        cos_text = F.cosine_similarity(text[:, None, :].float(), text_part[None].float(), dim=-1)
        cos_image = F.cosine_similarity(image[:, None, :].float(), image_part[None].float(), dim=-1)
        return (1.0 - w) * cos_text + w * cos_image

    def _chosen_ids(self, chosen: torch.Tensor) -> torch.Tensor:
        """``(n, k * length)`` token ids of each row's chosen tasks (``(n, k)``), in that order."""
        assert self.embedding is not None
        table = torch.stack([self.embedding.prompt_ids(t) for t in range(self.embedding.num_slots)])
        return table[chosen.cpu()].flatten(1)

    # -- training: prompts inserted in the forward, their logits dropped after it -------------------------------
    def _insert_for_training(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        if not module.training or "input_ids" not in kwargs:
            return None
        assert self.embedding is not None
        t, k = self.task, self.params.transfer_num
        text, image = self._features(kwargs)
        prototypes = self.embedding.prototypes(t + 1)
        n = kwargs["input_ids"].shape[0]
        if t < k:  # every learnt prompt, in task order (upstream: task <= transfer_num - 1)
            chosen = torch.arange(t + 1).expand(n, -1)
        else:  # the transfer_num - 1 best earlier prompts (the best last), then the current one
            best = self.scores(text, image, prototypes[:t].detach()).topk(k - 1, dim=-1).indices.flip(-1)
            chosen = torch.cat([best.cpu(), torch.full((n, 1), t)], dim=1)
        ids = self._chosen_ids(chosen).to(kwargs["input_ids"].device)
        new, start = insert_prompts(kwargs, ids, self.bos)
        self._pending = {"start": start, "k": ids.shape[1], "text": text, "image": image, "proto": prototypes[t]}
        return args, new

    def _drop_for_training(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not module.training or "start" not in self._pending:
            return None
        output.logits = drop_inserted(output.logits, self._pending["start"], self._pending["k"])
        return output

    def extra_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any, ctx: TaskContext
    ) -> torch.Tensor | None:
        """``feature_loss_weight * ((1 - mean cos(image, prototype)) + (1 - mean cos(text, prototype)))`` with
        the current task's prototype (its parts per modality)."""
        pending, self._pending = self._pending, {}
        if "proto" not in pending:
            return None
        proto = pending["proto"]
        text_part, image_part = proto[: self.text_dim], proto[self.text_dim :]
        cos_text = F.cosine_similarity(pending["text"].float(), text_part[None], dim=-1).mean()
        cos_image = F.cosine_similarity(pending["image"].float(), image_part[None], dim=-1).mean()
        return self.params.feature_loss_weight * ((1.0 - cos_image) + (1.0 - cos_text))

    # -- inference ------------------------------------------------------------------------------------------
    def generate(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        generate_kwargs: dict[str, Any],
        ctx: TaskContext,
    ) -> tuple[torch.Tensor, dict[str, list[Any]]]:
        """The ``transfer_num`` best tasks' prompts (the best closest to the text) inserted, one ``generate``;
        the best task is kept with each prediction (``selected_task``). The baseline stage inserts nothing."""
        assert self.embedding is not None
        n = batch["input_ids"].shape[0]
        if ctx.stage == "baseline":
            out = model.generate(**batch, **generate_kwargs)
            return out[:, batch["input_ids"].shape[1] :], {"selected_task": [-1] * n}
        seen = ctx.task_index + 1
        text, image = self._features(batch)
        with torch.no_grad():
            scores = self.scores(text, image, self.embedding.prototypes(seen))
        chosen = scores.topk(min(self.params.transfer_num, seen), dim=-1).indices.flip(-1)
        prompted, _ = insert_prompts(batch, self._chosen_ids(chosen).to(batch["input_ids"].device), self.bos)
        out = model.generate(**prompted, **generate_kwargs)
        return out[:, prompted["input_ids"].shape[1] :], {"selected_task": chosen[:, -1].tolist()}

    def eval_metrics(self, records: list[dict[str, Any]], ctx: TaskContext) -> dict[str, float]:
        return selection_metrics(records, ctx)

    # -- state ------------------------------------------------------------------------------------------------
    def state_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(self._state_params().values())

    def save_state(self, model: nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        """Every task slot's prompt and transform (one safetensors file) and the shape (JSON)."""
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self._state_params().items()}
        save_file(tensors, str(out_dir / STATE_WEIGHTS))
        state = {
            "prompt_length": self.params.prompt_length,
            "num_slots": self.embedding.num_slots if self.embedding is not None else 0,
            "trained_tasks": list(ctx.task_names[: ctx.task_index + 1]),
            "params": asdict(self.params),
        }
        (out_dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    def memory_report(self, model: nn.Module) -> dict[str, float]:
        params = self._state_params()
        trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
        return {
            "prompt_params_total": float(sum(full_numel(p) for p in params.values())),
            "trainable_params": float(trainable),
        }
