"""The adapter toolkit of the methods: LoRA adapters in the standard PEFT format and where things are in a model.

* Where adapters go is decided here, once for every method: :func:`lora_target_modules` (the experiment's
  ``model.lora.target_modules``, else the model family's language-model default) and
  :func:`projector_module_names` / :func:`projector_modules` (the multimodal projector trained when
  ``model.lora.train_projector``).
* Model structure, from the model-family table (:data:`mcl.models.MODEL_FAMILIES`), never guessed by name in a
  method: :func:`vision_tower`, :func:`vision_mlp_names`, :func:`language_attention_modules`,
  :func:`use_eager_language_attention`. A model of no known family is refused with its model type named.
* Adapters: :func:`new_lora`, :func:`load_lora`, :func:`continue_lora` (the previous task's adapter, or a new
  one), :func:`save_lora`, and :func:`using_adapter`, the only code that touches peft's private API.
* :func:`full_numel`, :func:`full_shape`: a parameter's full size and shape, also when ZeRO-3 has
  partitioned it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcl.errors import ConfigError
from mcl.models import GENERIC_VISION_MLP_NAMES, MODEL_FAMILIES, ModelFamily, model_family

if TYPE_CHECKING:
    import torch

    from mcl.config import LoraConfig
    from mcl.methods_api import TaskContext

ADAPTER_DIR = "adapter"
# The peft release whose private attributes :func:`using_adapter` was checked against (tests/engine/
# test_adapters.py fails on any other installed version: re-check the attributes, then update this).
PEFT_VERSION_CHECKED = "0.21.2"


def _family(model: torch.nn.Module) -> tuple[str | None, ModelFamily | None]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)  # PeftModel forwards .config
    return model_type, model_family(model_type)


def _family_field(model: torch.nn.Module, field: str, what: str) -> Any:
    """The family's ``field`` for ``model``, or a ConfigError naming the model type and what is missing."""
    model_type, family = _family(model)
    value = getattr(family, field, None) if family is not None else None
    if value is None:
        known = ", ".join(sorted(t for t, f in MODEL_FAMILIES.items() if getattr(f, field) is not None))
        raise ConfigError(
            f"mcl does not know the {what} of model type {model_type!r} (model {type(model).__name__}); the "
            f"model-family table (mcl.models.MODEL_FAMILIES) knows it for {known}"
        )
    return value


