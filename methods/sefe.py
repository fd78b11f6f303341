"""SEFE: Answer Style Diversification of the training data plus RegLoRA, a penalty on the new task's LoRA
update at the positions where earlier tasks' updates were largest.

Paper: Chen et al., "SEFE: Superficial and Essential Forgetting Eliminator for Multimodal Continual Instruction
Tuning" (ICML 2025). Code: ``jinpeng0528/SEFE`` and MCITlib's copy (``Ghy0501/MCITlib``, ``SEFE/``), which is how
MCITlib benchmarks it on MLLM-DCL and UCIT. File references are to MCITlib's copy.

What the method does:

- **Answer Style Diversification (ASD)** against superficial forgetting (a model that forgets a task's answer
  *format*): a share ``X`` of each task's training samples (paper and README example: 20%) is rewritten into the
  four answer styles other than the sample's own, ``X/4`` each: yes/no, multiple choice, short answer, brief
  explanation, detailed explanation. The rest stays as it is. The released data was converted offline
  (``train_x20.json``); the prompts of the model-written parts (distractors, explanations) are in
  ``SEFE/CoIN-ASD/prompts``. Here the conversion runs in the driver, per task, seeded, by the standard rules
  (:func:`rewrite_by_rules`), or by a function of yours (``asd_rewriter: "module:function"``, e.g. one that
  calls an MLLM, as the paper does for distractors and explanations).
- **RegLoRA** against essential forgetting: each task trains a new LoRA on the model that holds every earlier
  task's update (SEFE merges each LoRA into the weights and starts a new one, ``scripts/merge_lora_weights.py``;
  here the earlier adapters stay loaded, frozen and active, which adds the same updates). After task ``t``,
  the key elements of its update are the top 2% of ``|B_t A_t|`` (unscaled) of each adapted matrix
  (``key_elements_identification.py`` lines 29-73); their positions are added to those of the earlier tasks
  (concatenated, so a position key to two tasks counts twice, as released). While a later task trains, the
  loss adds ``lambda * mean over matrices of mean |(B A)[key positions]|`` of the new adapter, with ``lambda =
  2.5e3`` (``modeling_llama.py`` lines 780-802 and 1129-1131, ``llava_llama.py`` lines 114-126). The penalty is
  zero at the previous weights (the new update is zero there) and grows as the new update moves them.

Deviations, and why:

- **ASD in MCITlib.** MCITlib ships only the prompt templates and trains SEFE on the plain data, so there SEFE
  is RegLoRA alone; ``asd_share: 0`` gives that form. The default, 0.2, is the paper's.
- **Rule-based styles.** Distractors for yes/no and multiple choice are other answers of the same task (the
  paper has an MLLM write them); the explanations restate the answer in a fixed sentence (the paper's are
  MLLM-written, about 20 and 50 words). A sample whose own style the rules cannot convert from (a yes/no
  answer has no object to ask about) stays as it is and is counted (``asd`` in the driver state).
- **The penalty** reads only the key entries of ``B A`` (``B[rows] . A[:, cols]``), not the whole product the
  released code forms per layer and step: the same value for ``K r`` instead of ``out in r`` work. It is
  averaged over the adapted matrices that have key positions (the released code divides by 224, its count).
- **The projector**: with ``model.lora.train_projector`` its linear layers carry the task adapters too
  (O-LoRA's arrangement, :mod:`methods.olora`), regularised like the language model's. SEFE trains the
  projector fully and merges it with the rest; a fully trained projector would be one set of weights every task
  overwrites without any penalty.

Hyper-parameters (``method.params``): ``lambda_reg`` (2500), ``key_percent`` (2.0: the top share of each
update's entries kept as key elements), ``asd_share`` (0.2), ``asd_rewriter`` (``"rules"`` or
``"module:function"``). The LoRA shape is ``model.lora`` (SEFE's scripts: rank 16, alpha 32 on UCIT; 32 and 64
on MLLM-DCL).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mcl.methods_api import TaskContext, TaskData, TrainingData, TrainingRequest, register_method
from methods.olora import OLoRA

Sample = Any  # mcl.streams.samples.Sample (methods import only the engine's public API)

KEYS_FILE = "sefe_keys.safetensors"
STYLES = ("yes_no", "multiple_choice", "short_answer", "brief_explanation", "detailed_explanation")
LETTERS = "ABCD"
_OPTION = re.compile(r"^\s*([A-Z])[.)]\s+(.+?)\s*$")
Rewriter = Callable[[Sample, str, Sequence[str], random.Random], "Sample | None"]


@dataclass
class SEFEParams:
    """SEFE hyper-parameters (see the module docstring for the released code's values)."""

    lambda_reg: float = field(
        default=2.5e3, metadata={"help": "Weight of the RegLoRA penalty (>= 0; released: 2.5e3)."}
    )
    key_percent: float = field(
        default=2.0,
        metadata={"help": "Percent of each update's entries (largest |B A|) kept as key elements, in (0, 100]."},
    )
    asd_share: float = field(
        default=0.2, metadata={"help": "Share of each task's samples rewritten into other styles, in [0, 1]."}
    )
    asd_rewriter: str = field(
        default="rules",
        metadata={"help": "rules, or module:function(sample, style, choices, rng) -> Sample | None."},
    )

    def __post_init__(self) -> None:
        if not self.lambda_reg >= 0:
            raise ValueError(f"lambda_reg: must be >= 0, got {self.lambda_reg!r}")
        if not 0 < self.key_percent <= 100:
            raise ValueError(f"key_percent: must be in (0, 100], got {self.key_percent!r}")
        if not 0 <= self.asd_share <= 1:
            raise ValueError(f"asd_share: must be in [0, 1], got {self.asd_share!r}")
        if self.asd_rewriter != "rules" and ":" not in self.asd_rewriter:
            raise ValueError(f"asd_rewriter: 'rules' or 'module:function', got {self.asd_rewriter!r}")


# -- Answer Style Diversification -------------------------------------------------------------------------
def answer_style(sample: Sample) -> str:
    """The style a sample's answer has: yes/no, multiple choice (a letter answering lettered options), else
    short answer."""
    answer = sample.answer.strip().rstrip(".").lower()
    if answer in ("yes", "no"):
        return "yes_no"
    if len(answer) == 1 and answer.isalpha() and _options(sample.question):
        return "multiple_choice"
    return "short_answer"


def _options(question: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for line in question.splitlines() if (m := _OPTION.match(line))}


def rewrite_by_rules(sample: Sample, style: str, choices: Sequence[str], rng: random.Random) -> Sample | None:
    """``sample`` rewritten into ``style`` by the rules (None where they cannot): the gold answer is the short
    answer (a multiple-choice sample's chosen option); distractors are other answers of the task (``choices``)."""
    native = answer_style(sample)
    question, gold = sample.question, sample.answer
    if native == "yes_no":
        return None  # no object to ask about: only a model could write the other styles
    if native == "multiple_choice":
        options = _options(question)
        gold = options.get(sample.answer.strip().rstrip(".").upper(), "")
        question = "\n".join(line for line in question.splitlines() if not _OPTION.match(line)).strip()
        if not gold:
            return None
    others = [c for c in choices if c != gold]
    if style == "yes_no":
        candidate = gold if not others or rng.random() < 0.5 else rng.choice(others)
        text = f"{question} Is the answer {candidate}? Answer yes or no."
        return dataclasses.replace(sample, question=text, answer="yes" if candidate == gold else "no")
    if style == "multiple_choice":
        picked = rng.sample(others, min(len(LETTERS) - 1, len(others)))
        options = [gold, *picked]
        rng.shuffle(options)
        lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
        text = "\n".join([question, *lines, "Answer with the option's letter from the given choices directly."])
        return dataclasses.replace(sample, question=text, answer=LETTERS[options.index(gold)])
    if style == "short_answer":
        return dataclasses.replace(sample, question=f"{question} Answer with a word or phrase.", answer=gold)
    if style == "brief_explanation":
        text = f"{question} Answer the question and explain briefly."
        return dataclasses.replace(sample, question=text, answer=f"{gold}. The image shows {gold}.")
    if style == "detailed_explanation":
        text = f"{question} Answer the question and explain in detail."
        answer = f"{gold}. The question asks: {question} The image shows {gold}, so the answer is {gold}."
        return dataclasses.replace(sample, question=text, answer=answer)
    raise ValueError(f"unknown answer style {style!r}; styles: {', '.join(STYLES)}")


def load_rewriter(spec: str) -> Rewriter:
    """``"rules"`` or ``"module:function"`` (imported here; a clear error naming ``asd_rewriter`` if absent)."""
    if spec == "rules":
        return rewrite_by_rules
    module_name, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"method.params.asd_rewriter: cannot load {spec!r} ({exc})") from exc


