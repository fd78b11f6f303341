"""MoELoRA's mechanism: the wrapped model equals the base model at the start, the per-token gate is a
distribution that receives gradient, several experts learn, the state reloads exactly, and the same run
goes through DeepSpeed ZeRO-2/3."""

from __future__ import annotations

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
from mcl.worker.losses import per_sample_loss
from methods.moelora import STATE_WEIGHTS

DEFAULT = "jobs/configs/default.yaml"
SMALL_STREAM = {"train_per_task": 32, "test_per_task": 4}
NAMES = ("aerial", "underwater", "street", "indoor")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("moelora_stream") / "generated"
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
            "method.name=moelora",
            "train.epochs=2",
            *overrides,
        ],
    )


def _run(root: Path, out: Path, *overrides: str, start_state: Path | None = None):
    """Tasks 1 and 2 of the small stream (only task 2 when starting from task 1's ``start_state``)."""
    prep = prepare_run(_config(root, out, *overrides), log=lambda _m: None)
    start = 0 if start_state is None else 1
    return run_stream_locally(
        prep, out, tasks=2, log=lambda _m: None, start_state=start_state, start_task=start
    )


@pytest.fixture(scope="module")
def plain_run(small_root: Path, tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    return _run(small_root, tmp_path_factory.mktemp("moelora_plain"))


@pytest.fixture(scope="module")
def batch(tiny_model_path: str, small_root: Path) -> dict[str, torch.Tensor]:
    """Three real training samples (image, prompt, answer) as model inputs plus labels."""
    _, processor = load_model_and_processor(tiny_model_path)
    stream = build_stream("generated", small_root, SMALL_STREAM)
    rows = [sample_row(s) for s in stream.tasks[0].train[:3]]
    batch = Preprocessor(tiny_model_path, train=True)(rows_to_batch(rows))
    return collate(batch, processor.tokenizer.pad_token_id, left_pad=False)


def _lora(root: Path, tmp: Path):
    return _config(root, tmp).model.lora


def _wrapped(method, model_path: str, lora, task: int = 0, state: Path | None = None):
    base, _ = load_model_and_processor(model_path)
    ctx = TaskContext(task, NAMES, lora, previous_state_dir=state)
    model = method.setup_model(base, ctx)
    method.before_task(model, ctx)
    return model, ctx


def test_params_are_validated_naming_the_field(tiny_model_path, small_root, tmp_path):
    with pytest.raises(ConfigError, match="num_experts"):
        build_method("moelora", {"num_experts": 0})
    with pytest.raises(ConfigError, match="top_k"):
        build_method("moelora", {"num_experts": 2, "top_k": 3})
    with pytest.raises(ConfigError, match="expert_rank"):
        build_method("moelora", {"expert_rank": -1})
    with pytest.raises(ValueError, match="num_experts"):  # r = 8 does not split over 3 experts
        _wrapped(build_method("moelora", {"num_experts": 3}), tiny_model_path, _lora(small_root, tmp_path))


def test_wrapped_model_equals_the_base_model_at_init(tiny_model_path, small_root, batch, tmp_path):
    base, _ = load_model_and_processor(tiny_model_path)
    base.eval()
    with torch.no_grad():
        expected = base(**model_inputs(batch)).logits
    method = build_method("moelora")
    model = method.setup_model(base, TaskContext(0, NAMES, _lora(small_root, tmp_path)))
    layers = method.moe_layers(model)
    assert len(layers) == 14 and all("language_model" in name for name in layers)  # 2 layers x 7 targets
    assert all(m.num_experts == 2 and m.expert_rank == 4 for m in layers.values())  # r = 8 split over 2
    with torch.no_grad():
        assert torch.equal(model(**model_inputs(batch)).logits, expected)


@pytest.mark.parametrize("top_k", [0, 1, 2])
def test_gate_is_a_distribution_and_gate_and_experts_get_gradient(
    top_k, tiny_model_path, small_root, batch, tmp_path
):
    method = build_method("moelora", {"num_experts": 4, "top_k": top_k})
    model, _ = _wrapped(method, tiny_model_path, _lora(small_root, tmp_path))
    layers = method.moe_layers(model)
    torch.manual_seed(0)
    with torch.no_grad():  # as after some training: B != 0, so experts and gate shape the output
        for layer in layers.values():
            layer.lora_B.normal_(std=0.05)
    inputs: dict[str, torch.Tensor] = {}
    layer_name, layer = next(iter(layers.items()))
    layer.register_forward_pre_hook(lambda _m, args: inputs.setdefault("x", args[0].detach()))
    model.train()
    outputs = model(**model_inputs(batch))
    per_sample_loss(outputs.logits, batch["labels"]).backward()

    weights = layer.gate_weights(inputs["x"])
    assert weights.shape[-1] == 4 and (weights >= 0).all()
    if top_k != 1:  # a distribution over the experts (top-1 keeps the raw probability, < 1)
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-6)
    if top_k:
        assert ((weights > 0).sum(-1) == top_k).all()
    experts_with_grad = {}
    for name, m in layers.items():
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0, name
        grads = m.lora_B.grad.unflatten(-1, (m.num_experts, m.expert_rank))  # (out, E, r)
        experts_with_grad[name] = int((grads.abs().sum((0, 2)) > 0).sum())
    if top_k == 0:  # dense gate: every expert of every layer learns
        assert set(experts_with_grad.values()) == {4}, experts_with_grad
    else:  # top-k: each token trains k experts, tokens spread over several
        assert max(experts_with_grad.values()) > 1 and min(experts_with_grad.values()) >= 1, experts_with_grad
    # Only the experts, gates and (by default) the projector are trainable; the base layers are frozen.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("base_layer.weight") for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)


