"""Evaluation by generation: greedy answers for every task's test samples, scored per task.

An :class:`Evaluator` turns a rank's evaluation batches into prediction records, gathered on rank 0. Today's
backend, :class:`GenerationEvaluator`, generates inside the training workers (through the method's
``generate`` hook, so routed and branched methods answer as they would at inference). :func:`score_records`
turns records into accuracy per task; :func:`phase_scores` scores a phase's records (tasks and probes) and
:func:`score_phase` adds the method's own metrics, for every evaluation backend (the workers and the Ray Data
actor pool, :mod:`mcl.evaluation.actor_pool`).

Per answer type, :class:`AnswerLimits` caps the new tokens and names stop strings (``eval.max_new_tokens_by_type``,
``eval.stop_strings_by_type``); :class:`RowStops` ends each row of a batch at its own limit, which ``transformers``'
batch-wide ``stop_strings`` cannot do for a batch of mixed types. Records carry their row's position when the rows
came from a :class:`mcl.data.AnswerOrder` (e.g. sorted by length); rank 0 puts them back in the original order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mcl.data import POSITION, collate, in_original_order

if TYPE_CHECKING:
    from mcl.methods_api import Method, TaskContext

Record = dict[str, Any]


class Evaluator(Protocol):
    """Prediction records (``id``, ``task``, ``prediction``, ``answer``, ``answer_type`` and the method's
    extras) for this rank's evaluation batches; rank 0 gets every rank's records, the others ``[]``."""

    def predict(self, batches: Iterable[dict[str, np.ndarray]], ctx: TaskContext) -> list[Record]: ...


@dataclass(frozen=True)
class AnswerLimits:
    """How long each answer may grow, by answer type (``eval.max_new_tokens_by_type``,
    ``eval.stop_strings_by_type``); types not named get ``max_new_tokens`` and no stop strings."""

    max_new_tokens: int
    max_new_tokens_by_type: Mapping[str, int] = field(default_factory=dict)
    stop_strings_by_type: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @property
    def per_type(self) -> bool:
        """Whether any type has its own limit or stop strings (else every batch generates as before)."""
        return bool(self.max_new_tokens_by_type or self.stop_strings_by_type)

    def tokens(self, answer_type: str) -> int:
        return self.max_new_tokens_by_type.get(answer_type, self.max_new_tokens)

    def stops(self, answer_type: str) -> tuple[str, ...]:
        return tuple(self.stop_strings_by_type.get(answer_type, ()))


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to its first stop string: the one whose end comes first (the longest of those ending
    there), so the cut depends only on the text up to that end and generation may stop as soon as it appears.
    ``text`` itself when it holds none."""
    ends = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not ends:
        return text
    end, minus_len = min(ends)
    return text[: end + minus_len]


