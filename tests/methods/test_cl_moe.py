"""CL-MoE's mechanism: the dual router's weights are a distribution (instance router while training, the beta
mix with the task router at inference), the expert statistics are CL-MoE's top-2 counts, the momentum update
after a task is exactly ``lambda_e * old + (1 - lambda_e) * new`` per expert with lambda by the expert's role,
and a two-task run keeps its statistics and reloads to the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mcl.config import load_config
from mcl.data import Preprocessor, collate, rows_to_batch, sample_row
from mcl.errors import ConfigError
from mcl.methods_api import TaskContext, build_method
from mcl.models import load_model_and_processor
from mcl.run import prepare_run, run_stream_locally
from mcl.streams import build_stream
from mcl.worker.engine import model_inputs
from methods.cl_moe import CLMOE_STATE, CLMoELinear, momentum_merge, role_lambdas, top_experts
from methods.moelora import STATE_WEIGHTS

DEFAULT = "jobs/configs/default.yaml"
SMALL_STREAM = {"train_per_task": 32, "test_per_task": 4}
NAMES = ("aerial", "underwater", "street", "indoor")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cl_moe_stream") / "generated"
    build_stream("generated", root, SMALL_STREAM)
    return root


def _config(root: Path, out: Path, *overrides: str):
    options = [f"stream.options.{k}={v}" for k, v in SMALL_STREAM.items()]
    return load_config(
        DEFAULT,
        [
            f"stream.root={root}",
            *options,
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            f"tracking.output_dir={out}",
            "method.name=cl_moe",
            "train.epochs=2",
            "eval.max_new_tokens=2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def batch(tiny_model_path: str, small_root: Path) -> dict[str, torch.Tensor]:
    _, processor = load_model_and_processor(tiny_model_path)
    stream = build_stream("generated", small_root, SMALL_STREAM)
    rows = [sample_row(s) for s in stream.tasks[0].train[:3]]
    batch = Preprocessor(tiny_model_path, train=True)(rows_to_batch(rows))
    return collate(batch, processor.tokenizer.pad_token_id, left_pad=False)


@pytest.fixture(scope="module")
def two_tasks(small_root: Path, tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("cl_moe_run")
    prep = prepare_run(_config(small_root, out), log=lambda _m: None)
    return run_stream_locally(prep, out, tasks=2, log=lambda _m: None)


def _wrapped(method, model_path: str, lora, task: int = 0, state: Path | None = None):
    base, _ = load_model_and_processor(model_path)
    ctx = TaskContext(task, NAMES, lora, previous_state_dir=state)
    model = method.setup_model(base, ctx)
    method.before_task(model, ctx)
    return model, ctx


def test_params_are_validated_naming_the_field():
    with pytest.raises(ConfigError, match="beta"):
        build_method("cl_moe", {"beta": 1.5})
    with pytest.raises(ConfigError, match="momentum"):
        build_method("cl_moe", {"momentum": -0.1})
    with pytest.raises(ConfigError, match="task_experts"):
        build_method("cl_moe", {"task_experts": 5})
    assert build_method("cl_moe").params.num_experts == 4


def test_role_lambdas_and_top_experts_follow_the_released_scripts():
    # params.py: experts only in the previous task's top set get 1 - alpha on the old weights, the rest alpha.
    assert role_lambdas(4, [0, 1], [1, 2], 0.7) == pytest.approx([0.3, 0.7, 0.7, 0.7])
    assert role_lambdas(4, [0, 1], [0, 1], 0.7) == pytest.approx([0.7] * 4)
    # statistic.py: the most counted experts; equal counts: the lower index first.
    assert top_experts(torch.tensor([5.0, 9.0, 9.0, 1.0], dtype=torch.float64), 2) == [1, 2]
    assert top_experts(torch.tensor([3.0, 3.0, 3.0, 3.0], dtype=torch.float64), 2) == [0, 1]


def test_router_weights_sum_to_one_in_training_and_at_inference(tiny_model_path, small_root, batch, tmp_path):
    method = build_method("cl_moe")
    model, _ = _wrapped(method, tiny_model_path, _config(small_root, tmp_path).model.lora)
    layer = next(m for m in model.modules() if isinstance(m, CLMoELinear))
    x = torch.randn(3, 7, layer.in_features)
    layer.train()
    instance = layer.gate_weights(x)
    assert torch.allclose(instance.sum(-1), torch.ones(3, 7), atol=1e-6)
    layer.eval()
    assert torch.equal(layer.gate_weights(x), instance)  # no task statistics yet: the instance router alone
    layer.task_weights = torch.tensor([0.7, 0.1, 0.1, 0.1])
    mixed = layer.gate_weights(x)
    assert torch.allclose(mixed.sum(-1), torch.ones(3, 7), atol=1e-6)
    assert torch.allclose(mixed, 0.5 * instance + 0.5 * layer.task_weights, atol=1e-7)


def test_statistics_count_each_tokens_top_two_experts_and_skip_ties(tiny_model_path, small_root, tmp_path):
    method = build_method("cl_moe")
    model, _ = _wrapped(method, tiny_model_path, _config(small_root, tmp_path).model.lora)
    layer = next(m for m in model.modules() if isinstance(m, CLMoELinear))
    weights = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    layer._count(weights)
    assert layer.counts.tolist() == [1.0, 1.0, 1.0, 1.0]  # (0, 1) and (3, 2); the tie counts nothing
    layer._count(weights[:1])
    assert layer.counts.tolist() == [2.0, 2.0, 1.0, 1.0]


def test_momentum_update_is_applied_exactly_per_expert(tiny_model_path, small_root, batch, tmp_path):
    """Task 2's after_task merges the trained experts with task 1's saved experts, expert by expert, with
    lambda by role: task 1's top set {0, 1}, task 2's counts make {2, 3} its top set, so experts 0 and 1
    (old-task-only) get lambda 0.3 and experts 2 and 3 lambda 0.7."""
    lora = _config(small_root, tmp_path).model.lora
    first = build_method("cl_moe")
    model, ctx = _wrapped(first, tiny_model_path, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in first.state_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    layers = first._layers(model)
    for layer in layers:
        layer.counts = torch.tensor([5.0, 4.0, 1.0, 0.0], dtype=torch.float64)
    first.after_task(model, ctx)
    first.save_state(model, tmp_path / "task1", ctx)
    assert json.loads((tmp_path / "task1" / CLMOE_STATE).read_text())["history"]["top"] == [[0, 1]]
    old = load_file(str(tmp_path / "task1" / STATE_WEIGHTS))

    second = build_method("cl_moe")
    model2, ctx2 = _wrapped(second, tiny_model_path, lora, task=1, state=tmp_path / "task1")
    with torch.no_grad():  # stand-in for training on task 2: every expert moves
        for p in second.state_parameters(model2):
            p.add_(0.05 * torch.randn_like(p))
    trained = {
        f"{name}.{s}": getattr(m, s).detach().clone()
        for name, m in model2.named_modules()
        if isinstance(m, CLMoELinear)
        for s in ("lora_A", "lora_B")
    }
    for layer in second._layers(model2):
        layer.counts = torch.tensor([0.0, 1.0, 6.0, 3.0], dtype=torch.float64)
    second.after_task(model2, ctx2)
    lambdas = role_lambdas(4, [0, 1], [2, 3], 0.7)
    assert lambdas == pytest.approx([0.3, 0.3, 0.7, 0.7])
    for name, m in model2.named_modules():
        if not isinstance(m, CLMoELinear):
            continue
        r = m.expert_rank
        for e, lam in enumerate(lambdas):
            rows = slice(e * r, (e + 1) * r)
            key_a, key_b = f"{name}.lora_A", f"{name}.lora_B"
            want_a = lam * old[key_a][rows].double() + (1 - lam) * trained[key_a][rows].double()
            want_b = lam * old[key_b][:, rows].double() + (1 - lam) * trained[key_b][:, rows].double()
            assert torch.equal(m.lora_A[rows].detach(), want_a.float()), (name, e)
            assert torch.equal(m.lora_B[:, rows].detach(), want_b.float()), (name, e)
    assert second.history["top"] == [[0, 1], [2, 3]]
    # The task router at inference: the mean of the tasks' expert distributions.
    want = torch.tensor([[5, 4, 1, 0], [0, 1, 6, 3]], dtype=torch.float32) / 10
    assert torch.allclose(second._layers(model2)[0].task_weights, want.mean(0))

    # What an evaluation actor loads (load_for_evaluation) answers as the merged model does.
    model2.eval()
    with torch.no_grad():
        expected = model2(**model_inputs(batch)).logits
    second.save_state(model2, tmp_path / "task2", ctx2)
    base, _ = load_model_and_processor(tiny_model_path)
    reloaded = build_method("cl_moe").load_for_evaluation(base, tmp_path / "task2", ctx2).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**model_inputs(batch)).logits, expected)


def test_momentum_merge_of_stacked_matrices():
    old, new = torch.zeros(4, 3), torch.ones(4, 3)
    merged = momentum_merge(old, new, [0.25, 1.0], expert_rank=2, expert_dim=0)
    assert merged[:2].eq(0.75).all() and merged[2:].eq(0.0).all()
    merged_b = momentum_merge(old.T, new.T, [0.25, 1.0], expert_rank=2, expert_dim=1)
    assert torch.equal(merged_b, merged.T)


def test_two_task_run_trains_and_keeps_each_tasks_statistics(two_tasks):
    for result in two_tasks.results:
        losses = [e["loss"] for e in result.train_log]
        assert losses[-1] < losses[0]
    history = json.loads((two_tasks.state_dirs[1] / CLMOE_STATE).read_text())["history"]
    assert len(history["top"]) == 2 and all(len(top) == 2 for top in history["top"])
    # 32 samples x 2 epochs per task, every token of every wrapped layer counted (ties aside).
    assert all(sum(c) > 0 for c in history["counts"])
    assert all(sum(d) == pytest.approx(1.0) for d in history["distributions"])
    first = json.loads((two_tasks.state_dirs[0] / CLMOE_STATE).read_text())["history"]
    assert history["top"][0] == first["top"][0] and history["counts"][0] == first["counts"][0]