def full_numel(param: torch.Tensor) -> int:
    """The number of elements of ``param``, also when ZeRO-3 has partitioned it (``numel()`` is then 0 and
    DeepSpeed keeps the full size in ``ds_numel``)."""
    return int(getattr(param, "ds_numel", param.numel()))


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``param``, also when ZeRO-3 has partitioned it (DeepSpeed keeps it in ``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def lora_target_modules(model: torch.nn.Module, lora: LoraConfig) -> str:
    """The LoRA target regex for ``model``: ``lora.target_modules`` when set, else its family's default
    (the language model's attention and MLP projections, never the vision tower)."""
    if lora.target_modules:
        return lora.target_modules
    model_type, family = _family(model)
    if family is None:
        raise ConfigError(
            f"model.lora.target_modules: no default LoRA targets for model type {model_type!r} (defaults exist "
            f"for {', '.join(sorted(MODEL_FAMILIES))}); set model.lora.target_modules to a regex over the "
            r"language model's module names, e.g. '.*language_model.*\.(q_proj|v_proj)'"
        )
    return family.lora_targets


def _outermost_named(model: torch.nn.Module, names: set[str]) -> list[tuple[str, torch.nn.Module]]:
    """Modules whose last path component is in ``names`` and that are not inside another such module."""
    found = [(n, m) for n, m in model.named_modules() if n and n.rsplit(".", 1)[-1] in names]
    return [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]


def projector_module_names(model: torch.nn.Module) -> list[str]:
    """Names (last path component) of the multimodal projector modules, trained alongside LoRA when asked:
    the family's projector, or for a model of no known family, its modules named ``*projector*``."""
    _, family = _family(model)
    if family is not None:
        return [family.projector]
    names = []
    for name, _ in model.named_children():
        if "projector" in name:
            names.append(name)
    inner = getattr(model, "model", None)
    if inner is not None:
        names += [n for n, _ in inner.named_children() if "projector" in n]
    return sorted(set(names))


def projector_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The multimodal projector modules of ``model`` (see :func:`projector_module_names`) with their full
    paths, outermost only, in the model's module order."""
    return _outermost_named(model, set(projector_module_names(model)))


def vision_tower(model: torch.nn.Module, name: str = "") -> tuple[str, torch.nn.Module]:
    """The vision encoder of ``model`` and its path: the outermost module named ``name`` when given, else
    the one its model family names. ConfigError when the family does not know it or it is absent."""
    wanted = name or _family_field(model, "vision_tower", "vision tower")
    found = _outermost_named(model, {wanted})
    if not found:
        raise ConfigError(f"no vision tower module named {wanted!r} in {type(model).__name__}")
    return min(found, key=lambda item: item[0].count("."))


def vision_mlp_names(model: torch.nn.Module) -> tuple[str, ...]:
    """Names the MLP child of a vision encoder block may have: the family's, or for a model of no known
    family (whose vision tower is then named by the caller), the common ones
    (:data:`mcl.models.GENERIC_VISION_MLP_NAMES`)."""
    _, family = _family(model)
    if family is not None and family.vision_mlp is not None:
        return (family.vision_mlp,)
    return GENERIC_VISION_MLP_NAMES


def language_attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The self-attention modules of ``model``'s language model with their paths, in module order (the
    family's ``language_attention`` pattern). ConfigError when the family does not know them or none match."""
    pattern = re.compile(_family_field(model, "language_attention", "language model's attention modules"))
    found = [(n, m) for n, m in model.named_modules() if pattern.fullmatch(n)]
    if not found:
        raise ConfigError(
            f"no module of {type(model).__name__} matches the language attention pattern {pattern.pattern!r}"
        )
    return found


def use_eager_language_attention(model: torch.nn.Module) -> None:
    """Switch the language model to eager attention, the only implementation that returns attention weights
    (the vision tower keeps its own)."""
    text_config = _family_field(model, "text_config", "language model's sub-config")
    model.set_attn_implementation({text_config: "eager"})


def peft_lora_config(lora: LoraConfig, target_modules: str, modules_to_save: list[str] | None = None) -> Any:
    """A peft ``LoraConfig`` of the experiment's LoRA shape (rank, alpha, dropout; no bias) on
    ``target_modules`` (a regex), with ``modules_to_save`` trained (copied per adapter) beside it."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        bias="none",
    )


def new_lora(model: torch.nn.Module, lora: LoraConfig, adapter_name: str = "default") -> torch.nn.Module:
    """Wrap ``model`` in a fresh, trainable PEFT LoRA adapter (B initialised to zero: output unchanged)."""
    from peft import get_peft_model

    peft_config = peft_lora_config(
        lora,
        lora_target_modules(model, lora),
        projector_module_names(model) if lora.train_projector else None,
    )
    return get_peft_model(model, peft_config, adapter_name=adapter_name)


def load_lora(
    model: torch.nn.Module, path: str | Path, trainable: bool = True, adapter_name: str = "default"
) -> torch.nn.Module:
    """Load a saved PEFT adapter folder onto ``model``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable, adapter_name=adapter_name)


def continue_lora(model: torch.nn.Module, ctx: TaskContext, adapter_name: str = "default") -> torch.nn.Module:
    """The adapter a task trains when each task continues the previous one: the previous task's saved adapter
    (``<previous state>/adapter``), trainable, or a fresh one (:func:`new_lora`) at the start of the stream."""
    if ctx.previous_state_dir is None:
        return new_lora(model, ctx.lora, adapter_name=adapter_name)
    return load_lora(model, ctx.previous_state_dir / ADAPTER_DIR, trainable=True, adapter_name=adapter_name)


def save_lora(model: torch.nn.Module, path: str | Path) -> Path:
    """Save the PEFT adapter(s) of ``model`` as safetensors. Parameters must already be gathered (ZeRO-3)."""
    out = Path(path)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def _adapter_names(layer: torch.nn.Module) -> set[str]:
    if hasattr(layer, "_all_available_adapter_names"):  # peft BaseTunerLayer (LoRA layers)
        return set(layer._all_available_adapter_names())
    return set(getattr(layer, "_adapters", ()))  # peft AuxiliaryTrainingWrapper (modules_to_save copies)


