"""Step checkpoints: a phase stopped after k steps and resumed from its checkpoint in a fresh process state
gives the same per-step losses and the same trainable weights, bit for bit, as the phase run without a
stop (plain torch, DeepSpeed ZeRO-2, ZeRO-3 with every LoRA tensor partitioned). LoRA dropout is on, so the
restored RNG state is exercised. The checkpoint holds no frozen base weights, and a checkpoint from another
world size or engine is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from mcl.adapters import new_lora
from mcl.config import ExperimentConfig, load_config
from mcl.data import Preprocessor, collate, local_batches, training_order
from mcl.models import load_model_and_processor
from mcl.streams import build_stream
from mcl.worker.checkpoint import (
    META_FILE,
    check_compatible,
    load_step_checkpoint,
    read_step_checkpoint_meta,
    save_step_checkpoint,
    should_checkpoint,
    skip_batches,
    step_checkpoint_name,
    trainable_parameters,
)
from mcl.worker.engine import StepEngine, seed_everything, to_device, zero3_loading_context
from mcl.worker.local import init_single_process_group
from mcl.worker.losses import per_sample_loss

DEFAULT = "jobs/configs/default.yaml"
STEPS, SPLIT, BATCH = 4, 2, 4
CPU = torch.device("cpu")


def _config(stage: int | None) -> ExperimentConfig:
    """Plain torch (``stage`` None) or DeepSpeed ZeRO-``stage``, with dropout and a warm-up that the
    checkpoint must carry across the stop."""
    engine = ["scaling.deepspeed=false"] if stage is None else ["scaling.deepspeed=true"]
    cfg = load_config(
        DEFAULT,
        [
            "scaling.num_workers=1",
            *engine,
            f"train.batch_size={BATCH}",
            "train.warmup_steps=3",
            "model.lora.dropout=0.1",
            "model.lora.r=2",  # trainable ~1/11 of the tiny base, so a leaked base copy shows in the size
        ],
    )
    if stage is None:
        return cfg
    scaling = dataclasses.replace(cfg.scaling, zero_stage=stage, zero3_param_persistence_threshold=0)
    return dataclasses.replace(cfg, scaling=scaling)


@pytest.fixture(scope="module")
def batches(tiny_model_path: str, generated_root: Path) -> list[dict[str, np.ndarray]]:
    task = build_stream("generated", generated_root, {}).tasks[0]
    rows = training_order(task.train[: STEPS * BATCH], epochs=1, global_batch=BATCH, seed=0)
    return list(local_batches(rows, Preprocessor(tiny_model_path, train=True), BATCH))


@dataclasses.dataclass
class _Run:
    trainer: StepEngine
    pad_id: int
    keep: Any  # ZeRO-3's HfDeepSpeedConfig stays alive while the engine is used


def _build(cfg: ExperimentConfig, model_path: str) -> _Run:
    """A fresh model + LoRA + step engine, as the per-phase function builds them (seeded the same way)."""
    if cfg.scaling.deepspeed:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        init_single_process_group()
    seed_everything(cfg.train.seed)
    keep = zero3_loading_context(cfg, 1)
    base, processor = load_model_and_processor(model_path)
    trainer = StepEngine(new_lora(base, cfg.model.lora), cfg, 1, CPU)
    trainer.module.train()
    return _Run(trainer, processor.tokenizer.pad_token_id, keep)


def _train(run: _Run, batches: Any) -> list[float]:
    losses = []
    for np_batch in batches:
        batch = to_device(collate(np_batch, run.pad_id, left_pad=False), CPU, torch.float32)
        loss = per_sample_loss(run.trainer.forward(batch).logits, batch["labels"])
        run.trainer.backward(loss)
        run.trainer.step()
        losses.append(float(loss.detach()))
    return losses


def _weights(trainer: StepEngine) -> dict[str, torch.Tensor]:
    params = trainable_parameters(trainer.module)
    with trainer.gathered(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.parametrize("stage", [None, 2, 3], ids=["torch", "zero2", "zero3"])
def test_a_resumed_phase_equals_the_uninterrupted_one(stage, tiny_model_path, batches, tmp_path):
    cfg = _config(stage)
    full = _build(cfg, tiny_model_path)
    full_losses = _train(full, batches)
    full_weights = _weights(full.trainer)
    frozen = [p for p in full.trainer.module.parameters() if not p.requires_grad]
    frozen_bytes = sum(
        getattr(p, "ds_numel", p.numel()) * p.element_size() for p in frozen
    )  # ZeRO-3: partitioned
    trainable_bytes = sum(w.numel() * w.element_size() for w in full_weights.values())
    del full

    first = _build(cfg, tiny_model_path)
    first_losses = _train(first, batches[:SPLIT])
    folder = tmp_path / "ckpt"
    save_step_checkpoint(
        first.trainer, folder, step=SPLIT, phase_key="0:train", client_state={"losses": first_losses}
    )
    del first

    resumed = _build(cfg, tiny_model_path)
    torch.rand(13), random.random(), np.random.rand()  # a restart's streams differ: loading must reset them
    meta = load_step_checkpoint(resumed.trainer, folder)
    assert (meta.step, meta.phase_key, meta.world_size) == (SPLIT, "0:train", 1)
    assert (meta.engine, meta.zero_stage) == (("torch", 0) if stage is None else ("deepspeed", stage))
    losses = meta.client_state["losses"] + _train(resumed, skip_batches(batches, meta.step))

    assert losses == full_losses  # bitwise: same parameters, optimizer moments, LR schedule and dropout masks
    resumed_weights = _weights(resumed.trainer)
    assert resumed_weights.keys() == full_weights.keys()
    assert all(torch.equal(resumed_weights[n], full_weights[n]) for n in full_weights)

    # Only the trainable state: weights + fp32 master + 2 Adam moments, each the size of the trainable
    # parameters, plus pickling and DeepSpeed's recovery script; one copy of the frozen base would not fit.
    size = _folder_bytes(folder)
    assert size < 5 * trainable_bytes + 96 * 1024, (size, trainable_bytes)
    assert size < frozen_bytes, (size, frozen_bytes)
    if stage is None:
        saved = torch.load(folder / "torch_state.pt", weights_only=False)["params"]
        assert saved.keys() == full_weights.keys()
    for states in (folder / "deepspeed").glob("*model_states.pt"):
        state = torch.load(states, map_location="cpu", weights_only=False)
        assert set(state["module"]) <= set(full_weights), sorted(set(state["module"]) - set(full_weights))[:5]
        assert state["frozen_param_fragments"] is None

    # The same folder written by 2 ranks cannot be resumed by 1.
    meta_path = folder / META_FILE
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "world_size": 2}))
    with pytest.raises(ValueError, match="saved by 2 ranks, this run has 1"):
        load_step_checkpoint(resumed.trainer, folder)


def test_another_engine_or_zero_stage_is_refused(tmp_path):
    def fake(stage: int | None) -> Any:
        if stage is None:
            return SimpleNamespace(deepspeed=False)
        return SimpleNamespace(deepspeed=True, engine=SimpleNamespace(zero_optimization_stage=lambda: stage))

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    torch_trainer = SimpleNamespace(deepspeed=False, module=model, optimizer=optimizer, scheduler=None)
    save_step_checkpoint(torch_trainer, tmp_path, step=3, phase_key="1:train")
    meta = read_step_checkpoint_meta(tmp_path)
    check_compatible(meta, fake(None))
    with pytest.raises(ValueError, match="saved by plain torch, this run trains with DeepSpeed ZeRO-2"):
        load_step_checkpoint(fake(2), tmp_path)
    zero2 = dataclasses.replace(meta, engine="deepspeed", zero_stage=2)
    with pytest.raises(ValueError, match="saved by DeepSpeed ZeRO-2, this run trains with DeepSpeed ZeRO-3"):
        check_compatible(zero2, fake(3))
    (tmp_path / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="not a complete step checkpoint"):
        load_step_checkpoint(fake(None), tmp_path)


def test_schedule_and_names():
    assert [s for s in range(1, 11) if should_checkpoint(s, 3, 10)] == [3, 6, 9]
    assert not any(should_checkpoint(s, 0, 10) for s in range(1, 11))
    assert not should_checkpoint(10, 5, 10)  # the last step publishes the phase instead
    assert list(skip_batches(iter(range(6)), 4)) == [4, 5]
    assert step_checkpoint_name("2:fisher", 40) == "step-2-fisher-0000040"


TOY_DEEPSPEED = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 2},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}


def _toy_trainer(rank: int) -> Any:
    """A ZeRO-2 step engine around a toy model: a frozen first layer (the "base"), dropout, two trainable
    layers; AdamW with a warm-up. Built the same way on every attempt; dropout masks differ per rank."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Dropout(0.3), torch.nn.Linear(32, 32), torch.nn.Linear(32, 1)
    )
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=TOY_DEEPSPEED
    )
    torch.manual_seed(100 + rank)
    return SimpleNamespace(
        deepspeed=True, engine=engine, optimizer=optimizer, scheduler=scheduler, module=model
    )


