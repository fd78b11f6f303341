"""The engine's phase machinery and resumable runs, with a two-phase test method, in-process.

``run_experiment`` runs with the in-process executor (``LocalExecutor``: ``run_task_locally``, same TaskJob) so
the driver's bookkeeping (phases, driver state, progress, MLflow runs, resume) runs for real without Ray
workers; the Ray path of the same bookkeeping is covered by the method contract suite.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mcl import run as runner
from mcl.adapters import ADAPTER_DIR, load_lora, new_lora, save_lora
from mcl.config import load_config
from mcl.data import training_order
from mcl.errors import ConfigError
from mcl.methods_api import Method, Phase, TrainingData, register_method
from mcl.models import LANGUAGE_MODEL_LINEARS
from mcl.run.executors.local import LocalExecutor


@dataclasses.dataclass
class _Params:
    pass


@register_method
class _TwoPhase(Method):
    """Trains a LoRA, then a gradient-only phase that records squared gradients; keeps a driver-side
    counter of the samples it has seen."""

    name = "_test_two_phase"

    def phases(self, task_index):
        return [
            Phase("train", evaluate=True, epochs=1),
            Phase("grads", evaluate=False, optimize=False, epochs=1, lr=0.5),
        ]

    def training_data(self, request):
        seen = dict(request.driver_state or {})
        samples = request.task.train[:16]
        seen[f"{request.task_index}:{request.phase.name}"] = len(samples) * request.epochs
        rows = training_order(
            samples, epochs=request.epochs, global_batch=request.global_batch, seed=request.seed
        )
        return TrainingData(rows, driver_state=seen)

    def setup_model(self, model, ctx):
        self.grad_sq = {}
        self.ctx_phase = ctx.phase
        if ctx.previous_state_dir is None:
            return new_lora(model, ctx.lora)
        return load_lora(model, ctx.previous_state_dir / ADAPTER_DIR, trainable=True)

    def wants_gradients(self, ctx):
        return ctx.phase == "grads"

    def on_gradients(self, model, batch, full_grad, ctx):
        for name, p in model.named_parameters():
            if p.requires_grad:
                g = full_grad(p)
                assert g is not None, name
                self.grad_sq[name] = self.grad_sq.get(name, 0.0) + float((g.float() ** 2).sum())

    def save_state(self, model, out_dir, ctx):
        save_lora(model, out_dir / ADAPTER_DIR)
        if self.grad_sq:
            (out_dir / "grad_sq.json").write_text(json.dumps(self.grad_sq))

    def memory_report(self, model):
        return {"recorded": float(len(self.grad_sq))}


def _cfg(tmp_path: Path, root: Path, *extra: str):
    return load_config(
        "jobs/configs/default.yaml",
        [
            f"stream.root={root}",
            "stream.options.tasks=[aerial,underwater]",
            "method.name=_test_two_phase",
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            "train.batch_size=8",
            "eval.max_samples_per_task=4",
            "eval.max_new_tokens=2",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.output_dir={tmp_path}/runs",
            "tracking.run_name=phases",
            *extra,
        ],
    )


class _CountingExecutor(LocalExecutor):
    """Phases in this process, each recorded in ``calls``; ``die_at`` (task, phase) raises KeyboardInterrupt
    instead, as a killed driver would stop there."""

    def __init__(self, prep, run_dir, calls, die_at=None):
        super().__init__(prep, run_dir, log=lambda _m: None)
        self.calls, self.die_at = calls, die_at

    def run_phase(self, t, phase, previous):
        if (t, phase.name) == self.die_at:
            raise KeyboardInterrupt
        self.calls.append((t, phase.name))
        return super().run_phase(t, phase, previous)


def _local(calls, die_at=None):
    return lambda prep, run_dir: _CountingExecutor(prep, run_dir, calls, die_at)


@pytest.mark.parametrize("deepspeed", [False, True], ids=["torch", "zero2"])
def test_gradient_only_phase_sees_full_grads_and_changes_no_weight(
    deepspeed, tiny_model_path, generated_root, tmp_path
):
    from safetensors.torch import load_file

    cfg = _cfg(tmp_path, generated_root, f"scaling.deepspeed={str(deepspeed).lower()}")
    prep = runner.prepare_run(cfg, log=lambda _m: None)
    local = runner.run_stream_locally(prep, tmp_path / "local", tasks=1, log=lambda _m: None)
    train_dir, grads_dir = local.phase_dirs["0:train"], local.phase_dirs["0:grads"]
    before = load_file(str(train_dir / "state" / ADAPTER_DIR / "adapter_model.safetensors"))
    after = load_file(str(grads_dir / "state" / ADAPTER_DIR / "adapter_model.safetensors"))
    assert sorted(before) == sorted(after)
    assert all((before[k] == after[k]).all() for k in before), "a gradient-only phase moved a weight"
    grad_sq = json.loads((grads_dir / "state" / "grad_sq.json").read_text())
    assert grad_sq and all(v > 0 for v in grad_sq.values())
    # Phase settings: one epoch of 16 samples at batch 8 = 2 steps; the driver state chains over phases.
    assert len(local.results[0].train_log) == 2
    state = json.loads((grads_dir / "state" / "driver_state.json").read_text())
    assert state == {"0:train": 16, "0:grads": 16}


def test_resume_continues_a_run_and_refuses_a_different_config(
    tiny_model_path, generated_root, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    calls: list[tuple[int, str]] = []
    cfg = _cfg(tmp_path, generated_root)
    quiet = lambda _m: None  # noqa: E731

    # The driver dies during the second phase of task 2.
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(cfg, log=quiet, executor=_local(calls, die_at=(1, "grads")))
    assert calls == [(0, "train"), (0, "grads"), (1, "train")]

    with pytest.raises(ConfigError, match="already holds a run"):
        runner.run_experiment(cfg, log=quiet)
    with pytest.raises(ConfigError, match=r"train\.lr"):
        runner.run_experiment(_cfg(tmp_path, generated_root, "train.lr=0.1"), log=quiet, resume=True)

    # LoRA targets compare as they take effect: another regex is another config, while the family default
    # spelled out (what runs saved before the default became "") is the same as "".
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules"):
        runner.run_experiment(
            _cfg(tmp_path, generated_root, "model.lora.target_modules=.*language_model.*q_proj"),
            log=quiet,
            resume=True,
        )
    spelled = _cfg(tmp_path, generated_root, f"model.lora.target_modules={LANGUAGE_MODEL_LINEARS}")

    summary = runner.run_experiment(spelled, log=quiet, resume=True, executor=_local(calls))
    assert calls == [(0, "train"), (0, "grads"), (1, "train"), (1, "grads")]  # only the missing phase
    assert len(summary.matrix) == 2 and summary.task_results[1].task_index == 1
    driver_state = json.loads((Path(summary.state_dirs[1]) / "driver_state.json").read_text())
    assert driver_state == {"0:train": 16, "0:grads": 16, "1:train": 16, "1:grads": 16}

    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.run_id)
    assert parent.info.status == "FINISHED" and "mfn" in parent.data.metrics
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary.run_id}'"
    )
    assert sorted(r.data.tags["mcl.task"] for r in children) == ["aerial", "underwater"]
    assert all(r.info.status == "FINISHED" for r in children)
    second = next(r for r in children if r.data.tags["mcl.task"] == "underwater")
    assert "grads_train_s" in second.data.metrics and "train_loss" in second.data.metrics
    assert second.data.metrics["mem_recorded"] > 0

    # A finished run is read back, not trained again (saved with the regex spelled out, resumed with "").
    again = runner.run_experiment(cfg, log=quiet, resume=True, executor=_local(calls))
    assert calls == [(0, "train"), (0, "grads"), (1, "train"), (1, "grads")]
    assert again.matrix == summary.matrix and again.metrics == summary.metrics