@contextmanager
def using_adapter(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Compute with adapter ``name`` for the duration: every peft layer holding it (LoRA layers and
    ``modules_to_save`` copies such as the projector) switched to it, every module in eval mode (no dropout,
    no random numbers drawn); the active adapters and every module's mode are restored afterwards.

    peft's public switches do not fit a teacher forward inside a training step: ``set_adapter`` also sets
    ``requires_grad`` (the student's would be frozen and unfrozen every step, under the optimiser's and
    DeepSpeed's hooks), and mixed-adapter batches (``adapter_names``) do not support a ``modules_to_save``
    wrapper around a composite module such as LLaVA's projector. So this sets the layers' ``_active_adapter``,
    the attribute ``set_adapter`` itself sets (checked for peft :data:`PEFT_VERSION_CHECKED`), and nothing else.
    The only place in mcl touching peft's private API.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = [
        m
        for m in model.modules()
        if isinstance(m, BaseTunerLayer | AuxiliaryTrainingWrapper) and name in _adapter_names(m)
    ]
    if not layers:
        raise RuntimeError(f"no peft layer of {type(model).__name__} holds adapter {name!r}")
    active = [(m, m._active_adapter) for m in layers]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for m, current in active:
            m._active_adapter = [name] if isinstance(current, list) else name
        yield
    finally:
        for m, current in active:
            m._active_adapter = current
        for m, training in modes:
            m.training = training


@contextmanager
def adapters_in_lockstep(model: torch.nn.Module) -> Iterator[None]:
    """Mixed-adapter forwards (peft's ``adapter_names``) that run every adapter of every layer, in sorted
    order, on each call: an adapter no sample of the batch uses runs on an empty sub-batch.

    peft runs only the adapters present in the batch, in the order of a Python ``set`` (which follows each
    process's hash seed). Under ZeRO-3 every module's forward gathers its partitioned parameters, a collective:
    ranks whose batches route to different adapters would gather different modules in different orders. In
    lockstep every rank runs the same modules in the same order. The answers are peft's: the base layer runs
    on the whole batch and each adapter adds to its own rows (disjoint), as in peft's
    ``LoraLayer._mixed_batch_forward`` for plain LoRA (no DoRA or other variant) and
    ``ModulesToSaveWrapper._mixed_batch_forward`` (checked for peft :data:`PEFT_VERSION_CHECKED`).
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.utils.other import ModulesToSaveWrapper

    patched: list[torch.nn.Module] = []
    try:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                if not isinstance(module, LoraLinear) or module.lora_variant:
                    raise RuntimeError(
                        f"{type(module).__name__}: adapters in lockstep support plain LoRA on linear layers only"
                    )
                module._mixed_batch_forward = _lockstep_lora_forward.__get__(module)
            elif isinstance(module, ModulesToSaveWrapper):
                module._mixed_batch_forward = _lockstep_saved_forward.__get__(module)
            else:
                continue
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module._mixed_batch_forward  # the class's method again


def _rows(adapter_names: list[str], name: str) -> list[int]:
    return [i for i, item in enumerate(adapter_names) if item == name]


def _lockstep_lora_forward(
    self: Any, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
) -> torch.Tensor:
    kwargs.pop("alora_offsets", None)  # a variant's argument (peft's VARIANT_KWARG_KEYS); plain LoRA has none
    result = self.base_layer(x, *args, **kwargs)
    for name in sorted(self.lora_A.keys()):
        rows = _rows(adapter_names, name)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        sub_batch = x[rows].to(lora_a.weight.dtype)
        out = lora_b(lora_a(self.lora_dropout[name](sub_batch))) * self.scaling[name]
        if rows:
            result[rows] += out.to(result.dtype)
    return result


def _lockstep_saved_forward(
    self: Any, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
) -> torch.Tensor:
    import torch

    results: list[Any] = [None] * len(x)
    for name in ["__base__", *sorted(self.modules_to_save.keys())]:
        rows = _rows(adapter_names, name)
        sub_batch = x[rows]
        if name == "__base__":
            out = self.original_module(sub_batch, *args, **kwargs)
        else:
            out = self._forward_wrapped_mixed_batch(sub_batch, name, *args, **kwargs)
        for k, j in enumerate(rows):
            results[j] = out[k]
    return torch.stack(results)
