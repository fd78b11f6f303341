"""UNIFIER's mechanisms: the VCC loss, per-scenario branches on any vision tower, what each task trains and
keeps, the saved state and its reload, and DeepSpeed ZeRO-2/3 runs (single process, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mcl.config import LoraConfig, load_config
from mcl.errors import ConfigError
from mcl.methods_api import TaskContext, build_method
from mcl.models import load_model_and_processor
from mcl.run import prepare_run, run_stream_locally
from methods.unifier import (
    BRANCHES_FILE,
    META_FILE,
    attach_branches,
    branch_consistency_kl,
    branch_modules,
    find_vision_blocks,
    projector_kl,
)

TASKS = ["aerial", "underwater"]


# -- the Vision Consistency Constraint ----------------------------------------------------------------------


def test_vcc_is_exactly_zero_when_branches_agree_and_positive_when_they_differ():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 32, generator=g)
    for k in (1, 2, 3, 4):
        assert branch_consistency_kl([a.clone() for _ in range(k)]).item() == 0.0
    differ = branch_consistency_kl([a, torch.randn(4, 32, generator=g), a])
    assert differ.item() > 1e-3
    # Sharper distributions (lower temperature) disagree more.
    assert branch_consistency_kl([a, a.flip(-1)], temperature=0.5) > branch_consistency_kl([a, a.flip(-1)])
    # Gradient reaches a branch that disagrees.
    b = torch.randn(4, 32, generator=g, requires_grad=True)
    branch_consistency_kl([a, b]).backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_projector_kl_is_zero_when_the_projector_has_not_moved():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(3, 16, generator=g)
    assert projector_kl(out, out.clone()).item() == 0.0
    moved = projector_kl(out, out + 0.5 * torch.randn(3, 16, generator=g))
    assert moved.item() > 0.0


# -- parameters and scenarios --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"bottleneck": 0}, "bottleneck"),
        ({"activation": "swish2"}, "activation"),
        ({"vcc_weight": -1.0}, "vcc_weight"),
        ({"vcc_temperature": 0.0}, "vcc_temperature"),
        ({"scenarios": []}, "scenarios"),
        ({"scenarios": ["aerial", "aerial"]}, "scenarios"),
        ({"scenarios": "aerial"}, "scenarios"),
        ({"language_lora": "yes"}, "language_lora"),
    ],
)
def test_bad_params_name_the_field(params, field):
    with pytest.raises(ConfigError, match=field):
        build_method("unifier", params)


def test_scenarios_default_to_task_names_and_map_repeated_tasks_by_prefix():
    method = build_method("unifier")
    names = ("aerial", "underwater", "street")
    assert method.scenario_names(names) == list(names)
    assert method.scenario_index("street", names) == 2

    stream = ("aerial_1", "underwater_1", "aerial_2", "underwater_2")
    method = build_method("unifier", {"scenarios": ["aerial", "underwater"]})
    assert [method.scenario_index(n, stream) for n in stream] == [0, 1, 0, 1]
    ctx = TaskContext(task_index=2, task_names=stream, lora=LoraConfig())
    assert method.seen_scenarios(ctx) == [0, 1]
    with pytest.raises(ConfigError, match=r"method.params.scenarios: task 'indoor_1'"):
        method.scenario_index("indoor_1", (*stream, "indoor_1"))


# -- other vision architectures ------------------------------------------------------------------------------


def _check_branches_on(model: nn.Module, run_tower, expected_blocks: int, vision_module: str = "") -> None:
    """Zero up-projections leave the tower's output unchanged; a trained branch changes it."""
    with torch.no_grad():
        before = run_tower()
    added = attach_branches(
        model, num_branches=3, bottleneck=4, activation="gelu", seed=0, vision_module=vision_module
    )
    assert len(added) == expected_blocks == len(branch_modules(model))
    with torch.no_grad():
        after = run_tower()
        assert after.shape == before.shape
        assert torch.equal(after, before)
        added[0].up[1].weight.normal_(0, 0.5)
        assert not torch.allclose(run_tower(), before)
    # The VCC statistics are recorded per block while gradients are on: one (rows, hidden) vector per branch.
    for b in added:
        b.vcc_branches = [0, 1]
    run_tower()
    record = added[0].records[-1]
    assert len(record["branches"]) == 2 and record["new"].shape == record["old"].shape
    assert record["new"].shape[-1] == added[0].hidden
    assert projector_kl(record["old"], record["new"]).item() == 0.0  # the projector has not moved


