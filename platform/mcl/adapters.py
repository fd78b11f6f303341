"""LoRA adapters in the standard PEFT format, shared by the methods that use them.

Where adapters go is decided here, once for every method: :func:`lora_target_modules` (the experiment's
``model.lora.target_modules``, else the model family's language-model default) and
:func:`projector_module_names` (the multimodal projector trained when ``model.lora.train_projector``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mcl.errors import ConfigError
from mcl.models import MODEL_FAMILIES, ModelFamily, model_family

if TYPE_CHECKING:
    import torch

    from mcl.config import LoraConfig

ADAPTER_DIR = "adapter"


def _family(model: torch.nn.Module) -> tuple[str | None, ModelFamily | None]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)  # PeftModel forwards .config
    return model_type, model_family(model_type)


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


def new_lora(model: torch.nn.Module, lora: LoraConfig, adapter_name: str = "default") -> torch.nn.Module:
    """Wrap ``model`` in a fresh, trainable PEFT LoRA adapter (B initialised to zero: output unchanged)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(model, lora),
        modules_to_save=projector_module_names(model) if lora.train_projector else None,
        bias="none",
    )
    return get_peft_model(model, peft_config, adapter_name=adapter_name)


def load_lora(model: torch.nn.Module, path: str | Path, trainable: bool = True) -> torch.nn.Module:
    """Load a saved PEFT adapter folder onto ``model``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)


def save_lora(model: torch.nn.Module, path: str | Path) -> Path:
    """Save the PEFT adapter(s) of ``model`` as safetensors. Parameters must already be gathered (ZeRO-3)."""
    out = Path(path)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
