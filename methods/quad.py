"""QUAD: question-only replay with attention distillation, on a sequentially fine-tuned LoRA adapter.

Paper: Marouf, Tartaglione, Lathuilière, van de Weijer, "No Images, No Problem: Retaining Knowledge in
Continual VQA with Questions-Only Memory" (arXiv 2502.04469, 2025; v2 "Ask and Remember: A Questions-Only
Replay Strategy for Continual Visual Question Answering"). Code: github.com/IemProg/QUAD.

What it does: the memory holds only *questions* of past tasks (no images, no answers: small and free of the
privacy issues of stored pictures). While a new task is trained, stored questions are asked about the
current task's images and the previous model's answers to them are the targets (question-only replay, QR),
so the model does not collapse onto the current task's answer space; attention consistency distillation
(ACD) keeps the new model's attention maps close to the previous model's. Loss
``(1 - l) * task + l * (QR + ACD)`` with ``l = 0.5`` (the paper's).

How it is implemented here:

* Question store (driver side): after the rows of task ``t`` are chosen, ``questions_per_task`` of its
  training samples are drawn (reservoir sampling, seeded by the task's seed) and only their question text is
  kept, as ``{"task", "question"}`` rows in the method's driver state (``driver_state.json`` in the
  checkpoint, handed back next task). No image path, no pixels, no answer, no sample id is stored.
* Batches (driver side): while training task ``t > 0`` every global batch of ``B`` rows holds
  ``round(replay_ratio * B)`` question rows (at most ``B - 1``): a stored question (drawn uniformly from all
  stored questions, seeded) paired with the image of a random training sample of the *current* task, marked
  ``supervised=False`` (the engine appends no answer and its task loss skips the row). The other rows are the
  current task's, one pass over its data per epoch (``ceil(N / (B - r))`` steps), as in ``methods.replay``.
* Teacher (worker side): the previous task's adapter, loaded a second time as a frozen peft adapter
  (``quad_teacher``) next to the trainable one (``default``, continued from the same weights, so student ==
  teacher when task ``t`` starts). The teacher forward runs once per step on the whole batch, without
  gradients and in eval mode, by pointing every LoRA layer and saved module (the projector) at the teacher
  adapter for that one call (:func:`mcl.adapters.using_adapter`; restored afterwards). peft's public switches
  do not fit: ``set_adapter`` changes ``requires_grad`` (which DeepSpeed and the optimiser already hold) and
  mixed batches (``adapter_names``) do not support a saved projector module. Every rank runs it (a
  collective under ZeRO-3).
* QR: on the question rows (labels all ``-100``), the KL divergence ``KL(teacher || student)`` of the
  next-token distributions at the answer position (the last prompt token, which predicts the first answer
  token), averaged over the rows. Only the first answer token is distilled: the student's outputs come from
  the engine's forward, which has no answer appended to these rows (decoding the teacher's whole answer
  would need generation inside the training step). On the generated stream every answer is one word.
* ACD: on the current task's rows (the paper distills attention on the current data), the attention maps of
  every self-attention layer of the language model (the model family's, see
  :func:`mcl.adapters.language_attention_modules`), captured with forward hooks on its attention modules
  (the student's from the engine's own forward, the teacher's from its forward); the language model runs
  with ``eager`` attention (``sdpa`` returns no weights) from task 2 on. For every prompt token (image and
  question tokens: intra-modal image-image and question-question and inter-modal question-image attention)
  the attention row is a distribution over the keys; ACD is ``KL(teacher row || student row)`` averaged over
  heads, prompt tokens and layers (the paper's exact distance on VL-T5 differs; this is ours). The frozen
  vision tower is not distilled: its attention cannot change.
* Loss: the engine adds :meth:`QUAD.extra_loss` to its task loss (``per_sample_loss``), so the extra term is
  ``l * (QR + ACD) - l * task``: the sum is exactly ``(1 - l) * task + l * (QR + ACD)``, and the logged
  ``extra_loss`` is therefore negative at the start of a task. Task 1 trains like sequential LoRA.
* State: the trainable adapter only (the next task's teacher) plus the question store (driver state).
* Memory report (per task): ``stored_questions`` and ``stored_question_bytes`` (UTF-8 bytes of the question
  texts) available during the task, ``teacher_params`` (the frozen adapter copy) and ``trainable_params``.

On the generated stream (each task a new visual domain with the same colour -> object structure) QUAD
forgets less than sequential LoRA but much more than image replay. Measured (default config, seed 0): the
model after ``aerial``, asked the aerial question about underwater test images, answers "road" for 33 of
40, so the QR targets say little about the aerial mapping; the gain over sequential LoRA comes from QR
(with ``questions_per_task=0``, ACD alone, the matrix equals sequential LoRA's).

Hyper-parameters:
    questions_per_task: Questions kept per finished task (ours: 20, the same count as ``replay``'s buffer;
        the paper's memory is larger, but a question costs tens of bytes where a sample costs an image).
    replay_ratio: Fraction of every global batch that are question rows, in [0, 1) (ours: 0.25, the same as
        ``replay``).
    distill_weight: ``l`` in ``(1 - l) * task + l * (QR + ACD)``, in [0, 1] (paper: 0.5).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mcl.adapters import (
    ADAPTER_DIR,
    continue_lora,
    full_numel,
    language_attention_modules,
    load_lora,
    use_eager_language_attention,
    using_adapter,
)
from mcl.data import (
    IGNORE_INDEX,
    SampleRows,
    extra_rows_per_batch,
    mixed_training_order,
    reservoir_sample,
    training_order,
)
from mcl.methods_api import (
    Method,
    TaskContext,
    TrainingData,
    TrainingRequest,
    load_driver_state,
    register_method,
)
from mcl.worker.losses import StepShare, per_sample_loss, step_counts

QUESTIONS_KEY = "questions"
STUDENT = "default"
TEACHER = "quad_teacher"
_EPS = 1e-12
# Names of QUAD's step counts (Method.step_counts): the denominators of QR's and ACD's means over a step.
QUESTION_ROWS = "quad_question_rows"
PROMPT_TOKENS = "quad_prompt_tokens"


def prompt_tokens(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1.0 at the prompt tokens (unsupervised and not padding) of each row, else 0.0."""
    return ((labels == IGNORE_INDEX) & mask.bool()).float()