def test_branches_on_a_siglip_vision_tower():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    # A VLM of no known family holding its SigLIP encoder as `vision_tower` (LLaVA-OneVision, PaliGemma, ...):
    # the tower is named by method.params.vision_module, its blocks' MLPs are found by their usual names.
    model = nn.Module()
    model.vision_tower = SiglipVisionModel(config).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with pytest.raises(ConfigError, match=r"method.params.vision_module: .*model type None"):
        find_vision_blocks(model)
    _, blocks = find_vision_blocks(model, "vision_tower")
    assert [b.key for b in blocks] == ["encoder.layers.0", "encoder.layers.1"]
    assert {b.hidden for b in blocks} == {24}
    _check_branches_on(
        model,
        lambda: model.vision_tower(pixel_values=pixels).last_hidden_state,
        2,
        vision_module="vision_tower",
    )


def test_branches_on_a_qwen2_5_vl_vision_tower_with_packed_2d_tokens():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 16,
            "fullatt_block_indexes": [1],
        },
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    tower, blocks = find_vision_blocks(model)
    assert tower == "model.visual"
    assert [b.key for b in blocks] == ["blocks.0", "blocks.1"]  # not the patch merger's MLP
    assert type(blocks[0].mlp).__name__ == "Qwen2_5_VLMLP" and blocks[0].hidden == 32
    grid = torch.tensor([[1, 4, 4]])
    patches = torch.randn(16, 3 * 2 * 4 * 4)
    _check_branches_on(model, lambda: model.model.visual(patches, grid_thw=grid).last_hidden_state, 2)


def test_a_model_without_a_vision_tower_is_refused_naming_the_field():
    model = nn.Module()
    model.text = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="method.params.vision_module"):
        find_vision_blocks(model)


# -- on the tiny LLaVA ---------------------------------------------------------------------------------------


def test_setup_trains_only_the_current_branch_and_shared_projectors(tiny_model_path):
    method = build_method("unifier", {"scenarios": ["aerial", "underwater", "street"]})
    # Task 2 (underwater; no saved state needed for this): branch 1 trains, branches 0 and 2 are frozen.
    ctx = TaskContext(task_index=1, task_names=tuple(TASKS), lora=LoraConfig())
    base, _ = load_model_and_processor(tiny_model_path)
    model = method.setup_model(base, ctx)
    method.before_task(model, ctx)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    branch_names = {n for n in trainable if "unifier_branches" in n}
    assert branch_names, "no branch trains"
    assert all(".down.1." in n or ".up.1." in n or ".projector." in n for n in branch_names), branch_names
    assert any(".down.1." in n for n in branch_names) and any(".projector." in n for n in branch_names)
    rest = trainable - branch_names
    assert rest and all("lora_" in n or "multi_modal_projector" in n for n in rest), rest
    vision = [n for n in trainable if "vision_tower" in n and "unifier_branches" not in n]
    assert vision == []  # the base vision tower stays frozen
    report = method.memory_report(model)
    assert report["branch_params_aerial"] == report["branch_params_street"] > 0
    assert report["extra_params"] == (
        report["branch_params_total"]
        + report["shared_projector_params"]
        + report["lora_params"]
        + report["saved_module_params"]
    )
    assert report["lora_params"] > 0 and report["saved_module_params"] > 0


def test_without_language_lora_only_vision_branches_and_the_multimodal_projector_train(tiny_model_path):
    method = build_method("unifier", {"language_lora": False})
    ctx = TaskContext(task_index=0, task_names=tuple(TASKS), lora=LoraConfig())
    base, _ = load_model_and_processor(tiny_model_path)
    model = method.setup_model(base, ctx)
    method.before_task(model, ctx)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    branch_names = {n for n in trainable if "unifier_branches" in n}
    assert branch_names and all(".down.0." in n or ".up.0." in n or ".projector." in n for n in branch_names)
    assert {n for n in trainable if "unifier_branches" not in n} == {
        n for n, _ in model.named_parameters() if "multi_modal_projector" in n
    }
    assert not any("lora_" in n for n, _ in model.named_parameters())


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    from mcl.streams import build_stream

    root = tmp_path_factory.mktemp("data") / "generated"
    build_stream("generated", root, {"train_per_task": 16, "test_per_task": 4})
    return root


