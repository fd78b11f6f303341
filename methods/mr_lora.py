"""MR-LoRA: one independent LoRA expert per task and a router that picks the expert for each sample.

Paper: "MLLM-CL: Continual Learning for Multimodal Large Language Models" (Zhao et al., 2025), whose
baseline method MR-LoRA ("multimodal routing LoRA") avoids forgetting by never touching a trained expert.

What the method does
    Task ``t`` trains a fresh LoRA expert on the task's data while the experts of the earlier tasks are
    loaded, frozen and inactive. Then a router adapter is trained on a few samples of every task seen so
    far (``router_samples_per_task`` each): the router reads the sample's image and question plus a short
    routing instruction and answers a letter naming the expert (``A`` = first task's expert, ``B`` = the
    second, ...). At inference every sample is routed first, then answered by its expert.

How it is implemented here
    * Phases per task: ``train`` (the new expert ``expert_<t>``, no evaluation) and ``router`` (a router
      adapter trained from scratch, then evaluation). The router is re-trained after each task, from scratch
      (or from the merged experts, ``router_init: merged``), rather than continued: its label set grows with
      every task and its training rows cover every seen task, so starting from the previous router buys
      nothing but a bias towards the old letters, and a new router makes each task's router a function of
      its own (tiny) training set and the experts only.
    * Experts are truly independent: every adapter (each expert and the router) carries its own copy of
      the multimodal projector when ``model.lora.train_projector`` is set (peft ``modules_to_save``, one
      copy per adapter, on the projector's Linear layers, which peft can route per sample). A shared
      trainable projector would be changed by every later task and silently break the earlier experts.
      Earlier experts are loaded with ``is_trainable=False`` and saved again untouched: their tensors stay
      bit-identical across later tasks.
    * Routed inference in one pass per batch (:meth:`MRLoRA.generate`): one router forward (the router
      as the active adapter, :func:`router_logits`) on the routing prompt built from the batch's token ids,
      reading the logits at the first answer position; then one ``model.generate(..., adapter_names=[expert
      per sample])`` mixed-adapter call. Every rank makes the same number of calls per batch (ZeRO-3 safe).
    * Fallback rule (:func:`choose_experts`): the router's free greedy token is used when it is the letter
      of a seen expert; otherwise the sample goes to the seen expert whose letter has the highest logit
      (ties: the earlier expert). This is deterministic; the published code picks a random expert instead
      (and can crash on an unparsable answer). Fallbacks are counted (``router_fallback`` per sample,
      ``router_fallback_rate`` per evaluation).
    * The evaluation the engine runs before training the first task's evaluating phase (the baseline row
      for forward transfer; ``TaskContext.stage == "baseline"``) answers with the untouched base model
      (``__base__``), as for other methods.
    * State: one peft folder per adapter (``expert_0/``, ..., ``router/``) plus ``mr_lora.json``.

The router's starting point (``router_init``)
    ``fresh`` (default): the router is a new LoRA (peft's init, B = 0), as described above.
    ``merged``: the router starts as the element-wise mean of the seen experts' adapter tensors. Source:
    ``scripts/LLaVA/Train_dom_single/0_train_router.sh`` in ``bjzhb666/MLLM-CL`` (commit 80bf389) trains the
    router LoRA (r 128, alpha 256, lr 5e-6, 40 epochs) with ``--previous_task_model_path
    checkpoints/LLaVA/domain_llava_lora_merged0.2``; ``load_model_from_previous_task``
    (``ETrain/Train/LLaVA/llava_trainer.py``) loads that folder's ``non_lora_trainables.bin`` (the
    projector) into the model and its ``adapter_model.bin`` into the router's own LoRA
    (``set_peft_model_state_dict(model, ..., adapter_name="default")``). So the folder is a LoRA adapter of
    the experts' shape that initialises the router; the base model is not changed. The script that wrote it
    is not published. The rule implemented here is our reading of the name and of the repository's only
    adapter-merging code, ``ETrain/Eval/LLaVA/avg_lora.py``, which merges peft state dicts key by key (lora_A
    and lora_B separately; its uniform line ``sum(weights[key] ...) / len(comp_weights)``): with the 5
    domain experts, weight 0.2 = 1/5 on each, i.e. every router tensor = 0.2 x the sum of the experts' tensors.
    Here the router is trained after every task, over the ``t + 1`` experts seen so far, so the weight is
    ``1 / (t + 1)`` (0.2 at the fifth task, the only router the published scripts train). With
    ``model.lora.train_projector`` the router's projector copy is the mean of the experts' copies (the
    published folder carries a projector in ``non_lora_trainables.bin``; how it was merged is not
    published either). Deviation: the published ability router (``Train_ability_single/0_train_router.sh``,
    35 epochs) has no ``previous_task_model_path``: it starts fresh; ``router_init`` is per experiment.
    Note the mean of the A and B matrices is not the mean of the experts' updates B·A; it is what a
    key-by-key state-dict merge gives, and only a starting point the router then trains from.

Hyper-parameters
    router_samples_per_task: Training samples per seen task the router trains on (paper: ~20). Chosen once
        per task, when the task is first seen, from a seed-determined permutation, and kept in the driver
        state (the method's small per-task memory).
    router_epochs: Epochs of the router phase (ours: 10; the router sees only ``20 x tasks`` rows, so a few
        more passes than the expert's are cheap; 10 routes >= 95 % of the generated stream's test samples).
    router_lr: Learning rate of the router phase (default: ``train.lr``; the published router: 5e-6).
    router_init: How the router adapter starts (``fresh``, default: a new LoRA, B = 0; ``merged``: the
        published start, see below).
    The experts and the router take the experiment's LoRA shape (``model.lora``). The paper uses rank 128,
    alpha 256 on LLaVA-1.5-7B; on the tiny test model the experiment's shape (rank 8, alpha 16) is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mcl.adapters import (
    adapters_in_lockstep,
    full_numel,
    full_shape,
    lora_target_modules,
    peft_lora_config,
    projector_modules,
)
from mcl.data import build_prompt, training_order
from mcl.methods_api import (
    Method,
    Phase,
    TaskContext,
    TaskData,
    TrainingData,
    TrainingRequest,
    register_method,
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ROUTER = "router"
BASE = "__base__"  # peft's name for "no adapter" in adapter_names
STATE_FILE = "mr_lora.json"
ROUTER_PHASE = "router"
ROUTER_INITS = ("fresh", "merged")
_ADAPTER_OF_PARAM = re.compile(r"\.(?:lora_[A-Za-z_]+|modules_to_save)\.([^.]+)\.")
# Layer types whose peft modules_to_save copies support per-sample adapter_names.
_ROUTABLE_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def expert_name(index: int) -> str:
    """The adapter name of task ``index``'s expert."""
    return f"expert_{index}"


