"""Micro-batches with gradient accumulation equal one big batch, on the real per-phase path.

Two ranks (spawned processes in one gloo group, as Ray Train's workers are) run the same phase of QUAD on
task 2 of the generated stream, whose global batches mix current rows with unsupervised question rows (a
different number on each rank) and add QR/ACD distillation terms: micro-batches of 2 rows x accumulation 4
against micro-batches of 8, under plain torch (DDP), DeepSpeed ZeRO-2 and ZeRO-3. The per-step losses
(task and extra) and the saved adapter must match within float tolerance. The same harness checks that
activation checkpointing gives the same training, and that ZeRO-Offload (DeepSpeed's CPU Adam) follows
torch's AdamW.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from mcl.config import config_from_dict, load_config
from mcl.methods_api import Phase
from mcl.run.plan import phase_job
from mcl.run.prepare import prepare_run
from mcl.run.rundir import PhaseDir
from mcl.worker.job import TaskJob

DEFAULT = "jobs/configs/default.yaml"
WORLD = 2


def _rank_main(rank: int, port: int, cases_file: str) -> None:
    """One rank: every case of ``cases_file`` in order, each a phase trained on this rank's shard."""
    import torch.distributed as td

    from mcl.data import Preprocessor, local_batches, shard
    from mcl.worker.recipe import train_and_evaluate_task

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    cases = json.loads(Path(cases_file).read_text())
    for case in cases:
        job = TaskJob(**case["job"])
        pre = Preprocessor(job.model_path, train=True)
        micro = case["micro"]
        out = Path(case["out"]) if rank == 0 else Path(case["out"] + f"-rank{rank}")
        train_and_evaluate_task(
            job,
            local_batches(shard(case["rows"], rank, WORLD), pre, micro),
            lambda: [],
            out,
            device=torch.device("cpu"),
            log=lambda _msg: None,
        )
        td.barrier()
    td.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cases(cases: list[dict[str, Any]], tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    mp.start_processes(_rank_main, args=(_free_port(), str(cases_file)), nprocs=WORLD, start_method="spawn")


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.rglob("*.safetensors")):
        tensors.update({f"{f.relative_to(folder)}:{k}": v for k, v in load_file(f).items()})
    assert tensors, f"no saved state in {folder}"
    return tensors


def _train_log(folder: Path) -> list[dict[str, float]]:
    return json.loads(next(folder.rglob("task_result.json")).read_text())["train_log"]


@pytest.fixture(scope="module")
def quad_task2(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, TaskJob, Any]:
    """QUAD's second task, driver side: the prepared run, the phase job (from task 1's real state, trained
    in-process) and its global rows, which mix question rows into every batch."""
    from mcl.worker.local import run_task_locally

    root = tmp_path_factory.mktemp("acc")
    cfg = load_config(
        DEFAULT,
        [
            f"stream.root={root / 'data'}",
            "stream.options={seed: 0, train_per_task: 24, test_per_task: 4}",
            "method.name=quad",
            "method.params={questions_per_task: 8, replay_ratio: 0.25}",
            "train.epochs=1",
            "train.batch_size=16",
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
        ],
    )
    prep = prepare_run(cfg, log=lambda _m: None)
    job0, rows0 = phase_job(prep, 0, Phase(evaluate=False), None)
    first = root / "task1"
    run_task_locally(job0, rows0, [], first, log=lambda _m: None)
    job, rows = phase_job(prep, 1, Phase(evaluate=False), str(PhaseDir(first).state))
    return prep, job, list(rows)