@dataclass
class QUADParams:
    """QUAD's hyper-parameters (see the module docstring)."""

    questions_per_task: int = field(default=20, metadata={"help": "Questions kept per finished task (>= 0)."})
    replay_ratio: float = field(
        default=0.25, metadata={"help": "Fraction of every global batch that are question rows, in [0, 1)."}
    )
    distill_weight: float = field(
        default=0.5, metadata={"help": "l in (1 - l) * task + l * (QR + ACD), in [0, 1] (paper: 0.5)."}
    )

    def __post_init__(self) -> None:
        if self.questions_per_task < 0:
            raise ValueError(f"questions_per_task must be >= 0, got {self.questions_per_task}")
        for name, low, high, closed in (
            ("replay_ratio", 0.0, 1.0, False),
            ("distill_weight", 0.0, 1.0, True),
        ):
            value = getattr(self, name)
            if not (low <= value <= high if closed else low <= value < high):
                raise ValueError(f"{name} must be in [{low:g}, {high:g}{']' if closed else ')'}, got {value}")


def stored_questions(driver_state: dict[str, Any] | None) -> list[dict[str, str]]:
    """The question store held in a driver state (empty at the start of a stream)."""
    if driver_state is None:
        return []
    if QUESTIONS_KEY not in driver_state:
        raise ValueError(
            f"the previous driver state has no QUAD {QUESTIONS_KEY!r} (keys: {sorted(driver_state)}); "
            "was the previous task trained by another method?"
        )
    return list(driver_state[QUESTIONS_KEY])