def _run(root: Path, out: Path, *overrides: str):
    cfg = load_config(
        "jobs/configs/default.yaml",
        [
            f"stream.root={root}",
            "stream.options.train_per_task=16",
            "stream.options.test_per_task=4",
            f"stream.options.tasks=[{','.join(TASKS)}]",
            "method.name=unifier",
            "train.epochs=2",
            "train.batch_size=8",
            "train.lr=0.01",
            "eval.max_new_tokens=2",
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            f"tracking.output_dir={out}",
            *overrides,
        ],
    )
    return run_stream_locally(prepare_run(cfg, log=lambda _m: None), out, log=lambda _m: None)


def _branches_by_scenario(tensors: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {n: t for n, t in tensors.items() if f".down.{k}." in n or f".up.{k}." in n}


def _projectors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in tensors.items() if ".projector." in n}


def _assert_trained_only(before, after, trained: int, frozen: list[int]) -> None:
    for k in frozen:
        for name, tensor in _branches_by_scenario(before, k).items():
            assert torch.equal(after[name], tensor), f"frozen branch {k} changed: {name}"
    changed = [n for n, t in _branches_by_scenario(before, trained).items() if not torch.equal(after[n], t)]
    assert any(".up." in n for n in changed), f"branch {trained} did not train"
    assert any(not torch.equal(after[n], t) for n, t in _projectors(before).items()), (
        "projector did not train"
    )


def _initial_branches(model_path: str, num_branches: int) -> dict[str, torch.Tensor]:
    base, _ = load_model_and_processor(model_path)
    return {
        f"{b.key}.{n}": p.detach().clone()
        for b in attach_branches(base, num_branches, 16, "gelu", seed=0)
        for n, p in b.named_parameters()
    }


def test_each_task_trains_its_branch_and_the_projector_and_frozen_branches_stay_bit_identical(
    small_root, tmp_path, tiny_model_path
):
    run = _run(small_root, tmp_path, "method.params.scenarios=[aerial,underwater,street]")
    assert len(run.matrix) == 2
    states = [load_file(str(Path(d) / BRANCHES_FILE)) for d in run.state_dirs]
    initial = _initial_branches(tiny_model_path, 3)
    assert sorted(initial) == sorted(states[0]) == sorted(states[1])
    _assert_trained_only(initial, states[0], trained=0, frozen=[1, 2])  # task 1: aerial
    _assert_trained_only(states[0], states[1], trained=1, frozen=[0, 2])  # task 2: underwater
    meta = json.loads((Path(run.state_dirs[1]) / META_FILE).read_text())
    assert meta["scenarios"] == ["aerial", "underwater", "street"]
    assert (Path(run.state_dirs[1]) / "adapter" / "adapter_model.safetensors").exists()
    # VCC: zero while one scenario is seen, positive once two branches differ.
    logs = [r.train_log for r in run.results]
    assert logs[1][-1]["extra_loss"] > 0.0
    assert run.results[1].memory["branch_params_underwater"] > 0

    # The saved state reloads exactly onto a fresh model.
    method = build_method("unifier", {"scenarios": ["aerial", "underwater", "street"]})
    ctx = TaskContext(
        task_index=1, task_names=tuple(TASKS), lora=LoraConfig(), previous_state_dir=Path(run.state_dirs[1])
    )
    base, _ = load_model_and_processor(tiny_model_path)
    model = method.setup_model(base, ctx)
    reloaded = {f"{b.key}.{n}": p for b in branch_modules(model) for n, p in b.named_parameters()}
    assert all(torch.equal(reloaded[n], t) for n, t in states[1].items())
    # A run with other shapes refuses the state, naming what differs.
    other = build_method("unifier", {"scenarios": ["aerial", "underwater", "street"], "bottleneck": 8})
    base, _ = load_model_and_processor(tiny_model_path)
    with pytest.raises(ConfigError, match="bottleneck"):
        other.setup_model(base, ctx)


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_deepspeed_single_process_trains_two_tasks(small_root, tmp_path, stage):
    run = _run(
        small_root,
        tmp_path,
        "scaling.deepspeed=true",
        f"scaling.zero_stage={stage}",
        "scaling.zero3_param_persistence_threshold=0",
        "train.epochs=1",
        "eval.max_samples_per_task=2",
    )
    assert len(run.matrix) == 2 and all(len(row) == 2 for row in run.matrix)
    first, second = (load_file(str(Path(d) / BRANCHES_FILE)) for d in run.state_dirs)
    assert all(t.numel() > 0 for t in second.values())  # gathered, not empty ZeRO-3 partitions
    _assert_trained_only(first, second, trained=1, frozen=[0])
    assert run.results[1].memory["branch_params_aerial"] > 0