def routing_instruction(num_experts: int) -> str:
    """The instruction appended to a question for the router, listing the valid letters."""
    return f"Which expert should answer this? Answer with one letter from {', '.join(LETTERS[:num_experts])}."


def router_question(question: str, num_experts: int) -> str:
    """The router's question for a sample: the sample's question plus the routing instruction."""
    return f"{question} {routing_instruction(num_experts)}"


@dataclass(frozen=True)
class RouterTokens:
    """How the routing prompt and the router's answer look in token ids (see :func:`router_tokens`).

    Attributes:
        insert_ids: Tokens of the routing instruction, inserted into a generation prompt ``suffix_len``
            tokens before its end (before the chat template's generation prompt, e.g. ``ASSISTANT:``).
        suffix_len: Number of prompt tokens after the question.
        answer_prefix: Tokens every letter answer starts with (usually none); fed after the prompt so the
            router's letter is read at the position that predicts it.
        letter_ids: Token id of each valid letter (expert ``k`` is ``letter_ids[k]``).
    """

    insert_ids: tuple[int, ...]
    suffix_len: int
    answer_prefix: tuple[int, ...]
    letter_ids: tuple[int, ...]


def _split_insertion(plain: list[int], full: list[int]) -> tuple[tuple[int, ...], int]:
    """``(inserted, suffix_len)`` such that ``full = plain[:-suffix_len] + inserted + plain[-suffix_len:]``."""
    prefix = 0
    while prefix < len(plain) and plain[prefix] == full[prefix]:
        prefix += 1
    suffix = 0
    while suffix < len(plain) - prefix and plain[-1 - suffix] == full[-1 - suffix]:
        suffix += 1
    if prefix + suffix != len(plain):
        raise ValueError("the routing prompt is not the plain prompt with the instruction inserted")
    return tuple(full[prefix : len(full) - suffix]), suffix