def question_replay_order(
    current: Sequence[dict[str, Any]],
    questions: Sequence[dict[str, str]],
    *,
    epochs: int,
    global_batch: int,
    questions_per_batch: int,
    rng_seed: str,
) -> list[dict[str, Any]]:
    """The global row order of a task with ``questions_per_batch`` unsupervised question rows per batch.

    Each epoch permutes the current rows (padded by wrapping around to whole batches of the remaining
    ``global_batch - questions_per_batch`` rows); each question row pairs a stored question with the image
    of a random current row. Deterministic for a given ``rng_seed``.
    """
    if questions_per_batch and not questions:
        raise ValueError(f"cannot put {questions_per_batch} question rows in a batch of {global_batch}")

    def draw(rng: random.Random, epoch: int, start: int) -> list[dict[str, Any]]:
        rows = []
        for n in range(questions_per_batch):
            q = rng.randrange(len(questions))
            host = current[rng.randrange(len(current))]
            rows.append(
                {
                    "id": f"quad-{epoch}-{start + n}-{questions[q]['task']}-q{q}-on-{host['id']}",
                    "image": host["image"],
                    "question": questions[q]["question"],
                    "answer": "",
                    "answer_type": host["answer_type"],
                    "task": host["task"],
                    "supervised": False,
                }
            )
        return rows

    return mixed_training_order(
        current,
        epochs=epochs,
        global_batch=global_batch,
        extra_per_batch=questions_per_batch,
        draw=draw,
        rng_seed=rng_seed,
    )