def _toy_step(trainer: Any, step: int, rank: int) -> float:
    g = torch.Generator().manual_seed(1000 * step + rank)  # this rank's batch of this step
    x, y = torch.randn(2, 8, generator=g), torch.randn(2, 1, generator=g)
    loss = torch.nn.functional.mse_loss(trainer.engine(x), y)
    trainer.engine.backward(loss)
    trainer.engine.step()
    return float(loss.detach())


def _toy_weights(trainer: Any) -> dict[str, list[float]]:
    return {n: p.detach().flatten().tolist() for n, p in trainable_parameters(trainer.module).items()}


def _toy_zero2_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a 2-process ZeRO-2 run: 4 steps straight; 2 steps, save into this rank's own folder, the
    folders merged into one as Ray merges them, a fresh engine loads it and takes the last 2 steps."""
    import deepspeed
    import torch.distributed as td

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    full = _toy_trainer(rank)
    result: dict[str, Any] = {
        "full": [_toy_step(full, s, rank) for s in range(4)],
        "full_weights": _toy_weights(full),
    }
    first = _toy_trainer(rank)
    result["first"] = [_toy_step(first, s, rank) for s in range(2)]
    own = Path(out) / f"rank{rank}"
    save_step_checkpoint(first, own, step=2, phase_key="0:train")
    result["own_files"] = sorted(str(f.relative_to(own)) for f in own.rglob("*") if f.is_file())
    merged = Path(out) / "merged"
    for f in own.rglob("*"):  # what Ray's upload does: every rank copies its folder into the same one
        if f.is_file():
            (merged / f.relative_to(own)).parent.mkdir(parents=True, exist_ok=True)
            (merged / f.relative_to(own)).write_bytes(f.read_bytes())
    td.barrier()
    resumed = _toy_trainer(rank)
    torch.rand(5)
    meta = load_step_checkpoint(resumed, merged)
    result["rest"] = [_toy_step(resumed, s, rank) for s in range(meta.step, 4)]
    result["resumed_weights"] = _toy_weights(resumed)
    (Path(out) / f"result{rank}.json").write_text(json.dumps(result))
    td.destroy_process_group()


def test_two_ranks_zero2_partitions_round_trip(tmp_path):
    """Each rank writes its own optimizer partition (no name collides), the merged folder resumes both
    ranks, and the run ends bit-identical to the uninterrupted one on both ranks."""
    import socket

    import torch.multiprocessing as mp

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_toy_zero2_rank, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]
    rank0, rank1 = (set(r["own_files"]) for r in results)
    assert not rank0 & rank1, rank0 & rank1
    assert {f for f in rank1 if "optim_states" in f} == {
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    }
    assert "deepspeed/mp_rank_00_model_states.pt" in rank0 and META_FILE in rank0
    for r in results:
        assert r["first"] + r["rest"] == r["full"]
        assert r["resumed_weights"] == r["full_weights"]
    assert results[0]["full_weights"] == results[1]["full_weights"]  # the ranks agree (data parallel)


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_a_closed_engine_lets_go_of_the_model(stage, tiny_model_path, batches):
    """After :meth:`StepEngine.close` nothing keeps the DeepSpeed engine or the model alive (ZeRO-3's module
    stack and release cache held every model a process wrapped), and the buckets are sized from the model's
    hidden size (the tiny LLaVA's language model: 64)."""
    import gc
    import weakref

    run = _build(_config(stage), tiny_model_path)
    zero = run.trainer.engine.config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    assert stage == 2 or zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    _train(run, batches)
    engine, module = weakref.ref(run.trainer.engine), weakref.ref(run.trainer.module)
    run.trainer.close()
    del run
    gc.collect()
    # Gone, so off ZeRO-3's module stack too (other tests' engines, never closed, may still be on it).
    assert engine() is None and module() is None, "the closed engine or its model is still alive"


def test_deepspeed_buckets_follow_the_hidden_size():
    from mcl.worker.engine import deepspeed_config, model_hidden_size

    cfg = _config(3)
    assert "reduce_bucket_size" not in deepspeed_config(cfg, 4)["zero_optimization"]  # DeepSpeed's defaults
    zero = deepspeed_config(cfg, 4, hidden_size=4096)["zero_optimization"]  # a 7B LLaMA/Vicuna
    assert zero["reduce_bucket_size"] == 4096**2 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
    text = SimpleNamespace(hidden_size=3584)
    assert model_hidden_size(SimpleNamespace(config=SimpleNamespace(text_config=text))) == 3584
    assert (
        model_hidden_size(SimpleNamespace(config=SimpleNamespace(hidden_size=2048, text_config=text))) == 2048
    )
    assert model_hidden_size(SimpleNamespace(config=SimpleNamespace())) is None