class ASDSamples(Sequence[Sample]):
    """A task's training samples with the rewritten ones in place (by position); the rest read lazily."""

    def __init__(self, base: Sequence[Sample], rewritten: dict[int, Sample]) -> None:
        self.base, self.rewritten = base, rewritten

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.rewritten.get(i, self.base[i]) if i >= 0 else self[len(self) + i]


def diversify(task: TaskData, share: float, seed: int, rewriter: Rewriter) -> tuple[ASDSamples, dict[str, int]]:
    """ASD for one task: ``round(share * n)`` samples (a seeded choice) rewritten, in turn, into the styles other
    than their own, so each of the four gets a quarter. Returns the samples and the count per style
    (``kept_native``: samples the rewriter could not convert)."""
    samples = task.train
    n = len(samples)
    order = list(range(n))
    rng = random.Random(f"sefe-asd-{seed}-{task.name}")
    rng.shuffle(order)
    chosen = order[: round(share * n)]
    choices = sorted({s.answer for s in samples})
    counts = {style: 0 for style in STYLES} | {"kept_native": 0}
    rewritten: dict[int, Sample] = {}
    for k, i in enumerate(chosen):
        sample = samples[i]
        targets = [s for s in STYLES if s != answer_style(sample)]
        style = targets[k % len(targets)]
        new = rewriter(sample, style, choices, random.Random(f"sefe-asd-{seed}-{sample.id}"))
        if new is None:
            counts["kept_native"] += 1
            continue
        rewritten[i] = new
        counts[style] += 1
    return ASDSamples(samples, rewritten), counts