def test_state_round_trip_reproduces_outputs(tiny_model_path, small_root, batch, tmp_path):
    lora = _lora(small_root, tmp_path)
    method = build_method("moelora")
    model, ctx = _wrapped(method, tiny_model_path, lora)
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: experts, gates and projector all move
        for p in method.state_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        expected = model(**model_inputs(batch)).logits
    method.save_state(model, tmp_path / "state", ctx)

    reloaded = build_method("moelora")
    model2, _ = _wrapped(reloaded, tiny_model_path, lora, task=1, state=tmp_path / "state")
    model2.eval()
    with torch.no_grad():
        assert torch.equal(model2(**model_inputs(batch)).logits, expected)
    with pytest.raises(ValueError, match="experts"):  # a different shape is refused, not silently reshaped
        _wrapped(
            build_method("moelora", {"num_experts": 4}),
            tiny_model_path,
            lora,
            task=1,
            state=tmp_path / "state",
        )


def test_sequential_training_uses_several_experts(plain_run):
    first, second = plain_run.results
    for result in (first, second):
        losses = [e["loss"] for e in result.train_log]
        assert losses[-1] < losses[0]
    state = load_file(str(plain_run.state_dirs[1] / STATE_WEIGHTS))
    b_weights = {k: v for k, v in state.items() if k.endswith(".lora_B")}
    assert len(b_weights) == 14
    for name, b in b_weights.items():  # every expert of every layer was trained (B left zero)
        assert (b.unflatten(-1, (2, 4)).abs().sum((0, 2)) > 0).all(), name
    memory = second.memory
    dims = [(64, 64)] * 4 + [(64, 128)] * 2 + [(128, 64)]  # (in, out) of q, k, v, o, gate, up, down
    assert memory["expert_params"] == 2 * sum(8 * (i + o) for i, o in dims)
    assert memory["gate_params"] == 2 * sum(2 * i for i, _ in dims)
    assert (
        memory["trainable_params"]
        == memory["expert_params"] + memory["gate_params"] + memory["projector_params"]
    )


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_zero_continues_the_plain_run(stage, plain_run, small_root, tmp_path):
    """Task 2 under ZeRO from the plain run's task-1 state. The experts are created after the model is loaded
    (under ZeRO-3 into partitions, where the saved projector is written into gathered partitions) and must
    be taken over by DeepSpeed; the saved state must hold whole tensors. ZeRO-3's updates differ slightly from
    plain torch (for sequential LoRA too), so after the first step only a loose match is expected."""
    run = _run(
        small_root,
        tmp_path,
        "scaling.deepspeed=true",
        f"scaling.zero_stage={stage}",
        "scaling.zero3_param_persistence_threshold=0",
        "eval.max_samples_per_task=2",
        start_state=plain_run.state_dirs[0],
    )
    (ds,), plain = run.results, plain_run.results[1]
    assert ds.train_log[0]["loss"] == pytest.approx(plain.train_log[0]["loss"], rel=1e-5)  # state loaded
    rel = 1e-4 if stage == 2 else 5e-2
    assert [e["loss"] for e in ds.train_log] == pytest.approx([e["loss"] for e in plain.train_log], rel=rel)
    saved = load_file(str(run.state_dirs[0] / STATE_WEIGHTS))
    reference = load_file(str(plain_run.state_dirs[1] / STATE_WEIGHTS))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
    assert all(v.abs().sum() > 0 for k, v in saved.items() if k.endswith(".lora_B"))
    assert ds.memory["expert_params"] == plain.memory["expert_params"]