def router_tokens(processor: Any, num_experts: int) -> RouterTokens:
    """Token-level description of the routing prompt and the letter answers for ``num_experts`` experts.

    The routing prompt of a sample is its generation prompt with the routing instruction appended to the
    question (exactly what :meth:`MRLoRA.training_data` trains the router on); it is found by tokenising the
    chat template with and without the instruction for two probe questions, which must agree. The letters
    are tokenised as the engine tokenises answers (``mcl.data.Preprocessor``: a space before the answer
    unless the prompt ends in whitespace); they must differ in one token position, where the router is read.
    """
    if not 1 <= num_experts <= len(LETTERS):
        raise ValueError(f"num_experts must be in 1..{len(LETTERS)}, got {num_experts}")
    tokenizer = processor.tokenizer

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    splits = set()
    for probe in ("what is shown ?", "describe the image ."):
        plain = ids(build_prompt(processor, probe))
        full = ids(build_prompt(processor, router_question(probe, num_experts)))
        splits.add(_split_insertion(plain, full))
    if len(splits) != 1:
        raise ValueError("the routing instruction tokenises differently after different questions")
    insert_ids, suffix_len = splits.pop()
    prompt = build_prompt(processor, "x")
    sep = "" if prompt.endswith((" ", "\n")) else " "
    answers = [ids(sep + letter) for letter in LETTERS[:num_experts]]
    common = 0
    while all(len(a) > common for a in answers) and len({a[common] for a in answers}) == 1:
        common += 1
    if num_experts == 1:  # one letter: its first token is the letter
        common = 0
    letter_ids = tuple(a[common] if len(a) > common else -1 for a in answers)
    if -1 in letter_ids or len(set(letter_ids)) != num_experts:
        raise ValueError(f"the tokenizer does not give the letters {LETTERS[:num_experts]} distinct tokens")
    return RouterTokens(insert_ids, suffix_len, tuple(answers[0][:common]), letter_ids)


def router_inputs(batch: dict[str, torch.Tensor], tokens: RouterTokens) -> dict[str, torch.Tensor]:
    """The router's forward inputs for a left-padded generation batch: the routing instruction inserted
    before each prompt's generation prompt, the answer prefix appended, and position ids that skip the
    padding (as ``generate`` computes them). Per-token inputs other than ids and mask get zeros."""
    input_ids = batch["input_ids"]
    n, length = input_ids.shape
    cut = length - tokens.suffix_len
    device = input_ids.device
    insert = torch.tensor(tokens.insert_ids, dtype=input_ids.dtype, device=device).expand(n, -1)
    prefix = torch.tensor(tokens.answer_prefix, dtype=input_ids.dtype, device=device).expand(n, -1)
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if key == "labels":
            continue
        if value.dim() == 2 and value.shape == input_ids.shape:
            if key == "input_ids":
                mid, tail = insert, prefix
            elif key == "attention_mask":
                mid, tail = (
                    torch.ones_like(insert, dtype=value.dtype),
                    torch.ones_like(prefix, dtype=value.dtype),
                )
            else:
                mid = torch.zeros(insert.shape, dtype=value.dtype, device=device)
                tail = torch.zeros(prefix.shape, dtype=value.dtype, device=device)
            out[key] = torch.cat([value[:, :cut], mid, value[:, cut:], tail], dim=1)
        else:
            out[key] = value
    mask = out["attention_mask"]
    out["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return out


def choose_experts(logits: torch.Tensor, letter_ids: Sequence[int]) -> tuple[list[int], list[bool]]:
    """Each sample's expert from the router's logits at the answer position (``[n, vocab]``).

    The free greedy token (argmax over the whole vocabulary) decides when it is a valid letter. Otherwise
    (a word, another letter, padding) the sample falls back, deterministically, to the valid letter with the
    highest logit, the earlier expert on a tie. Returns ``(experts, fell_back)``.
    """
    letters = torch.tensor(list(letter_ids), device=logits.device)
    free = logits.argmax(dim=-1)
    restricted = logits.index_select(-1, letters).argmax(dim=-1)
    experts, fell_back = [], []
    for token, best in zip(free.tolist(), restricted.tolist(), strict=True):
        if token in letter_ids:
            experts.append(list(letter_ids).index(token))
            fell_back.append(False)
        else:
            experts.append(int(best))
            fell_back.append(True)
    return experts, fell_back


def _accepts(model: torch.nn.Module, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


def router_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], tokens: RouterTokens
) -> torch.Tensor:
    """The router's logits at the answer position (``[n, vocab]``) for an evaluation batch.

    When the router is the active adapter (as :func:`load_routed_model` and the router phase leave it), the
    forward is peft's plain one; otherwise every sample is sent to the router through ``adapter_names``. Both
    give the same logits; the plain forward skips peft's per-sample dispatch (measured 2026-12-07: 0.0585 s
    against 0.0645 s per 160 samples, ``BENCHMARKS.md``). Under ZeRO-3 either way gathers the same modules on
    every rank, since every rank routes every sample through the router."""
    inputs = router_inputs(batch, tokens)
    if _accepts(model, "logits_to_keep"):
        inputs["logits_to_keep"] = 1
    if getattr(model, "active_adapter", None) != ROUTER:
        inputs["adapter_names"] = [ROUTER] * batch["input_ids"].shape[0]
    with torch.no_grad():
        return model(**inputs).logits[:, -1, :]


