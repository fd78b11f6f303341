"""Loading image-text-to-text models and what mcl knows about each model family.

Every model, real or tiny, goes through :func:`load_model_and_processor`: a local folder or a hub id is
loaded with ``AutoModelForImageTextToText`` and :func:`load_processor` (``AutoProcessor``). Built-in names
(``tiny-llava``, ``tiny-qwen2.5-vl``, ``tiny-internvl``, see :mod:`mcl.tiny_models`) are first materialised
as ordinary Hugging Face checkpoint folders and then loaded through that same path. :func:`model_family`
tells, from a config's ``model_type``, where LoRA goes by default and where the parts of the model are
(multimodal projector, vision tower, the language model's attention); methods reach it through the accessors
of :mod:`mcl.adapters`, never by guessing module names.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcl.errors import UnknownNameError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelFamily:
    """What the engine (and the methods, through :mod:`mcl.adapters`) know about an architecture.

    Attributes:
        lora_targets: Default LoRA target regex over module names: the language model only (a bare
            ``q_proj`` would also hit the vision tower's attention).
        projector: Name (last path component) of the multimodal projector module, trained with the adapter
            when ``model.lora.train_projector`` is on.
        vision_tower: Name (last path component) of the vision encoder module (the outermost one of that
            name); None where unknown.
        vision_mlp: Name of the MLP child of each of the vision encoder's blocks; None where unknown.
        language_attention: Regex fully matching the module names of the language model's self-attention
            layers (whose forward returns the attention weights under eager attention); None where unknown.
        text_config: Key of the language model's sub-config (``config.sub_configs``), where its attention
            implementation is set; None where unknown.
    """

    lora_targets: str
    projector: str
    vision_tower: str | None = None
    vision_mlp: str | None = None
    language_attention: str | None = None
    text_config: str | None = None


LANGUAGE_MODEL_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LANGUAGE_MODEL_ATTENTION = r".*language_model.*self_attn"
# MLP child names of vision encoder blocks tried for a vision tower of a model of no known family.
GENERIC_VISION_MLP_NAMES = ("mlp", "feed_forward", "ffn")
# By config.model_type. Module paths as transformers 5 names them: LLaVA and InternVL put the projector at
# model.multi_modal_projector and the vision encoder at model.vision_tower (blocks encoder.layers[i].mlp,
# InternVL encoder.layer[i].mlp), Qwen2.5-VL the projector at model.visual.merger and the encoder at
# model.visual (blocks[i].mlp); all three the language model at model.language_model (layers[i].self_attn).
MODEL_FAMILIES: dict[str, ModelFamily] = {
    "llava": ModelFamily(
        LANGUAGE_MODEL_LINEARS,
        "multi_modal_projector",
        vision_tower="vision_tower",
        vision_mlp="mlp",
        language_attention=LANGUAGE_MODEL_ATTENTION,
        text_config="text_config",
    ),
    "qwen2_5_vl": ModelFamily(
        LANGUAGE_MODEL_LINEARS,
        "merger",
        vision_tower="visual",
        vision_mlp="mlp",
        language_attention=LANGUAGE_MODEL_ATTENTION,
        text_config="text_config",
    ),
    "internvl": ModelFamily(
        LANGUAGE_MODEL_LINEARS,
        "multi_modal_projector",
        vision_tower="vision_tower",
        vision_mlp="mlp",
        language_attention=LANGUAGE_MODEL_ATTENTION,
        text_config="text_config",
    ),
}


def model_family(model_type: str | None) -> ModelFamily | None:
    """The family of a ``config.model_type`` (None when mcl has no defaults for it)."""
    return MODEL_FAMILIES.get(model_type or "")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def image_only_processor_class(processor_class: type) -> type:
    """``processor_class``, or where it declares a video processor, the same class without one.

    mcl feeds images only. transformers 5 builds every sub-processor a processor class declares, and video
    processors need torchvision (transformers issue #48558), so a Qwen2.5-VL or InternVL processor could
    not even be built for images without it. The subclass (same name and module, so saved folders stay
    standard) declares the image processor and the tokenizer only; images, text and the chat template work
    as in the original, on every machine alike.
    """
    if "video_processor" not in processor_class.get_attributes():
        return processor_class
    return _without_video(processor_class)


@functools.cache
def _without_video(processor_class: type) -> type:
    def get_attributes(cls: type) -> list[str]:
        return [a for a in processor_class.get_attributes.__func__(cls) if a != "video_processor"]

    return type(
        processor_class.__name__,
        (processor_class,),
        {"get_attributes": classmethod(get_attributes), "__module__": processor_class.__module__},
    )


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Turn a config's ``model.name`` into something ``from_pretrained`` accepts.

    Built-in names are built once into the cache (:func:`mcl.tiny_models.builtin_model_path`); an existing local
    folder is returned as an absolute path; an ``org/name`` hub id is returned unchanged. Anything else is
    an error listing the valid forms.
    """
    from mcl.tiny_models import BUILTIN_MODELS, builtin_model_path

    if name_or_path in BUILTIN_MODELS:
        return str(builtin_model_path(name_or_path, cache_dir))
    path = Path(name_or_path).expanduser()
    if name_or_path.strip() and path.is_dir():  # Path("") is ".": an empty name is not the working dir
        if not (path / "config.json").exists():
            raise UnknownNameError(f"model folder {str(path)!r} has no config.json")
        return str(path.resolve())
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "/")):
        return name_or_path
    raise UnknownNameError(
        f"unknown model {name_or_path!r}: give a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a local checkpoint folder, or a Hugging Face hub id 'org/name'"
    )


def load_processor(path: str, *, trust_remote_code: bool = False) -> Any:
    """The processor of a local folder or hub id, its tokenizer padding on the left.

    The class ``AutoProcessor`` picks for the model type, loaded image-only where it declares a video
    processor (see :func:`image_only_processor_class`); ``AutoProcessor`` itself for remote code.
    """
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    loader: Any = AutoProcessor
    if not trust_remote_code:
        config_class = type(AutoConfig.from_pretrained(path))
        if config_class in PROCESSOR_MAPPING:
            loader = image_only_processor_class(PROCESSOR_MAPPING[config_class])
    processor = loader.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_model_and_processor(
    path: str,
    *,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load an image-text-to-text model (``AutoModelForImageTextToText``) and its processor, with the given
    attention implementation (``sdpa``, ``eager``, ``flash_attention_2``; None: transformers' choice)."""
    import torch
    from transformers import AutoModelForImageTextToText

    processor = load_processor(path, trust_remote_code=trust_remote_code)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForImageTextToText.from_pretrained(
        path, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype), **extra
    )
    return model, processor
