"""Evaluation by generation: greedy answers for every task's test samples, scored per task.

An :class:`Evaluator` turns a rank's evaluation batches into prediction records, gathered on rank 0. Today's
backend, :class:`GenerationEvaluator`, generates inside the training workers (through the method's
``generate`` hook, so routed and branched methods answer as they would at inference). :func:`score_records`
turns records into accuracy per task.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mcl.data import collate

if TYPE_CHECKING:
    from mcl.methods_api import Method, TaskContext

Record = dict[str, Any]


class Evaluator(Protocol):
    """Prediction records (``id``, ``task``, ``prediction``, ``answer``, ``answer_type`` and the method's
    extras) for this rank's evaluation batches; rank 0 gets every rank's records, the others ``[]``."""

    def predict(self, batches: Iterable[dict[str, np.ndarray]], ctx: TaskContext) -> list[Record]: ...


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
        max_new_tokens: int,
        device: Any,
        dtype: Any,
        *,
        synced_gpus: bool = False,
    ) -> None:
        self.model, self.method, self.processor = model, method, processor
        self.device, self.dtype = device, dtype
        tokenizer = processor.tokenizer
        self.gen_kwargs = {
            "max_new_tokens": max_new_tokens,
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
        return _gather_on_rank0(records, rank, world)

    def answer(self, batch: dict[str, np.ndarray], ctx: TaskContext) -> list[Record]:
        """Prediction records of one preprocessed evaluation batch (no collectives of its own: under ZeRO-3
        every rank must call it in step). Both backends answer through it: the workers
        (:meth:`predict`) and the Ray Data actors (:class:`mcl.evaluation.actor_pool.PhaseAnswerer`)."""
        from mcl.worker.engine import to_device

        tokenizer = self.processor.tokenizer
        inputs = to_device(collate(batch, tokenizer.pad_token_id, left_pad=True), self.device, self.dtype)
        generated = self.method.generate(self.model, inputs, self.gen_kwargs, ctx)
        new_tokens, extras = generated if isinstance(generated, tuple) else (generated, {})
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [
            {
                "id": str(batch["id"][i]),
                "task": str(batch["task"][i]),
                "prediction": text.strip(),
                "answer": str(batch["answer"][i]),
                "answer_type": str(batch["answer_type"][i]),
                **{key: values[i] for key, values in extras.items()},
            }
            for i, text in enumerate(texts)
        ]


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


def score_phase(
    records: list[Record], task_names: list[str], method: Method, ctx: TaskContext
) -> tuple[dict[str, float], dict[str, float]]:
    """A phase's accuracy per task and the method's own metrics from its prediction records: the one scoring
    path of both evaluation backends."""
    accuracy = score_records(records, task_names)
    return accuracy, method.eval_metrics(records, ctx)


def score_records(records: list[Record], task_names: list[str]) -> dict[str, float]:
    """Accuracy in percent per task from prediction records (adds each record's ``score``)."""
    from mcl.evaluation.scoring import score

    totals: dict[str, list[float]] = {t: [] for t in task_names}
    for r in records:
        r["score"] = score(r["prediction"], r["answer"], r["answer_type"])
        totals.setdefault(r["task"], []).append(r["score"])
    return {t: 100.0 * sum(v) / len(v) if v else float("nan") for t, v in totals.items()}


__all__ = ["Evaluator", "GenerationEvaluator", "score_phase", "score_records"]
