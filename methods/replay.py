"""Experience replay from a tiny episodic memory, on a sequentially fine-tuned LoRA adapter.

Papers: Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", arXiv 2019 (ER with a reservoir
buffer); Rolnick et al., "Experience Replay for Continual Learning", NeurIPS 2019.

What it does: a small buffer keeps ``buffer_per_task`` training samples of every finished task; while a later
task is trained, every batch mixes stored samples with the current task's, so the loss keeps reminding the
model of the earlier tasks' answers.

How it is implemented here:

* Buffer (driver side): after the rows of task ``t`` are chosen, ``buffer_per_task`` of its training samples
  are drawn by reservoir sampling (Algorithm R over the task's samples in their stream order, seeded by the
  task's seed: deterministic per seed) and appended to the buffer. The buffer is the method's *driver state*
  (:class:`mcl.methods_api.TrainingData`): JSON rows ``{id, image, question, answer, answer_type, task}``
  (the image as its path), saved by the engine with the task's checkpoint as ``driver_state.json`` and
  handed back to the next task. What a task replays is that saved buffer, never recomputed, so a run resumed
  from a checkpoint replays exactly what the uninterrupted run did.
* Batches (driver side): while training task ``t > 0`` every global batch of ``B`` rows holds
  ``r = round(replay_ratio * B)`` replay rows (at most ``B - 1``; none while the buffer is empty) drawn from
  the buffer (seeded; without replacement within a batch when the buffer is large enough) and ``B - r`` rows
  of the current task, shuffled together. An epoch is one pass over the current task's data: each epoch
  permutes the current samples (seeded) and pads the permutation by wrapping around to whole batches, so
  there are ``ceil(N / (B - r))`` steps per epoch for ``N`` current samples (the replay rows come on top of,
  not instead of, the current data, as in Chaudhry et al.'s ER). Task 0 trains exactly like sequential LoRA.
* Model (worker side): the same as sequential LoRA: one LoRA adapter (plus the multimodal projector when
  ``model.lora.train_projector``) continued from the previous task's adapter. Replay rows are ordinary
  supervised rows; the engine's task loss covers them.
* Memory report (per task): the buffer replayed during the task (read from the previous task's
  ``driver_state.json``): ``buffer_rows``, ``buffer_json_bytes`` (its annotation rows) and
  ``buffer_image_bytes`` (the image files it refers to: what a deployment storing the buffer would keep),
  plus ``trainable_params``.

Hyper-parameters (the papers tune them per benchmark; the defaults are ours):
    buffer_per_task: Samples kept per finished task (default 20: 12.5% of a task of the default generated
        stream, a "tiny" memory in Chaudhry et al.'s sense, which studies 1-5 samples per class).
    replay_ratio: Fraction of every global batch taken from the buffer, in [0, 1) (default 0.25: 4 of 16
        rows; Chaudhry et al. pair every current batch with an equal-sized memory batch, i.e. 0.5 of the
        joint batch, but at 0.25 each epoch needs 1.4x sequential LoRA's steps instead of 2x).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mcl.adapters import ADAPTER_DIR, continue_lora, save_lora
from mcl.data import (
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

BUFFER_KEY = "buffer"
# What a buffer row keeps of a sample (the image by path): the row keys minus the engine's ``supervised``.
BUFFER_ROW_KEYS = ("id", "image", "question", "answer", "answer_type", "task")


@dataclass
class ReplayParams:
    """Experience replay's hyper-parameters (see the module docstring)."""

    buffer_per_task: int = field(default=20, metadata={"help": "Samples kept per finished task (>= 0)."})
    replay_ratio: float = field(
        default=0.25, metadata={"help": "Fraction of every global batch taken from the buffer, in [0, 1)."}
    )

    def __post_init__(self) -> None:
        if self.buffer_per_task < 0:
            raise ValueError(f"buffer_per_task must be >= 0, got {self.buffer_per_task}")
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ValueError(f"replay_ratio must be in [0, 1), got {self.replay_ratio}")


