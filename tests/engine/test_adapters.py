"""The adapter toolkit (:mod:`mcl.adapters`): peft's private API pinned, adapter switching, model structure."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mcl.adapters import (
    PEFT_VERSION_CHECKED,
    adapters_in_lockstep,
    full_numel,
    full_shape,
    language_attention_modules,
    projector_modules,
    using_adapter,
    vision_mlp_names,
    vision_tower,
)
from mcl.errors import ConfigError
from mcl.models import GENERIC_VISION_MLP_NAMES, MODEL_FAMILIES


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.lin(x)))


def _two_adapter_model() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["lin"], modules_to_save=["head"], init_lora_weights=False
    )
    model = get_peft_model(_Toy(), config, adapter_name="default")
    model.add_adapter("teacher", config)
    with torch.no_grad():  # make the teacher differ from the student everywhere, projector copy included
        for name, p in model.named_parameters():
            if ".teacher." in name:
                p.add_(0.3)
    return model


def test_peft_private_api_is_the_checked_one():
    """using_adapter sets peft layers' ``_active_adapter`` (what ``set_adapter`` itself sets) and reads the
    adapter names through ``_all_available_adapter_names`` / ``_adapters``: private peft API. On another
    peft version, re-check those attributes (peft/tuners/tuners_utils.py, peft/utils/other.py), then update
    ``mcl.adapters.PEFT_VERSION_CHECKED``."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    assert peft.__version__ == PEFT_VERSION_CHECKED, (
        f"peft {peft.__version__} is installed, mcl.adapters.using_adapter was checked against "
        f"{PEFT_VERSION_CHECKED}: re-check the private attributes it uses"
    )
    model = _two_adapter_model()
    lora = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    assert lora and saved
    for layer in lora:
        assert hasattr(layer, "_active_adapter")
        assert set(layer._all_available_adapter_names()) == {"default", "teacher"}
    for layer in saved:
        assert hasattr(layer, "_active_adapter")
        assert set(layer._adapters) == {"default", "teacher"}
    # set_adapter (public) writes exactly the attribute using_adapter writes.
    model.base_model.set_adapter("teacher")
    assert all(layer._active_adapter in ("teacher", ["teacher"]) for layer in [*lora, *saved])


def test_using_adapter_computes_with_it_and_restores_adapters_modes_and_grads():
    model = _two_adapter_model()
    reference = _two_adapter_model()
    reference.base_model.set_adapter("teacher")
    reference.eval()
    model.train()
    x = torch.randn(5, 4)
    active = {name: getattr(m, "active_adapters", None) for name, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    with torch.no_grad(), using_adapter(model, "teacher"):
        assert not any(m.training for m in model.modules())
        teacher = model(x)
    assert torch.equal(torch.get_rng_state(), rng)  # eval mode: no dropout drawn
    with torch.no_grad():
        assert torch.allclose(teacher, reference(x))
        model.eval()
        assert not torch.allclose(model(x), teacher)  # the student is back
    model.train()
    assert all(m.training for m in model.modules())
    assert {name: getattr(m, "active_adapters", None) for name, m in model.named_modules()} == active
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_adapters_in_lockstep_answer_as_peft_and_run_every_adapter_in_one_order():
    """A mixed batch in lockstep gives peft's own outputs bit for bit (LoRA layer and saved-module copy), runs
    every adapter and the base module (an unused one on an empty sub-batch) in sorted order whatever the
    batch holds, and leaves peft's methods in place afterwards."""
    model = _two_adapter_model().eval()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    calls: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, name=name: calls.append(name))
        for name, m in model.named_modules()
        if name.endswith(("lin.lora_A.default", "lin.lora_A.teacher", "head.original_module"))
        or name.endswith(("head.modules_to_save.default", "head.modules_to_save.teacher"))
    ]
    for names in (["teacher", "default", "teacher", "__base__", "default"], ["teacher"] * 5):
        with torch.no_grad():
            expected = model(x, adapter_names=names)
            calls.clear()
            with adapters_in_lockstep(model):
                got = model(x, adapter_names=names)
        assert torch.equal(got, expected), names
        assert [c.rsplit(".", 1)[-1] for c in calls] == [
            "default",
            "teacher",
            "original_module",
            "default",
            "teacher",
        ]
    for hook in hooks:
        hook.remove()
    assert all("_mixed_batch_forward" not in vars(m) for m in model.modules())


def test_using_an_adapter_no_layer_holds_is_an_error():
    with (
        pytest.raises(RuntimeError, match="holds adapter 'nope'"),
        using_adapter(_two_adapter_model(), "nope"),
    ):
        pass


def test_full_numel_reads_the_zero3_full_size():
    p = nn.Parameter(torch.zeros(3, 4))
    assert full_numel(p) == 12
    p.ds_numel, p.ds_shape = 120, torch.Size([10, 12])  # DeepSpeed's on a partitioned parameter
    assert full_numel(p) == 120 and full_shape(p) == (10, 12)


def _with_type(model: nn.Module, model_type: str | None) -> nn.Module:
    model.config = SimpleNamespace(model_type=model_type)
    return model


def test_every_family_knows_the_structure_the_methods_need():
    for model_type, family in MODEL_FAMILIES.items():
        missing = [
            f
            for f in ("vision_tower", "vision_mlp", "language_attention", "text_config")
            if not getattr(family, f)
        ]
        assert not missing, f"{model_type}: {missing}"


def test_structure_accessors_follow_the_family_table():
    model = _with_type(nn.Module(), "llava")
    model.model = nn.Module()
    model.model.vision_tower = nn.Sequential(nn.Linear(2, 2))
    model.model.language_model = nn.Module()
    model.model.language_model.layers = nn.ModuleList([nn.Module(), nn.Module()])
    for layer in model.model.language_model.layers:
        layer.self_attn = nn.Linear(2, 2)
    model.model.multi_modal_projector = nn.Sequential(nn.Linear(2, 2))
    assert vision_tower(model)[0] == "model.vision_tower"
    assert vision_mlp_names(model) == ("mlp",)
    assert [n for n, _ in language_attention_modules(model)] == [
        "model.language_model.layers.0.self_attn",
        "model.language_model.layers.1.self_attn",
    ]
    assert [n for n, _ in projector_modules(model)] == ["model.multi_modal_projector"]


def test_a_model_of_no_known_family_is_refused_naming_its_type():
    model = _with_type(nn.Module(), "mystery_vlm")
    model.vision = nn.Linear(2, 2)
    with pytest.raises(
        ConfigError, match=r"vision tower of model type 'mystery_vlm'.*knows it for internvl, llava"
    ):
        vision_tower(model)
    with pytest.raises(ConfigError, match="attention modules of model type 'mystery_vlm'"):
        language_attention_modules(model)
    assert vision_tower(model, "vision")[0] == "vision"  # named explicitly
    assert vision_mlp_names(model) == GENERIC_VISION_MLP_NAMES