def kl_rows(teacher_probs: torch.Tensor, student_probs: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` of probability rows along the last dim (zeros of the teacher add 0)."""
    t, s = teacher_probs.float(), student_probs.float()
    return (torch.xlogy(t, t) - t * s.clamp_min(_EPS).log()).sum(-1)


@register_method
class QUAD(Method):
    name = "quad"
    Params = QUADParams

    def __init__(self, params: QUADParams) -> None:
        super().__init__(params)
        self._distill = False
        self._questions: list[dict[str, str]] = []
        self._student_attn: dict[int, torch.Tensor] = {}
        self._teacher_attn: dict[int, torch.Tensor] | None = None  # set only during the teacher forward
        self._hooks: list[Any] = []

    # -- driver side ------------------------------------------------------------------------------------
    def training_data(self, request: TrainingRequest) -> TrainingData:
        task, epochs, global_batch, seed = request.task, request.epochs, request.global_batch, request.seed
        store = [q for q in stored_questions(request.driver_state) if q["task"] != task.name]
        current = task.train
        per_batch = extra_rows_per_batch(self.params.replay_ratio, global_batch, len(store))
        if per_batch == 0:
            rows = training_order(current, epochs=epochs, global_batch=global_batch, seed=seed)
        else:
            rows = question_replay_order(
                SampleRows(current),
                store,
                epochs=epochs,
                global_batch=global_batch,
                questions_per_batch=per_batch,
                rng_seed=f"mcl-quad-batches-{seed}",
            )
        kept = reservoir_sample(
            current, self.params.questions_per_task, random.Random(f"mcl-quad-questions-{seed}")
        )
        store += [{"task": task.name, "question": s.question} for s in kept]
        return TrainingData(
            rows, {"questions_per_task": self.params.questions_per_task, QUESTIONS_KEY: store}
        )

    # -- worker side ------------------------------------------------------------------------------------
    def setup_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        self._questions = stored_questions(load_driver_state(ctx.previous_state_dir))
        self._distill = ctx.previous_state_dir is not None
        if self._distill:
            use_eager_language_attention(model)
        peft_model = continue_lora(model, ctx, adapter_name=STUDENT)
        if ctx.previous_state_dir is None:
            return peft_model
        adapter = ctx.previous_state_dir / ADAPTER_DIR
        peft_model.load_adapter(str(adapter), adapter_name=TEACHER, is_trainable=False)
        attention = [m for _, m in language_attention_modules(peft_model)]
        self._hooks = [m.register_forward_hook(self._attention_hook(i)) for i, m in enumerate(attention)]
        return peft_model

    def load_for_evaluation(
        self, model: torch.nn.Module, state_dir: Path, ctx: TaskContext
    ) -> torch.nn.Module:
        """The saved student alone (no teacher, no distillation hooks). From the second task on, the workers
        trained and evaluated with eager attention in the language model (attention maps for distillation):
        so does this, for the same answers."""
        if ctx.task_index > 0:
            use_eager_language_attention(model)
        return load_lora(model, Path(state_dir) / ADAPTER_DIR, trainable=False, adapter_name=STUDENT)

    def _attention_hook(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if self._teacher_attn is not None:
                self._teacher_attn[index] = weights
            elif module.training:
                self._student_attn[index] = weights

        return hook

    def distillation_terms(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        outputs: Any,
        share: StepShare | None = None,
    ) -> dict[str, torch.Tensor]:
        """``task`` (the engine's task loss), ``qr`` and ``acd`` for a training micro-batch whose student
        forward (``outputs``) has just run; runs the teacher forward. Each term is this micro-batch's part of
        its mean over the optimiser step (``share``: the engine's ``ctx.step``; None: over this batch)."""
        share = share or StepShare(step_counts(batch) | self.step_counts(batch, None))
        student_attn, self._student_attn = self._student_attn, {}
        labels, mask = batch["labels"], batch["attention_mask"]
        self._teacher_attn = {}
        try:
            with torch.no_grad(), using_adapter(model, TEACHER):
                teacher = model(**{k: v for k, v in batch.items() if k != "labels"})
            teacher_attn = self._teacher_attn
        finally:
            self._teacher_attn = None
        if not student_attn or any(a is None for a in (*student_attn.values(), *teacher_attn.values())):
            raise RuntimeError(
                "QUAD: the language model returned no attention weights (not eager attention?)"
            )
        zero = outputs.logits.new_zeros((), dtype=torch.float32)
        unsupervised = (labels == IGNORE_INDEX).all(dim=1)

        qr = zero
        rows = unsupervised.nonzero().squeeze(1)
        if rows.numel():
            positions = torch.arange(mask.shape[1], device=mask.device)
            answer_at = (mask.bool() * positions).argmax(dim=1)[rows]  # the last prompt token
            student_logp = F.log_softmax(outputs.logits[rows, answer_at].float(), dim=-1)
            teacher_logp = F.log_softmax(teacher.logits[rows, answer_at].float(), dim=-1)
            qr_sum = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
            qr = share.mean(qr_sum, QUESTION_ROWS)  # mean over the step's question rows

        acd = zero
        current = (~unsupervised).nonzero().squeeze(1)
        if current.numel():
            queries = prompt_tokens(labels[current], mask[current])
            layers = []
            for index in sorted(student_attn):
                # [rows, heads, queries, keys] -> KL per query row, mean over heads -> [rows, queries]
                kl = kl_rows(teacher_attn[index][current], student_attn[index][current]).mean(dim=1)
                layers.append(
                    share.mean((kl * queries).sum(), PROMPT_TOKENS)
                )  # over the step's prompt tokens
            acd = torch.stack(layers).mean()
        return {"task": per_sample_loss(outputs.logits, labels, share), "qr": qr, "acd": acd}

    def step_counts(self, batch: dict[str, torch.Tensor], ctx: TaskContext | None) -> dict[str, float]:
        """QR's and ACD's denominators: the micro-batch's question rows and its current rows' prompt tokens."""
        labels = batch["labels"]
        unsupervised = (labels == IGNORE_INDEX).all(dim=1)
        current = ~unsupervised
        return {
            QUESTION_ROWS: float(unsupervised.sum()),
            PROMPT_TOKENS: float(prompt_tokens(labels[current], batch["attention_mask"][current]).sum()),
        }

    def extra_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any, ctx: TaskContext
    ) -> torch.Tensor | None:
        weight = self.params.distill_weight
        if not self._distill or weight == 0:
            return None
        terms = self.distillation_terms(model, batch, outputs, ctx.step)
        return weight * (terms["qr"] + terms["acd"]) - weight * terms["task"]

    def after_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        self._student_attn = {}

    def state_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for n, p in model.named_parameters() if p.requires_grad or _is_student_adapter(n)]

    def save_state(self, model: torch.nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        # The trainable adapter only: it is the next task's student start and teacher.
        model.save_pretrained(
            str(out_dir / ADAPTER_DIR), safe_serialization=True, selected_adapters=[STUDENT]
        )

    def memory_report(self, model: torch.nn.Module) -> dict[str, float]:
        teacher = sum(full_numel(p) for n, p in model.named_parameters() if f".{TEACHER}." in n)
        return {
            **super().memory_report(model),
            "teacher_params": float(teacher),
            "stored_questions": float(len(self._questions)),
            "stored_question_bytes": float(sum(len(q["question"].encode()) for q in self._questions)),
        }


def _is_student_adapter(name: str) -> bool:
    return ("lora_" in name or "modules_to_save" in name) and f".{TEACHER}." not in name