def route(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], tokens: RouterTokens
) -> tuple[list[int], list[bool]]:
    """One router forward over an evaluation batch (the ``router`` adapter for every sample): each sample's
    expert index and whether it fell back (see :func:`choose_experts`). The model must be in eval mode."""
    return choose_experts(router_logits(model, batch, tokens).float(), tokens.letter_ids)


def routed_generate(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    generate_kwargs: dict[str, Any],
    experts: Sequence[int],
) -> torch.Tensor:
    """One mixed-adapter ``generate`` call: sample ``i`` answered by ``expert_<experts[i]>`` (``-1``: the base
    model). Returns the generated tokens after the prompt."""
    if "pixel_values" in batch and batch["pixel_values"].shape[0] != batch["input_ids"].shape[0]:
        # Per-sample projector copies need one image per sample along dim 0 (LLaVA's layout).
        raise ValueError(
            "MR-LoRA routes one image per sample: pixel_values has "
            f"{batch['pixel_values'].shape[0]} rows for {batch['input_ids'].shape[0]} samples"
        )
    names = [expert_name(e) if e >= 0 else BASE for e in experts]
    with torch.no_grad():
        out = model.generate(**batch, adapter_names=names, **generate_kwargs)
    return out[:, batch["input_ids"].shape[1] :]


def projector_layers(model: torch.nn.Module) -> list[str]:
    """``modules_to_save`` names for per-adapter projector copies: the projector's parameterised layers.

    peft copies a module per adapter; with ``adapter_names`` it routes each sample through its adapter's
    copy only for single layers (Linear, Conv, Embedding), so the projector's layers are listed one by one.
    """
    names: list[str] = []
    for full, module in projector_modules(model):
        root = full.split(".")[-1]
        for sub, layer in module.named_modules():
            if not sub or not any(True for _ in layer.parameters(recurse=False)):
                continue
            if not isinstance(layer, _ROUTABLE_LAYERS):
                raise ValueError(
                    f"model.lora.train_projector: projector layer {root}.{sub} is a {type(layer).__name__}; "
                    "MR-LoRA gives each expert its own projector copy, routed per sample, which peft supports "
                    "only for Linear/Conv/Embedding layers; set model.lora.train_projector=false"
                )
            names.append(f"{root}.{sub}")
    return sorted(set(names))


def _peft_config(model: torch.nn.Module, ctx: TaskContext) -> Any:
    lora = ctx.lora
    projector = projector_layers(model) if lora.train_projector else None
    return peft_lora_config(lora, lora_target_modules(model, lora), projector)