# -- RegLoRA --------------------------------------------------------------------------------------------
def key_positions(update: torch.Tensor, percent: float) -> torch.Tensor:
    """``(k, 2)`` (row, column) positions of the ``percent`` % largest ``|update|`` entries (at least one)."""
    k = max(1, int(percent / 100.0 * update.numel()))
    flat = update.abs().flatten().topk(k).indices
    return torch.stack([flat // update.shape[1], flat % update.shape[1]], dim=1)


def key_penalty(a: torch.Tensor, b: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``mean |(B A)[keys]|`` from the key entries alone: ``B[rows] . A[:, cols]``."""
    rows, cols = keys[:, 0], keys[:, 1]
    return (b.float()[rows] * a.float()[:, cols].T).sum(-1).abs().mean()


@register_method
class SEFE(OLoRA):
    name = "sefe"
    Params = SEFEParams

    def __init__(self, params: SEFEParams) -> None:
        super().__init__(params)  # type: ignore[arg-type]
        self.keys: dict[str, torch.Tensor] = {}  # LoRA layer name -> (K, 2) key positions of earlier tasks
        self._terms: list[torch.Tensor] = []
        self._rewriter: Rewriter | None = None

    # -- driver side: ASD -------------------------------------------------------------------------------
    def training_data(self, request: TrainingRequest) -> TrainingData:
        from mcl.data import training_order

        if self._rewriter is None:
            self._rewriter = load_rewriter(self.params.asd_rewriter)
        samples, counts = diversify(request.task, self.params.asd_share, request.seed, self._rewriter)
        rows = training_order(samples, epochs=request.epochs, global_batch=request.global_batch, seed=request.seed)
        asd = {**(request.driver_state or {}).get("asd", {}), request.task.name: counts}
        return TrainingData(rows, {**(request.driver_state or {}), "asd": asd})

    # -- worker side: RegLoRA ---------------------------------------------------------------------------
    def setup_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        self.keys = {}
        if ctx.previous_state_dir is not None:
            from safetensors.torch import load_file

            self.keys = load_file(str(Path(ctx.previous_state_dir) / KEYS_FILE))
        return super().setup_model(model, ctx)

    @staticmethod
    def _load_old_A(folder: Path, old: list[str]) -> dict[str, torch.Tensor]:
        """None: O-LoRA's orthogonality term, which reads the earlier adapters' A matrices, is not SEFE's."""
        return {}

    def _register_hooks(self, model: torch.nn.Module, new: str) -> None:
        """A forward hook on each new ``lora_B`` adds its layer's penalty term; under ZeRO-3 the new ``lora_A``
        is registered as an external parameter of that module, so both are gathered when the hook runs."""
        from peft.tuners.lora import LoraLayer

        zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or new not in module.lora_A or name not in self.keys:
                continue
            b_module, a_param = module.lora_B[new], module.lora_A[new].weight
            if zero3:
                import deepspeed

                deepspeed.zero.register_external_parameter(b_module, a_param)
            self._hooks.append(b_module.register_forward_hook(self._penalty_hook(name, a_param)))

    def _penalty_hook(self, layer: str, a_param: torch.nn.Parameter) -> Callable[..., None]:
        def hook(module: torch.nn.Module, _inputs: Any, _output: Any) -> None:
            # Not while backward recomputes the forward (activation checkpointing): counted once per step.
            if module.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
                keys = self.keys[layer].to(module.weight.device)
                self._terms.append(key_penalty(a_param, module.weight, keys))

        return hook

    def extra_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any, ctx: TaskContext
    ) -> torch.Tensor | None:
        terms, self._terms = self._terms, []
        if not terms or self.params.lambda_reg == 0:
            return None
        return self.params.lambda_reg * torch.stack(terms).mean()

    def after_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        super().after_task(model, ctx)
        self._terms = []

    def save_state(self, model: torch.nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        """O-LoRA's adapters, plus the key positions of every task so far (``sefe_keys.safetensors``): the new
        adapter's top ``key_percent`` % of ``|B A|`` per layer after the earlier tasks' positions."""
        from peft.tuners.lora import LoraLayer
        from safetensors.torch import save_file

        super().save_state(model, out_dir, ctx)
        new = self.adapters[-1]
        keys = dict(self.keys)
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and new in module.lora_A:
                a, b = module.lora_A[new].weight, module.lora_B[new].weight
                found = key_positions((b.detach().float() @ a.detach().float()).cpu(), self.params.key_percent)
                keys[name] = torch.cat([found, keys[name]]) if name in keys else found
        save_file({k: v.contiguous() for k, v in keys.items()}, str(out_dir / KEYS_FILE))
        extra = {"key_positions": {k: int(v.shape[0]) for k, v in keys.items()}}
        path = out_dir / "sefe.json"
        path.write_text(json.dumps({"params": asdict(self.params), **extra}, indent=1))

    def memory_report(self, model: torch.nn.Module) -> dict[str, float]:
        report = super().memory_report(model)
        report.pop("old_A_numel", None)  # always 0: SEFE reads no earlier A matrices
        report["key_positions"] = float(sum(v.shape[0] for v in self.keys.values()))
        return report