def _case(job: TaskJob, rows: list[Any], out: Path, changes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    config = json.loads(json.dumps(job.config))
    for section, values in changes.items():
        config[section].update(values)
    cfg = config_from_dict(config)  # still valid; the case's micro-batch comes from it
    return {
        "job": {**dataclasses.asdict(job), "config": config, "evaluate_before": False},
        "rows": rows,
        "micro": cfg.micro_batch,
        "out": str(out),
    }


ENGINES = {
    "torch": {"deepspeed": False},
    "zero2": {"deepspeed": True, "zero_stage": 2},
    "zero3": {"deepspeed": True, "zero_stage": 3, "zero3_param_persistence_threshold": 0},
}


def _assert_same_training(a: Path, b: Path, what: str) -> None:
    log_a, log_b = _train_log(a), _train_log(b)
    assert [e["step"] for e in log_a] == [e["step"] for e in log_b]
    for key in ("loss", "extra_loss"):
        got = [e[key] for e in log_b]
        assert got == pytest.approx([e[key] for e in log_a], rel=1e-5, abs=1e-6), f"{what}: {key}"
    saved_a, saved_b = _saved_tensors(a), _saved_tensors(b)
    assert saved_a.keys() == saved_b.keys()
    for name, tensor in saved_a.items():
        torch.testing.assert_close(saved_b[name], tensor, rtol=1e-4, atol=1e-6, msg=f"{what}: {name}")


def _cases(job: TaskJob, rows: list[Any], out: Path) -> list[dict[str, Any]]:
    """Every engine's phases, run in one pair of processes (a process start costs more than a phase): the
    whole batch (micro 8), micro 2 x accumulation 4; under ZeRO, also micro 4 x 2 with activation
    checkpointing and the whole batch with ZeRO-Offload."""
    cases = []
    for engine, settings in ENGINES.items():
        scaling = {"num_workers": WORLD, **settings}
        variants: dict[str, dict[str, dict[str, Any]]] = {
            "whole": {"train": {"micro_batch_size": 0}},
            "micro": {"train": {"micro_batch_size": 2}},
        }
        if engine != "torch":
            offload = "optimizer_and_params" if engine == "zero3" else "optimizer"
            variants["checkpointed"] = {"train": {"micro_batch_size": 4, "gradient_checkpointing": True}}
            variants["offloaded"] = {"scaling": {"offload": offload}}
        for name, changes in variants.items():
            changes = {"train": {}, **changes}
            changes["scaling"] = {**scaling, **changes.get("scaling", {})}
            cases.append(_case(job, rows, out / f"{engine}-{name}", changes))
    return cases


@pytest.fixture(scope="module")
def trained(quad_task2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of every case's phase (``<engine>-<variant>``), trained on 2 ranks."""
    _prep, job, rows = quad_task2
    out = tmp_path_factory.mktemp("cases")
    cases = _cases(job, rows, out)
    assert {Path(c["out"]).name: c["micro"] for c in cases if "zero3" in c["out"]} == {
        "zero3-whole": 8,
        "zero3-micro": 2,
        "zero3-checkpointed": 4,
        "zero3-offloaded": 8,
    }
    _run_cases(cases, out)
    return out


def test_the_batches_mix_question_rows_unevenly(quad_task2):
    _prep, _job, rows = quad_task2
    questions = [not r["supervised"] for r in rows[:16]]
    per_rank = [sum(questions[r::WORLD]) for r in range(WORLD)]
    assert sum(per_rank) > 0 and per_rank[0] != per_rank[1], per_rank


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_micro_batches_with_accumulation_equal_one_batch(engine, trained):
    _assert_same_training(trained / f"{engine}-whole", trained / f"{engine}-micro", f"{engine}: 2 x 4 vs 8")
    assert any(e["extra_loss"] != 0 for e in _train_log(trained / f"{engine}-whole"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_activation_checkpointing_and_offload_train_the_same(engine, trained):
    """Activation checkpointing (non-reentrant, through PEFT and ZeRO) gives the same losses and weights;
    ZeRO-Offload steps the optimizer in host memory with DeepSpeed's CPU Adam, which follows torch's AdamW
    (a different kernel: the tolerance is looser)."""
    whole = trained / f"{engine}-whole"
    _assert_same_training(whole, trained / f"{engine}-checkpointed", f"{engine}: checkpointing")
    offloaded = trained / f"{engine}-offloaded"
    log_base, log_off = _train_log(whole), _train_log(offloaded)
    assert [e["loss"] for e in log_off] == pytest.approx([e["loss"] for e in log_base], rel=1e-3)
    saved = _saved_tensors(offloaded)
    for name, tensor in _saved_tensors(whole).items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-3, atol=1e-4, msg=name)