class RowStops:
    """A ``transformers`` stopping criterion with a limit per row of the batch: row ``i`` is done once it has
    ``max_new[i]`` new tokens or its decoded answer holds one of ``stops[i]`` (see :func:`cut_at_stop`)."""

    def __init__(
        self, tokenizer: Any, prompt_len: int, max_new: list[int], stops: list[tuple[str, ...]]
    ) -> None:
        self.tokenizer, self.prompt_len, self.max_new, self.stops = tokenizer, prompt_len, max_new, stops

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids[:, self.prompt_len :]
        done = [
            self._done(row, limit, stops)
            for row, limit, stops in zip(new, self.max_new, self.stops, strict=True)
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _done(self, row: Any, limit: int, stops: tuple[str, ...]) -> bool:
        if len(row) >= limit:
            return True
        if not stops:
            return False
        text = self.tokenizer.decode(row, skip_special_tokens=True)
        return any(s in text for s in stops)


class GenerationEvaluator:
    """Greedy generation with the model being trained, in the training workers.

    Ranks may hold different numbers of batches; under ZeRO-3 every forward is collective, so a rank that
    has run out repeats its last batch (outputs discarded) until all are done, and generation runs with
    ``synced_gpus``.
    """

    def __init__(
        self,
        model: Any,
        method: Method,
        processor: Any,
        max_new_tokens: int | AnswerLimits,
        device: Any,
        dtype: Any,
        *,
        synced_gpus: bool = False,
    ) -> None:
        self.model, self.method, self.processor = model, method, processor
        self.device, self.dtype = device, dtype
        self.limits = (
            max_new_tokens if isinstance(max_new_tokens, AnswerLimits) else AnswerLimits(max_new_tokens)
        )
        tokenizer = processor.tokenizer
        self.gen_kwargs = {
            "max_new_tokens": self.limits.max_new_tokens,
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if synced_gpus:
            self.gen_kwargs["synced_gpus"] = True

    def predict(self, batches: Iterable[dict[str, np.ndarray]], ctx: TaskContext) -> list[Record]:
        import torch

        from mcl.worker.engine import dist_rank_world

        rank, world = dist_rank_world()
        was_training = self.model.training
        self.model.eval()
        records: list[Record] = []
        with torch.no_grad():
            for batch, dummy in _lockstep(iter(batches), rank, world, self.device):
                answers = self.answer(batch, ctx)
                if not dummy:
                    records.extend(answers)
        self.model.train(was_training)
        return in_original_order(_gather_on_rank0(records, rank, world))

    def answer(self, batch: dict[str, np.ndarray], ctx: TaskContext) -> list[Record]:
        """Prediction records of one preprocessed evaluation batch (no collectives of its own: under ZeRO-3
        every rank must call it in step). Both backends answer through it: the workers
        (:meth:`predict`) and the Ray Data actors (:class:`mcl.evaluation.actor_pool.PhaseAnswerer`)."""
        from mcl.worker.engine import to_device

        tokenizer = self.processor.tokenizer
        inputs = to_device(collate(batch, tokenizer.pad_token_id, left_pad=True), self.device, self.dtype)
        types = [str(t) for t in batch["answer_type"]]
        gen_kwargs = self._batch_kwargs(types, inputs["input_ids"].shape[1])
        generated = self.method.generate(self.model, inputs, gen_kwargs, ctx)
        new_tokens, extras = generated if isinstance(generated, tuple) else (generated, {})
        if self.limits.per_type:
            texts = [
                cut_at_stop(
                    tokenizer.decode(row[: self.limits.tokens(t)], skip_special_tokens=True),
                    self.limits.stops(t),
                )
                for row, t in zip(new_tokens, types, strict=True)
            ]
        else:
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        positions = batch.get(POSITION)
        return [
            {
                "id": str(batch["id"][i]),
                "task": str(batch["task"][i]),
                "prediction": text.strip(),
                "answer": str(batch["answer"][i]),
                "answer_type": types[i],
                **({POSITION: int(positions[i])} if positions is not None else {}),
                **{key: values[i] for key, values in extras.items()},
            }
            for i, text in enumerate(texts)
        ]

    def _batch_kwargs(self, types: list[str], prompt_len: int) -> dict[str, Any]:
        """Generation settings of a batch: as configured, or with per-type limits the longest of the batch's
        limits and a stopping criterion that ends each row at its own (:class:`RowStops`)."""
        if not self.limits.per_type:
            return self.gen_kwargs
        from transformers import StoppingCriteriaList

        limits = [self.limits.tokens(t) for t in types]
        stops = RowStops(self.processor.tokenizer, prompt_len, limits, [self.limits.stops(t) for t in types])
        return {
            **self.gen_kwargs,
            "max_new_tokens": max(limits),
            "stopping_criteria": StoppingCriteriaList([stops]),
        }


def _lockstep(
    batches: Iterator[dict[str, np.ndarray]], rank: int, world: int, device: Any
) -> Iterator[tuple[dict[str, np.ndarray], bool]]:
    """``(batch, dummy)`` until every rank has run out: a rank that ran out first repeats its last batch
    (``dummy`` True) so that collective forwards stay matched."""
    import torch
    import torch.distributed as td

    last: dict[str, np.ndarray] | None = None
    while True:
        batch = next(batches, None)
        if world > 1:
            more = torch.tensor([int(batch is not None)], device=device)
            td.all_reduce(more, op=td.ReduceOp.MAX)
            if not more.item():
                return
            if batch is None and last is None:
                raise RuntimeError(f"rank {rank} has no evaluation data while others do")
        elif batch is None:
            return
        dummy = batch is None
        last = last if dummy else batch
        assert last is not None
        yield last, dummy


def _gather_on_rank0(records: list[Record], rank: int, world: int) -> list[Record]:
    if world == 1:
        return records
    import torch.distributed as td

    gathered: list[Any] = [None] * world if rank == 0 else []
    td.gather_object(records, gathered if rank == 0 else None, dst=0)
    return [r for part in gathered for r in part] if rank == 0 else []


def score_records(records: list[Record], task_names: list[str]) -> dict[str, float]:
    """Accuracy in percent per task from prediction records (adds each record's ``score``)."""
    from mcl.evaluation.scoring import score

    totals: dict[str, list[float]] = {t: [] for t in task_names}
    for r in records:
        r["score"] = score(r["prediction"], r["answer"], r["answer_type"])
        totals.setdefault(r["task"], []).append(r["score"])
    return {t: 100.0 * sum(v) / len(v) if v else float("nan") for t, v in totals.items()}


@dataclass
class PhaseScores:
    """A phase's scores: accuracy (%) per evaluated task, and per probe (``stream.probes``)."""

    accuracy: dict[str, float]
    probes: dict[str, float]


def phase_scores(records: list[Record], task_names: Sequence[str], probe_names: Sequence[str]) -> PhaseScores:
    """Score a phase's prediction records (adds each record's ``score``): the accuracy of each task of
    ``task_names`` (the tasks the phase evaluates; NaN for one without records) and, apart, of each probe,
    whose records carry the task ``probe:<name>``. Records of other tasks are scored but not counted.
    Every evaluation backend builds its :class:`~mcl.worker.job.TaskResult` scores with this function."""
    from mcl.streams.probes import probe_task_name

    probe_tasks = {name: probe_task_name(name) for name in probe_names}
    scored = score_records(records, [*task_names, *probe_tasks.values()])
    return PhaseScores(
        accuracy={t: scored[t] for t in task_names},
        probes={name: scored[task] for name, task in probe_tasks.items()},
    )


def score_phase(
    records: list[Record],
    task_names: Sequence[str],
    probe_names: Sequence[str],
    method: Method,
    ctx: TaskContext,
) -> tuple[PhaseScores, dict[str, float]]:
    """A phase's scores (:func:`phase_scores`) and the method's own metrics (``Method.eval_metrics``, which
    read the stream's tasks only: probe records are left out) from its prediction records: the one scoring
    path of both evaluation backends (the workers' :class:`~mcl.worker.recipe.PhaseRecipe` and the Ray Data
    actor pool, :mod:`mcl.evaluation.actor_pool`)."""
    from mcl.streams.probes import PROBE_PREFIX

    scores = phase_scores(records, task_names, probe_names)
    task_records = [r for r in records if not str(r["task"]).startswith(PROBE_PREFIX)]
    return scores, method.eval_metrics(task_records, ctx)


__all__ = [
    "AnswerLimits",
    "Evaluator",
    "GenerationEvaluator",
    "PhaseScores",
    "RowStops",
    "cut_at_stop",
    "phase_scores",
    "score_phase",
    "score_records",
]