def read_state(state_dir: str | Path) -> dict[str, Any]:
    """The adapter list of a saved MR-LoRA state (``mr_lora.json``)."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no MR-LoRA state here (was the previous task trained by mr_lora?)")
    return json.loads(path.read_text())


def load_routed_model(model: torch.nn.Module, state_dir: str | Path) -> torch.nn.Module:
    """Every expert and the router of a saved state (after a ``router`` phase) on ``model``, frozen, in eval
    mode: ready for :func:`route` and :func:`routed_generate`."""
    from peft import PeftModel

    state = read_state(state_dir)
    if not state.get("router"):
        raise ValueError(f"{state_dir}: this state has no router (it was saved after a train phase)")
    names = [*state["experts"], ROUTER]
    peft_model = PeftModel.from_pretrained(model, str(Path(state_dir) / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(Path(state_dir) / name), adapter_name=name, is_trainable=False)
    peft_model.set_adapter(ROUTER, inference_mode=True)  # the router's forward needs no per-sample dispatch
    return peft_model.eval()


def average_adapters(model: torch.nn.Module, target: str, sources: Sequence[str]) -> int:
    """Set every tensor of adapter ``target`` (LoRA matrices, projector copy) to the element-wise mean of the
    same tensor of the ``sources`` adapters (MR-LoRA's ``router_init: merged``). Returns how many tensors
    were set; raises if a source lacks a tensor of ``target`` or holds it in another shape."""
    if not sources:
        raise ValueError(f"average_adapters: no source adapters to merge into {target!r}")
    params = dict(model.named_parameters())
    count = 0
    with torch.no_grad():
        for name, param in params.items():
            match = _ADAPTER_OF_PARAM.search(name)
            if match is None or match.group(1) != target:
                continue
            start, end = match.span(1)
            peers = [params.get(name[:start] + source + name[end:]) for source in sources]
            bad = [
                s
                for s, p in zip(sources, peers, strict=True)
                if p is None or full_shape(p) != full_shape(param)
            ]
            if bad:
                raise ValueError(f"adapter {bad[0]!r} has no tensor like {name} {tuple(param.shape)}")
            with _gathered([param, *peers]):  # ZeRO-3 partitions the projector copies at load
                mean = torch.stack([p.detach().to(torch.float32) for p in peers]).mean(dim=0)
                param.copy_(mean.to(param.dtype))
            count += 1
    if not count:
        raise ValueError(f"average_adapters: the model has no adapter {target!r}")
    return count


def _gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    """``params`` whole on every rank while inside, rank 0's changes kept (ZeRO-3); a no-op otherwise."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def adapter_parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Number of parameters of each adapter (LoRA matrices plus its projector copy) by adapter name."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        match = _ADAPTER_OF_PARAM.search(name)
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + full_numel(p)
    return counts


@register_method
class MRLoRA(Method):
    """One LoRA expert per task, a router adapter choosing the expert per sample (see the module docstring)."""

    name = "mr_lora"

    @dataclass
    class Params:
        """MR-LoRA hyper-parameters (see the module docstring)."""

        router_samples_per_task: int = field(
            default=20, metadata={"help": "Training samples per seen task the router trains on (>= 1)."}
        )
        router_epochs: int = field(default=10, metadata={"help": "Epochs of the router phase (>= 1)."})
        router_lr: float | None = field(
            default=None, metadata={"help": "Learning rate of the router phase (> 0; null: train.lr)."}
        )
        router_init: str = field(
            default="fresh",
            metadata={
                "help": "How the router adapter starts: fresh (a new LoRA) or merged (the element-wise mean "
                "of the seen experts' adapter tensors, MLLM-CL's domain_llava_lora_merged0.2)."
            },
        )

        def __post_init__(self) -> None:
            if self.router_samples_per_task < 1:
                raise ValueError(f"router_samples_per_task must be >= 1, got {self.router_samples_per_task}")
            if self.router_epochs < 1:
                raise ValueError(f"router_epochs must be >= 1, got {self.router_epochs}")
            if self.router_lr is not None and not self.router_lr > 0:
                raise ValueError(f"router_lr must be > 0, got {self.router_lr}")
            if self.router_init not in ROUTER_INITS:
                raise ValueError(
                    f"router_init must be one of {', '.join(ROUTER_INITS)}, got {self.router_init!r}"
                )

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        self._tokens: dict[int, RouterTokens] = {}

    # -- driver side ---------------------------------------------------------------------------------
    def phases(self, task_index: int) -> list[Phase]:
        lr = float(self.params.router_lr) if self.params.router_lr is not None else None
        return [
            Phase("train", evaluate=False),
            Phase(ROUTER_PHASE, evaluate=True, epochs=self.params.router_epochs, lr=lr),
        ]

    def training_data(self, request: TrainingRequest) -> TrainingData:
        """``train``: the task's training samples. ``router``: ``router_samples_per_task`` samples of every
        seen task, as routing questions answered by their expert's letter (images kept)."""
        phase, task_index, tasks = request.phase, request.task_index, request.tasks
        driver_state = request.driver_state
        order = {"epochs": request.epochs, "global_batch": request.global_batch, "seed": request.seed}
        if task_index >= len(LETTERS):
            raise ValueError(f"MR-LoRA names experts by letter: at most {len(LETTERS)} tasks")
        if phase.name == "train":
            samples = tasks[task_index].train
            return TrainingData(training_order(samples, **order))
        if phase.name != ROUTER_PHASE:
            raise ValueError(f"MR-LoRA has no phase {phase.name!r}")
        chosen: dict[str, list[str]] = dict((driver_state or {}).get("router_samples", {}))
        router_samples = []
        for i in range(task_index + 1):
            task = tasks[i]
            if task.name not in chosen:  # first seen now: pick its router samples once, keep them
                chosen[task.name] = select_router_samples(
                    task, self.params.router_samples_per_task, request.seed
                )
            wanted = set(chosen[task.name])
            by_id = {s.id: s for s in task.train if s.id in wanted}
            missing = [sid for sid in chosen[task.name] if sid not in by_id]
            if missing:
                raise ValueError(
                    f"router samples {missing[:3]} of task {task.name!r} are not in its training data"
                )
            for sid in chosen[task.name]:
                s = by_id[sid]
                router_samples.append(
                    dataclasses.replace(
                        s, question=router_question(s.question, task_index + 1), answer=LETTERS[i]
                    )
                )
        rows = training_order(router_samples, **order)
        return TrainingData(rows, {**(driver_state or {}), "router_samples": chosen})

    # -- worker side -----------------------------------------------------------------------------------
    def setup_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        """``train``: a new trainable ``expert_<t>`` beside the frozen, inactive earlier experts. ``router``:
        a new trainable router beside all experts of the tasks so far (frozen)."""
        from peft import get_peft_model

        t = ctx.task_index
        if t >= len(LETTERS):
            raise ValueError(f"MR-LoRA names experts by letter: at most {len(LETTERS)} tasks")
        if ctx.phase == "train":
            new, frozen = expert_name(t), [expert_name(i) for i in range(t)]
        elif ctx.phase == ROUTER_PHASE:
            new, frozen = ROUTER, [expert_name(i) for i in range(t + 1)]
        else:
            raise ValueError(f"MR-LoRA has no phase {ctx.phase!r}")
        if frozen:
            if ctx.previous_state_dir is None:
                raise ValueError(f"MR-LoRA {ctx.phase} phase of task {t} needs the previous state (experts)")
            saved = read_state(ctx.previous_state_dir)["experts"]
            if saved[: len(frozen)] != frozen:
                raise ValueError(f"{ctx.previous_state_dir}: holds experts {saved}, expected {frozen}")
        # The new adapter first: its initialisation draws from the RNG right after the engine seeded it.
        peft_model = get_peft_model(model, _peft_config(model, ctx), adapter_name=new)
        for name in frozen:
            peft_model.load_adapter(str(ctx.previous_state_dir / name), adapter_name=name, is_trainable=False)
        peft_model.set_adapter(new)  # active and trainable; every other adapter inactive and frozen
        if new == ROUTER and self.params.router_init == "merged":
            average_adapters(peft_model, ROUTER, frozen)
        trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        stray = [n for n in trainable if (m := _ADAPTER_OF_PARAM.search(n)) is None or m.group(1) != new]
        if stray or not trainable:
            raise RuntimeError(f"MR-LoRA: parameters outside adapter {new!r} are trainable: {stray[:3]}")
        return peft_model

    def load_for_evaluation(
        self, model: torch.nn.Module, state_dir: Path, ctx: TaskContext
    ) -> torch.nn.Module:
        """Every expert and the saved router (the router phase's state), for routed answers."""
        if ctx.phase != ROUTER_PHASE:
            raise ValueError(f"MR-LoRA evaluates after its {ROUTER_PHASE!r} phase, not after {ctx.phase!r}")
        return load_routed_model(model, state_dir)

    def router_tokens(self, processor: Any, num_experts: int) -> RouterTokens:
        if num_experts not in self._tokens:
            self._tokens[num_experts] = router_tokens(processor, num_experts)
        return self._tokens[num_experts]

    def generate(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        generate_kwargs: dict[str, Any],
        ctx: TaskContext,
    ) -> tuple[torch.Tensor, dict[str, list[Any]]]:
        """Route every sample (one router forward), then answer each with its expert (one generate).

        When the ranks generate in sync (ZeRO-3 on several workers), every rank runs every adapter in the
        same order (:func:`~mcl.adapters.adapters_in_lockstep`): their batches route to different experts."""
        n = batch["input_ids"].shape[0]
        lockstep = (
            adapters_in_lockstep(model) if generate_kwargs.get("synced_gpus") else contextlib.nullcontext()
        )
        with lockstep:
            if ctx.stage == "baseline" or ctx.phase != ROUTER_PHASE:
                # The baseline evaluation (the untrained model), or no router yet: the untouched model answers.
                tokens = routed_generate(model, batch, generate_kwargs, [-1] * n)
                return tokens, {"expert": [-1] * n, "router_fallback": [False] * n}
            experts, fell_back = route(model, batch, self.router_tokens(ctx.processor, ctx.task_index + 1))
            tokens = routed_generate(model, batch, generate_kwargs, experts)
        return tokens, {"expert": experts, "router_fallback": fell_back}

    def eval_metrics(self, records: list[dict[str, Any]], ctx: TaskContext) -> dict[str, float]:
        """``router_acc_<task>`` (percent of the task's test samples routed to its own expert) for every seen
        task, their mean ``router_acc``, and ``router_fallback_rate`` (fraction of routed samples, all tasks,
        whose free router answer was not a valid letter)."""
        routed = [r for r in records if r.get("expert", -1) >= 0]
        if not routed:
            return {}
        metrics: dict[str, float] = {}
        for i, task in enumerate(ctx.task_names[: ctx.task_index + 1]):
            own = [r for r in routed if r["task"] == task]
            if own:
                metrics[f"router_acc_{task}"] = 100.0 * sum(r["expert"] == i for r in own) / len(own)
        seen = [v for k, v in metrics.items()]
        if seen:
            metrics["router_acc"] = sum(seen) / len(seen)
        metrics["router_fallback_rate"] = sum(bool(r["router_fallback"]) for r in routed) / len(routed)
        return metrics

    def save_state(self, model: torch.nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        """One peft folder per adapter (``expert_<i>/``, ``router/``) and ``mr_lora.json`` listing them."""
        names = list(model.peft_config)
        experts = sorted((n for n in names if n.startswith("expert_")), key=lambda n: int(n.split("_")[1]))
        router = ROUTER if ROUTER in names else None
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), selected_adapters=[*experts, *([router] if router else [])])
        state = {
            "experts": experts,
            "router": router,
            "tasks": list(ctx.task_names[: len(experts)]),
            "letters": list(LETTERS[: len(experts)]),
        }
        (out_dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    def memory_report(self, model: torch.nn.Module) -> dict[str, float]:
        """Experts held, parameters per expert (mean), router parameters, all adapter parameters."""
        counts = adapter_parameter_counts(model)
        experts = [v for k, v in counts.items() if k.startswith("expert_")]
        trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
        return {
            "experts": float(len(experts)),
            "params_per_expert": float(sum(experts) / len(experts)) if experts else 0.0,
            "router_params": float(counts.get(ROUTER, 0)),
            "adapter_params_total": float(sum(counts.values())),
            "trainable_params": float(trainable),
        }


def select_router_samples(task: TaskData, count: int, seed: int) -> list[str]:
    """Ids of ``count`` training samples of ``task`` (all if it has fewer), from a seeded permutation."""
    n = len(task.train)
    rng = random.Random(f"mr_lora-router-{seed}-{task.name}")
    # The same draw as sampling the list of ids (random.sample picks by position), without building it.
    return sorted(task.train[i].id for i in rng.sample(range(n), min(count, n)))
