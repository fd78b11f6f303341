"""Mid-phase step checkpoints: every rank's part of the training state after an optimiser step.

A step checkpoint holds what an uninterrupted run carries from one step to the next, so a resumed phase
computes the same losses, weights and predictions as one that never stopped:

- the trainable parameters (never the frozen base: a 7B base is 14 GB; LoRA + projector are megabytes);
- the optimizer and learning-rate scheduler state; under DeepSpeed ZeRO its partitioned fp32 master weights
  and Adam moments, one file per rank (``engine.save_checkpoint``);
- every rank's RNG states and the step reached, plus whatever per-rank ``client_state`` the caller adds
  (the loss log so far; a method's accumulators, see below).

Which file each rank writes (folder ``F``, DeepSpeed 0.19.8 ``runtime/engine.py``)::

    F/meta.json                                   rank 0: step, phase key, world size, engine, ZeRO stage
    F/rng_rank<r>.pt                              every rank: python, numpy, torch CPU (+ CUDA) RNG states
    F/client_rank<r>.pt                           every rank, when ``client_state`` is given
    F/torch_state.pt                              plain torch, rank 0: trainable params, optimizer, scheduler
    F/deepspeed/mp_rank_00_model_states.pt        ZeRO-0/1/2, rank 0 (``save_non_zero_checkpoint``, :1899):
                                                  trainable params, scheduler, DeepSpeed's step counters
    F/deepspeed/zero_pp_rank_<r>_mp_rank_00_model_states.pt   ZeRO-3, every rank (its parameter partitions)
    F/deepspeed/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   ZeRO-1/2/3, every rank (its optimizer partition)
    F/zero_to_fp32.py                             rank 0 (DeepSpeed copies its recovery script)

``engine.save_checkpoint`` is collective (barriers and an all-reduce validating the tag, :4869-4982): every
rank must call it. ``exclude_frozen_parameters=True`` drops frozen weights from the module state dict
(``module_state_dict``, :4008) and, under ZeRO-2, stops DeepSpeed writing every frozen parameter's fragment
(``save_frozen_param``, :5383). On load, every ZeRO-0/1/2 rank reads rank 0's ``mp_rank_00`` file
(``_get_all_ckpt_names``, :4383) and its own optimizer partition, so all ranks' files must end up in one
folder: Ray Train does exactly that (below).
``load_checkpoint`` refuses a different data-parallel world size itself (``_load_zero_checkpoint``, :4733);
:func:`load_step_checkpoint` checks world size, engine and ZeRO stage first, with a clearer message.

RNG streams that matter for exact resumption in this engine: the torch CPU generator (and the CUDA
generator of the rank's device) feeds dropout in the model and in LoRA (``model.lora.dropout``), and anything
a method draws from the global torch generator per step. Training rows are ordered and sharded before the
phase (seeded ``random.Random`` instances in :mod:`mcl.data` and the methods' ``training_data``), so no
per-step data randomness exists; python's and numpy's global states are restored as well, for methods that
use them. Everything set up before training (model load, LoRA initialisation, DeepSpeed) draws from the same
streams, so :func:`load_step_checkpoint` must run after the trainer is built and right before the first
step: it overwrites the RNG states last.

Method state outside the parameters: a method that accumulates across the steps of a phase (EWC's fisher
phase sums squared gradients in ``on_gradients``) must pass that accumulator as ``client_state`` and put it
back after loading, or the resumed phase silently sees only the steps after the checkpoint.

How Ray Train V2 (Ray 2.60, ``ray/train/v2/_internal/execution/``) handles checkpoints from several ranks:

1. ``report(metrics, checkpoint=Checkpoint.from_directory(d))`` on every rank first agrees on one folder
   name: rank 0's ``checkpoint_dir_name`` (or its timestamp default) is broadcast through the
   synchronization actor (``context.py:228`` ``_sync_checkpoint_dir_name_across_ranks``); the broadcast is
   also the barrier that makes ``report`` collective.
2. Each rank then copies its local folder into ``<storage>/<run name>/<that name>/`` with
   ``pyarrow.fs.copy_files`` (``storage.py:458`` ``persist_current_checkpoint``, :503-509). The copies
   *merge*: files with different names from different ranks sit side by side, a name written by two ranks
   is overwritten by whichever copies last. Hence per-rank file names here, and rank-0-only shared files.
3. The controller waits until every rank has reported, checks all ranks reported the same path, and
   registers rank 0's checkpoint (``checkpoint/report_handler.py:67-127``). Only then is the checkpoint
   "the latest" (``checkpoint/checkpoint_manager.py:143`` ``register_checkpoint``): a group that dies
   mid-upload leaves a folder that is never handed out. The controller learns of reports by polling the
   workers, so a rank that dies right after its ``report`` returned can beat the poll: that checkpoint is
   then never registered and the group resumes from the one before (still exact, only more steps redone;
   measured in ``tests/worker/test_checkpoint.py``). ``ray.train.get_all_reported_checkpoints(
   consistency_mode=CheckpointConsistencyMode.COMMITTED)`` blocks until the reports so far are registered.
   The redone steps report the same folder name again; every rank overwrites its own files with the same
   bytes.
4. ``CheckpointConfig(num_to_keep=K)`` keeps the K newest registered checkpoints (report order when no
   ``checkpoint_score_attribute``) and never deletes the latest; older folders are deleted after the
   manager's snapshot ``checkpoint_manager_snapshot.json`` is written (``checkpoint_manager.py:263-307``).
5. After a worker failure the controller starts a new group and gives *every* rank the same latest
   checkpoint (``checkpoint_manager.py:552-559`` ``before_init_train_context``): ``get_checkpoint()``
   returns the whole merged folder on each rank. A driver re-running ``fit()`` with the same
   ``RunConfig(name, storage_path)`` reloads the snapshot (``checkpoint_manager.py:465``) and does the same.
6. ``Checkpoint.as_directory()`` (``ray/train/_checkpoint.py:234``) yields the storage path itself on a local
   (or NFS) filesystem and downloads to a node-local temp folder (one download per node, file-locked) for
   other pyarrow filesystems: ``storage_path`` may be ``/shared/path``, ``file:///shared/path``,
   ``s3://bucket/prefix`` or ``gs://...``. On several nodes a plain local path must be shared storage:
   Ray checks a marker file and refuses to upload otherwise (``storage.py:501`` ``_check_validation_file``).
7. Upload modes: ``SYNC`` (default) copies before ``report`` returns; ``ASYNC`` copies on a background
   thread and deletes the local folder afterwards (``delete_local_checkpoint_after_upload`` defaults to
   True for it); ``NO_UPLOAD`` reports a folder already inside the run's storage. Ray's local mode
   (``ScalingConfig(num_workers=0)``) uploads nothing and keeps a reference to the reported folder, which
   :func:`report_step_checkpoint` deletes: mcl's in-process runs do not go through Ray at all.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mcl.worker.engine import dist_rank_world

if TYPE_CHECKING:
    from mcl.worker.engine import StepEngine

META_FILE = "meta.json"
TORCH_STATE_FILE = "torch_state.pt"
DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's own sub-folder (its "tag")
FORMAT_VERSION = 1


@dataclass
class StepCheckpointMeta:
    """What a step checkpoint says about itself (``meta.json``), plus this rank's ``client_state``.

    Attributes:
        step: Optimiser steps of the phase completed when it was saved (the next batch to train is ``step``).
        phase_key: The caller's name for the phase (e.g. ``"<task>:<phase>"``); a checkpoint of another phase
            is not resumed.
        world_size: Ranks that wrote it (ZeRO partitions and data shards depend on it).
        engine: ``"deepspeed"`` or ``"torch"``.
        zero_stage: DeepSpeed's ZeRO stage (0 under plain torch).
        version: The folder's format (:data:`FORMAT_VERSION`).
        attempt: The caller's name for the attempt that saved it (e.g. one ``TorchTrainer.fit``), so that a
            later attempt can tell its own checkpoints from an earlier one's.
        client_state: What this rank passed as ``client_state`` when saving (not part of ``meta.json``).
    """

    step: int
    phase_key: str
    world_size: int
    engine: str
    zero_stage: int
    version: int = FORMAT_VERSION
    attempt: str = ""
    client_state: dict[str, Any] | None = field(default=None, compare=False)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("client_state")
        return json.dumps(data, indent=1)


def _barrier() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
        td.barrier()


def engine_kind(trainer: StepEngine) -> tuple[str, int]:
    """(``"deepspeed"`` or ``"torch"``, ZeRO stage) of a trainer."""
    if trainer.deepspeed:
        return "deepspeed", int(trainer.engine.zero_optimization_stage())
    return "torch", 0


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def _client_file(rank: int) -> str:
    return f"client_rank{rank:05d}.pt"


def _load(path: Path) -> Any:
    import torch

    # Our own files: RNG states hold numpy arrays and python tuples, which weights_only refuses.
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU and (if in use) current-CUDA-device RNG states."""
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def trainable_parameters(module: Any) -> dict[str, Any]:
    """The module's parameters that require gradients, by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def save_step_checkpoint(
    trainer: StepEngine,
    folder: str | Path,
    *,
    step: int,
    phase_key: str,
    client_state: Mapping[str, Any] | None = None,
    attempt: str = "",
) -> Path:
    """Write this rank's part of the training state after ``step`` optimiser steps into ``folder``.

    Collective: every rank calls it at the same step (DeepSpeed's save synchronises the ranks). Each rank's
    files have their own names, so the ranks may write into one shared folder or into their own folders that
    Ray Train merges (see the module docstring).

    Args:
        trainer: The step engine (DeepSpeed or plain torch / DDP).
        folder: Where this rank's files go (created if missing).
        step: Optimiser steps completed in this phase.
        phase_key: The phase's name; :func:`restore_from_ray` resumes only a checkpoint of the same phase.
        client_state: Extra per-rank state to save with it (loss log, a method's accumulators).

    Returns:
        ``folder`` as a path.
    """
    import torch

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = dist_rank_world()
    engine, stage = engine_kind(trainer)
    if trainer.deepspeed:
        # Collective; frozen base weights stay out (module state dict and ZeRO-2's frozen fragments).
        trainer.engine.save_checkpoint(
            str(out), tag=DEEPSPEED_TAG, client_state={}, save_latest=False, exclude_frozen_parameters=True
        )
    elif rank == 0:  # DDP keeps every rank's parameters and optimizer identical: one copy is enough
        state = {
            "params": {n: p.detach().cpu() for n, p in trainable_parameters(trainer.module).items()},
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        }
        torch.save(state, out / TORCH_STATE_FILE)
    torch.save(rng_state(), out / _rng_file(rank))
    if client_state is not None:
        torch.save(dict(client_state), out / _client_file(rank))
    _barrier()  # every rank's files are written before rank 0 marks the folder complete
    if rank == 0:
        meta = StepCheckpointMeta(
            step=step, phase_key=phase_key, world_size=world, engine=engine, zero_stage=stage, attempt=attempt
        )
        tmp = out / (META_FILE + ".tmp")
        tmp.write_text(meta.to_json())
        tmp.replace(out / META_FILE)
    return out


def read_step_checkpoint_meta(folder: str | Path) -> StepCheckpointMeta:
    """The ``meta.json`` of a step checkpoint (raises ``FileNotFoundError`` for an incomplete folder)."""
    path = Path(folder) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a complete step checkpoint: no {META_FILE}")
    data = json.loads(path.read_text())
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"step checkpoint {folder} has format {data.get('version')}, expected {FORMAT_VERSION}"
        )
    return StepCheckpointMeta(**data)


def check_compatible(meta: StepCheckpointMeta, trainer: StepEngine, folder: str | Path = "") -> None:
    """Raise ``ValueError`` when ``trainer`` cannot resume ``meta``'s checkpoint exactly."""
    _, world = dist_rank_world()
    engine, stage = engine_kind(trainer)
    if (meta.engine, meta.zero_stage) != (engine, stage):
        raise ValueError(
            f"step checkpoint {folder} was saved by {_describe(meta.engine, meta.zero_stage)}, "
            f"this run trains with {_describe(engine, stage)}: resume with the same scaling.deepspeed and "
            "scaling.zero_stage, or clear the run's step checkpoints"
        )
    if meta.world_size != world:
        raise ValueError(
            f"step checkpoint {folder} was saved by {meta.world_size} ranks, this run has {world}: optimizer "
            "partitions and data shards depend on the number of workers; resume with "
            f"scaling.num_workers={meta.world_size}, or clear the run's step checkpoints"
        )


def _describe(engine: str, stage: int) -> str:
    return f"DeepSpeed ZeRO-{stage}" if engine == "deepspeed" else "plain torch"


def load_step_checkpoint(trainer: StepEngine, folder: str | Path) -> StepCheckpointMeta:
    """Restore a step checkpoint into a freshly built ``trainer``, this rank's RNG states last.

    Collective under DeepSpeed: every rank calls it with the whole (merged) folder. Call it after the trainer
    is built and right before the first training step (building draws random numbers).

    Raises:
        ValueError: The checkpoint was saved with another world size, engine or ZeRO stage.
        FileNotFoundError: The folder is incomplete.
    """

    src = Path(folder)
    meta = read_step_checkpoint_meta(src)
    check_compatible(meta, trainer, src)
    rank, _ = dist_rank_world()
    rng_path = src / _rng_file(rank)
    if not rng_path.exists():
        raise FileNotFoundError(
            f"step checkpoint {src} has no {rng_path.name}: rank {rank}'s part is missing"
        )
    if trainer.deepspeed:
        path, _ = trainer.engine.load_checkpoint(
            str(src),
            tag=DEEPSPEED_TAG,
            load_module_strict=False,  # the frozen base is not in it: it comes from the model as loaded
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {src / DEEPSPEED_TAG}")
    else:
        _load_torch_state(trainer, _load(src / TORCH_STATE_FILE), src)
    client = src / _client_file(rank)
    meta.client_state = _load(client) if client.exists() else None
    set_rng_state(_load(rng_path))
    return meta


def _load_torch_state(trainer: StepEngine, state: dict[str, Any], folder: Path) -> None:
    import torch

    params = trainable_parameters(trainer.module)
    saved = state["params"]
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"step checkpoint {folder} holds other trainable parameters than this model "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None and state["scheduler"] is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])


# -- in a Ray Train worker


def step_checkpoint_name(phase_key: str, step: int) -> str:
    """The folder name of a step checkpoint in Ray's storage (safe on every pyarrow filesystem)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in phase_key)
    return f"step-{safe}-{step:07d}"


def should_checkpoint(step: int, every: int, total: int) -> bool:
    """Whether to save after ``step`` of ``total`` steps every ``every`` steps (0: never). Not after the last
    step: the phase's own folder is published then."""
    return every > 0 and step % every == 0 and step < total


def skip_batches(batches: Iterable[Any], done: int) -> Iterator[Any]:
    """``batches`` without the first ``done`` (the steps a resumed checkpoint already took). Rows are sharded
    by position and read in order, so this rank's batch ``i`` is the same batch in every attempt."""
    return islice(iter(batches), done, None)


def report_step_checkpoint(
    metrics: Mapping[str, Any],
    trainer: StepEngine,
    *,
    step: int,
    phase_key: str,
    client_state: Mapping[str, Any] | None = None,
    upload_async: bool = False,
    attempt: str = "",
) -> None:
    """Save this rank's part into a temporary folder and report it with ``ray.train.report``.

    Collective (all ranks, same step). Every rank reports the same ``checkpoint_dir_name``; Ray copies each
    rank's files into that one folder of the run's storage and registers it once all ranks reported.
    ``upload_async`` copies on Ray's background thread (training goes on; Ray deletes the temporary folder
    after the copy); by default the copy is done before this returns and the folder removed here.
    """
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    tmp = Path(tempfile.mkdtemp(prefix="mcl-step-ckpt-"))
    try:
        save_step_checkpoint(
            trainer, tmp, step=step, phase_key=phase_key, client_state=client_state, attempt=attempt
        )
        ray.train.report(
            {**metrics, "step_checkpoint": step},
            checkpoint=Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=step_checkpoint_name(phase_key, step),
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC if upload_async else CheckpointUploadMode.SYNC,
            delete_local_checkpoint_after_upload=upload_async,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not upload_async:
        shutil.rmtree(tmp, ignore_errors=True)


def restore_from_ray(
    trainer: StepEngine, phase_key: str, accept: Callable[[StepCheckpointMeta], bool] | None = None
) -> StepCheckpointMeta | None:
    """Resume ``phase_key`` from Ray Train's latest checkpoint, if it is a step checkpoint of that phase (and
    ``accept(meta)`` agrees, when given).

    Every rank gets the same checkpoint from Ray, so all ranks take the same branch (loading is collective
    under DeepSpeed). Returns None (nothing restored) without a checkpoint, or when the latest one belongs to
    another phase (e.g. the phase before, which finished and was published since) or is not accepted.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        try:
            meta = read_step_checkpoint_meta(folder)
        except FileNotFoundError:  # not a step checkpoint
            return None
        if meta.phase_key != phase_key or (accept is not None and not accept(meta)):
            return None
        return load_step_checkpoint(trainer, folder)
