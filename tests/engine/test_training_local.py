"""The per-task function in a plain process (no Ray): what the GPU benchmarks call.

Also the generated stream's learning properties, measured with the real training path: one task is
learnt to >= 80%, sequential LoRA forgets (BWT <= -20), joint training is the upper bound.
"""

from __future__ import annotations

import pytest

from mcl.config import load_config
from mcl.data import sample_row, training_order
from mcl.evaluation.metrics import bwt, mfn
from mcl.methods_api import build_method
from mcl.streams import build_stream
from mcl.worker.job import TaskJob
from mcl.worker.local import run_task_locally

DEFAULT = "jobs/configs/default.yaml"


def _run_stream(cfg, model_path, root, out_dir, tasks=None):
    """Train the configured method through the stream in-process; return the accuracy matrix."""
    stream = build_stream("generated", root, {})
    names = stream.task_names if tasks is None else tasks
    method = build_method(cfg.method.name, cfg.method.params)
    eval_rows = [sample_row(s) for t in stream.tasks if t.name in names for s in t.test]
    previous, matrix, results = None, [], []
    for t in range(len(names)):
        samples = [s for i in method.training_tasks(t) for s in stream.tasks[i].train]
        rows = training_order(
            samples, epochs=cfg.train.epochs, global_batch=cfg.train.batch_size, seed=cfg.train.seed + t
        )
        job = TaskJob(cfg.to_dict(), model_path, t, list(names), previous, len(rows) // cfg.train.batch_size)
        result = run_task_locally(job, rows, eval_rows, out_dir / f"t{t}", log=lambda _m: None)
        previous = str(out_dir / f"t{t}" / "state")
        matrix.append([result.accuracy[n] for n in names])
        results.append(result)
    return matrix, results


def _plain_cfg(*overrides):
    return load_config(DEFAULT, ["scaling.num_workers=1", "scaling.deepspeed=false", *overrides])


def test_one_task_is_learnt_within_the_demo_budget(tiny_model_path, generated_root, tmp_path):
    cfg = _plain_cfg()
    matrix, results = _run_stream(cfg, tiny_model_path, generated_root, tmp_path, tasks=["aerial"])
    assert matrix[0][0] >= 80.0, matrix
    losses = [e["loss"] for e in results[0].train_log]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_sequential_lora_forgets_and_joint_is_the_upper_bound(tiny_model_path, generated_root, tmp_path):
    seq, _ = _run_stream(_plain_cfg(), tiny_model_path, generated_root, tmp_path / "seq")
    joint, _ = _run_stream(
        _plain_cfg("method.name=joint"), tiny_model_path, generated_root, tmp_path / "joint"
    )
    assert all(seq[t][t] >= 80.0 for t in range(len(seq))), seq  # every task is learnt when trained ...
    assert bwt(seq) <= -20.0, seq  # ... and forgotten after the next ones
    assert mfn(joint) >= mfn(seq) + 40.0, (joint, seq)


def test_deepspeed_zero2_single_process_matches_plain_torch(tiny_model_path, generated_root, tmp_path):
    """The same task through DeepSpeed ZeRO-2 (gloo, one process) and a plain AdamW loop: same losses."""
    overrides = ["train.epochs=1", "stream.options.train_per_task=64"]
    stream = build_stream("generated", generated_root, {})
    task = stream.tasks[0]
    runs = {}
    for deepspeed in (False, True):
        cfg = load_config(
            DEFAULT, ["scaling.num_workers=1", f"scaling.deepspeed={str(deepspeed).lower()}", *overrides]
        )
        rows = training_order(task.train[:64], epochs=1, global_batch=cfg.train.batch_size, seed=0)
        eval_rows = [sample_row(s) for s in task.test[:8]]
        job = TaskJob(
            cfg.to_dict(), tiny_model_path, 0, stream.task_names, None, len(rows) // cfg.train.batch_size
        )
        runs[deepspeed] = run_task_locally(
            job, rows, eval_rows, tmp_path / str(deepspeed), log=lambda _m: None
        )
    plain = [e["loss"] for e in runs[False].train_log]
    ds = [e["loss"] for e in runs[True].train_log]
    assert len(plain) == len(ds) == 4
    assert ds == pytest.approx(plain, rel=1e-4, abs=1e-5)
    assert (tmp_path / "True" / "state" / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_next_task_starts_from_the_previous_tasks_state(tiny_model_path, generated_root, tmp_path):
    """Task 2 with a learning rate of ~0 keeps what task 1 learnt: it resumed from task 1's adapter."""
    stream = build_stream("generated", generated_root, {})
    names = stream.task_names[:2]
    eval_rows = [sample_row(s) for t in stream.tasks[:2] for s in t.test]
    accuracies = []
    previous = None
    for t, lr in enumerate(("0.003", "1e-12")):
        cfg = _plain_cfg(f"train.lr={lr}")
        rows = training_order(stream.tasks[t].train, epochs=cfg.train.epochs, global_batch=16, seed=t)
        job = TaskJob(cfg.to_dict(), tiny_model_path, t, list(names), previous, len(rows) // 16)
        result = run_task_locally(job, rows, eval_rows, tmp_path / f"t{t}", log=lambda _m: None)
        previous = str(tmp_path / f"t{t}" / "state")
        accuracies.append(result.accuracy["aerial"])
    assert accuracies[0] >= 80.0
    assert accuracies[1] == accuracies[0]