def mixed_order(
    current: Sequence[dict[str, Any]],
    replay: Sequence[dict[str, Any]],
    *,
    epochs: int,
    global_batch: int,
    replay_per_batch: int,
    rng_seed: str,
) -> list[dict[str, Any]]:
    """The global row order of a task with ``replay_per_batch`` rows drawn from ``replay`` in every batch
    (without replacement within a batch when the buffer is large enough). Deterministic for ``rng_seed``."""
    if replay_per_batch and not replay:
        raise ValueError("replay rows were asked for but there is nothing to replay")

    def draw(rng: random.Random, _epoch: int, _start: int) -> list[dict[str, Any]]:
        if replay_per_batch <= len(replay):
            return rng.sample(list(replay), replay_per_batch)
        return rng.choices(list(replay), k=replay_per_batch)

    return mixed_training_order(
        current,
        epochs=epochs,
        global_batch=global_batch,
        extra_per_batch=replay_per_batch,
        draw=draw,
        rng_seed=rng_seed,
    )


def buffer_rows(driver_state: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The replay buffer held in a driver state (empty at the start of a stream)."""
    if driver_state is None:
        return []
    if BUFFER_KEY not in driver_state:
        raise ValueError(
            f"the previous driver state has no replay {BUFFER_KEY!r} (keys: {sorted(driver_state)}); "
            "was the previous task trained by another method?"
        )
    return list(driver_state[BUFFER_KEY])


@register_method
class ExperienceReplay(Method):
    name = "replay"
    Params = ReplayParams

    def __init__(self, params: ReplayParams) -> None:
        super().__init__(params)
        self._replayed: list[dict[str, Any]] = []

    # -- driver side ------------------------------------------------------------------------------------
    def training_data(self, request: TrainingRequest) -> TrainingData:
        task, epochs, global_batch, seed = request.task, request.epochs, request.global_batch, request.seed
        # A re-run of a task (never the case in a normal stream) must not replay that task's own rows.
        buffer = [row for row in buffer_rows(request.driver_state) if row["task"] != task.name]
        current = task.train
        replay_per_batch = extra_rows_per_batch(self.params.replay_ratio, global_batch, len(buffer))
        if replay_per_batch == 0:
            rows = training_order(current, epochs=epochs, global_batch=global_batch, seed=seed)
        else:
            replay = [{**row, "supervised": True} for row in buffer]
            rows = mixed_order(
                SampleRows(current),
                replay,
                epochs=epochs,
                global_batch=global_batch,
                replay_per_batch=replay_per_batch,
                rng_seed=f"mcl-replay-batches-{seed}",
            )
        kept = reservoir_sample(
            current, self.params.buffer_per_task, random.Random(f"mcl-replay-buffer-{seed}")
        )
        new_rows = [{k: getattr(s, k) for k in BUFFER_ROW_KEYS} for s in kept]
        state = {"buffer_per_task": self.params.buffer_per_task, BUFFER_KEY: buffer + new_rows}
        return TrainingData(rows, state)

    # -- worker side ------------------------------------------------------------------------------------
    def setup_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        # The buffer replayed in this task, for memory_report (which only gets the model).
        self._replayed = buffer_rows(load_driver_state(ctx.previous_state_dir))
        return continue_lora(model, ctx)

    def save_state(self, model: torch.nn.Module, out_dir: Path, ctx: TaskContext) -> None:
        save_lora(model, out_dir / ADAPTER_DIR)

    def memory_report(self, model: torch.nn.Module) -> dict[str, float]:
        image_bytes = 0
        for row in self._replayed:
            path = Path(row["image"])
            image_bytes += path.stat().st_size if path.is_file() else 0
        return {
            **super().memory_report(model),
            "buffer_rows": float(len(self._replayed)),
            "buffer_json_bytes": float(len(json.dumps(self._replayed).encode())) if self._replayed else 0.0,
            "buffer_image_bytes": float(image_bytes),
        }
