"""Loading image-text-to-text models, what mcl knows about each model family, and the tiny local models.

Every model, real or tiny, goes through :func:`load_model_and_processor`: a local folder or a hub id is
loaded with ``AutoModelForImageTextToText`` and :func:`load_processor` (``AutoProcessor``). Built-in names
(``tiny-llava``, ``tiny-qwen2.5-vl``, ``tiny-internvl``) are first materialised as ordinary Hugging Face
checkpoint folders (real transformers classes, random weights, a word-level tokenizer and each family's
chat template) and then loaded through that same path. :func:`model_family` tells, from a config's
``model_type``, where LoRA goes by default and which module is the multimodal projector.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcl.errors import UnknownNameError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelFamily:
    """What the engine needs to know about an architecture.

    Attributes:
        lora_targets: Default LoRA target regex over module names: the language model only (a bare
            ``q_proj`` would also hit the vision tower's attention).
        projector: Name (last path component) of the multimodal projector module, trained with the adapter
            when ``model.lora.train_projector`` is on.
    """

    lora_targets: str
    projector: str


LANGUAGE_MODEL_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# By config.model_type. Module paths as transformers 5 names them: LLaVA and InternVL put the projector at
# model.multi_modal_projector, Qwen2.5-VL at model.visual.merger; all three at model.language_model.
MODEL_FAMILIES: dict[str, ModelFamily] = {
    "llava": ModelFamily(LANGUAGE_MODEL_LINEARS, "multi_modal_projector"),
    "qwen2_5_vl": ModelFamily(LANGUAGE_MODEL_LINEARS, "merger"),
    "internvl": ModelFamily(LANGUAGE_MODEL_LINEARS, "multi_modal_projector"),
}


def model_family(model_type: str | None) -> ModelFamily | None:
    """The family of a ``config.model_type`` (None when mcl has no defaults for it)."""
    return MODEL_FAMILIES.get(model_type or "")


UNK_TOKEN = "<unk>"  # every tiny tokenizer has one (WordLevel needs it)
# Single capital letters: multiple-choice answers and the letters a router answers with (MR-LoRA).
TINY_LETTERS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
TINY_PUNCTUATION = (":", "?", ".", ",")
# LLaVA-1.5 style conversation, the same shape as llava-hf's template.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<pad>", UNK_TOKEN, "<s>", "</s>", "<image>")
TINY_TEMPLATE_WORDS = ("USER", "ASSISTANT", *TINY_PUNCTUATION)
# Qwen2.5-VL-Instruct's template (default system prompt, vision markers around the image pad).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_5_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    UNK_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN2_5_VL_TEMPLATE_WORDS = ("system", "user", "assistant", "You", "are", "a", "helpful", *TINY_PUNCTUATION)
# InternVL's (-hf checkpoints) template: ChatML turns, <IMG_CONTEXT> expanded by the processor to
# <img> + image_seq_length context tokens + </img>.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INTERNVL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    UNK_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)
INTERNVL_TEMPLATE_WORDS = ("user", "assistant", *TINY_PUNCTUATION)
BUILTIN_MODELS = ("tiny-llava", "tiny-qwen2.5-vl", "tiny-internvl")
TINY_BUILD_VERSION = 3  # bump when a tiny builder changes, so cached builds are not reused
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def tiny_vocabulary(template_words: Sequence[str]) -> list[str]:
    """Words a tiny model's tokenizer knows: its chat template's, letters, and the generated stream's."""
    from mcl.streams.generated import GENERATED_VOCABULARY

    words = list(template_words) + [w for w in TINY_LETTERS if w not in template_words]
    return words + [w for w in GENERATED_VOCABULARY if w not in words]


def tiny_llava_vocabulary() -> list[str]:
    """Words the tiny LLaVA's tokenizer knows: the generated stream's words plus the template's."""
    return tiny_vocabulary(TINY_TEMPLATE_WORDS)


@dataclass(frozen=True)
class LlavaShape:
    """Architecture of a random-weight LLaVA (Llama text model + CLIP vision tower)."""

    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    vision_feature_layer: int
    min_vocab_size: int = 0  # pad the embedding to a real model's size (the tokenizer may know fewer words)
    max_positions: int = 256
    # A final RMSNorm caps |logits| at |lm_head row| * sqrt(hidden); at the usual 0.02 init the tiny
    # model's logits stay near 1 and LoRA (which cannot touch lm_head) could not make confident answers.
    initializer_range: float = 0.02


def tiny_llava_shape(
    hidden_size: int = 64, num_layers: int = 2, image_size: int = 32, patch_size: int = 8
) -> LlavaShape:
    """The tiny model of the demo and the tests (trains on a laptop CPU in seconds)."""
    return LlavaShape(
        text_hidden=hidden_size,
        text_intermediate=hidden_size * 2,
        text_layers=num_layers,
        text_heads=4,
        vision_hidden=32,
        vision_intermediate=64,
        vision_layers=2,
        vision_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_feature_layer=-1,
        initializer_range=0.1,
    )


# LLaVA-1.5-7B: Vicuna-7B (Llama-2 shape) + CLIP ViT-L/14 at 336 px, 576 image tokens; for GPU benchmarks.
LLAVA_15_7B = LlavaShape(
    text_hidden=4096,
    text_intermediate=11008,
    text_layers=32,
    text_heads=32,
    vision_hidden=1024,
    vision_intermediate=4096,
    vision_layers=24,
    vision_heads=16,
    image_size=336,
    patch_size=14,
    vision_feature_layer=-2,
    min_vocab_size=32064,
    max_positions=4096,
)


def build_tiny_llava(
    out_dir: str | Path,
    vocabulary: Sequence[str],
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
) -> Path:
    """Write the tiny random-weight LLaVA checkpoint (model, tokenizer, processor) to ``out_dir``."""
    return build_random_llava(
        out_dir, vocabulary, tiny_llava_shape(hidden_size, num_layers, image_size, patch_size), seed=seed
    )


def word_level_tokenizer(
    vocabulary: Sequence[str],
    special_tokens: Sequence[str],
    *,
    pad: str,
    eos: str,
    bos: str | None = None,
    named_tokens: dict[str, str] | None = None,
) -> Any:
    """A whitespace-split word-level ``PreTrainedTokenizerFast``: ``special_tokens`` get the first ids (they
    must hold ``pad``, ``eos``, ``bos`` and ``<unk>``), then ``vocabulary``; padding on the left.

    ``named_tokens`` become tokenizer attributes the processors read (``{"image_token": "<image>"}`` gives
    ``tokenizer.image_token`` and ``tokenizer.image_token_id``); every special token that is not pad, unk,
    bos or eos is registered as an additional special token (kept whole, dropped when decoding).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*special_tokens, *vocabulary]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        unk_token=UNK_TOKEN,
        bos_token=bos,
        eos_token=eos,
        extra_special_tokens=named_tokens or {},
        padding_side="left",
    )
    markers = [t for t in special_tokens if t not in (pad, UNK_TOKEN, bos, eos)]
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    return tokenizer


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


def _save_random_model(
    model_class: Any,
    config: Any,
    processor: Any,
    out_dir: str | Path,
    *,
    seed: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> Path:
    """Initialise ``model_class(config)`` from ``seed`` (on ``device`` in ``dtype``) and save it with
    ``processor`` to ``out_dir``; generation uses the tokenizer's pad/eos/bos ids."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_random_llava(
    out_dir: str | Path,
    vocabulary: Sequence[str],
    shape: LlavaShape,
    *,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
) -> Path:
    """Write a random-weight LLaVA checkpoint of ``shape`` (model, tokenizer, processor) to ``out_dir``.

    Real transformers classes throughout: ``LlavaForConditionalGeneration`` over a Llama text model and a
    CLIP vision tower, a word-level tokenizer wrapped in ``PreTrainedTokenizerFast``, ``CLIPImageProcessor``
    and ``LlavaProcessor``. The folder loads back with ``AutoModelForImageTextToText`` / ``AutoProcessor``.
    Large shapes are best built with ``device="cuda"`` and ``dtype="bfloat16"`` (random init on the GPU).
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_level_tokenizer(
        vocabulary,
        TINY_SPECIAL_TOKENS,
        pad="<pad>",
        eos="</s>",
        bos="<s>",
        named_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    num_image_tokens = (shape.image_size // shape.patch_size) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=shape.vision_hidden,
            intermediate_size=shape.vision_intermediate,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
            projection_dim=shape.vision_hidden,
        ).to_dict(),
        text_config=LlamaConfig(
            vocab_size=max(len(tokenizer), shape.min_vocab_size),
            hidden_size=shape.text_hidden,
            intermediate_size=shape.text_intermediate,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            num_key_value_heads=shape.text_heads,
            max_position_embeddings=shape.max_positions,
            initializer_range=shape.initializer_range,
            **_text_token_ids(tokenizer),
        ).to_dict(),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=shape.vision_feature_layer,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return _save_random_model(
        LlavaForConditionalGeneration, config, processor, out_dir, seed=seed, device=device, dtype=dtype
    )


def _text_token_ids(tokenizer: Any) -> dict[str, int | None]:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _tiny_text_config(tokenizer: Any, hidden_size: int, num_layers: int, **extra: Any) -> dict[str, Any]:
    """The 4-head text model of the tiny Qwen-style models (see :class:`LlavaShape` on the init range)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "initializer_range": 0.1,
        **_text_token_ids(tokenizer),
        **extra,
    }


def build_tiny_qwen2_5_vl(
    out_dir: str | Path,
    vocabulary: Sequence[str],
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 4,
) -> Path:
    """Write a tiny random-weight Qwen2.5-VL checkpoint (model, tokenizer, processor) to ``out_dir``.

    ``Qwen2_5_VLForConditionalGeneration`` with Qwen2.5-VL's own vision transformer (window attention,
    2x2 patch merger) and multimodal rotary positions, ``Qwen2VLImageProcessor`` (PIL backend; every image
    resized to ``image_size``² pixels: ``(image_size / patch_size / 2)²`` image tokens) and
    ``Qwen2_5_VLProcessor`` with Qwen2.5-VL-Instruct's chat template.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    named = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    }
    tokenizer = word_level_tokenizer(
        vocabulary, QWEN2_5_VL_SPECIAL_TOKENS, pad="<|endoftext|>", eos="<|im_end|>", named_tokens=named
    )
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )
    processor = image_only_processor_class(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_5_VL_CHAT_TEMPLATE
    )
    half_head = hidden_size // 4 // 2  # multimodal rotary sections (time, height, width) split head_dim / 2
    section = half_head * 3 // 8
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [half_head - 2 * section, section, section],
    }
    config = Qwen2_5_VLConfig(
        text_config=_tiny_text_config(tokenizer, hidden_size, num_layers, rope_parameters=rope),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": image_size,
            "fullatt_block_indexes": [1],
            "out_hidden_size": hidden_size,
        },
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.vision_start_token_id,
        vision_end_token_id=tokenizer.vision_end_token_id,
    )
    return _save_random_model(Qwen2_5_VLForConditionalGeneration, config, processor, out_dir, seed=seed)


def build_tiny_internvl(
    out_dir: str | Path,
    vocabulary: Sequence[str],
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 4,
) -> Path:
    """Write a tiny random-weight InternVL checkpoint (model, tokenizer, processor) to ``out_dir``.

    The transformers-native ``InternVLForConditionalGeneration`` (InternViT vision tower, pixel-shuffle
    downsampling by 2, MLP projector, Qwen2 text model), ``GotOcr2ImageProcessor`` (PIL backend; one
    ``image_size`` tile per image: ``(image_size / patch_size / 2)²`` image tokens) and ``InternVLProcessor``
    with InternVL's chat template.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    named = {
        "context_image_token": "<IMG_CONTEXT>",
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "video_token": "<video>",
    }
    tokenizer = word_level_tokenizer(
        vocabulary, INTERNVL_SPECIAL_TOKENS, pad="<|endoftext|>", eos="<|im_end|>", named_tokens=named
    )
    image_seq_length = (image_size // patch_size // 2) ** 2
    # Dynamic tiling (crop_to_patches) stays on, as in InternVL, capped at one tile: one tile per image.
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=True, min_patches=1, max_patches=1
    )
    processor = image_only_processor_class(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    config = InternVLConfig(
        text_config=_tiny_text_config(tokenizer, hidden_size, num_layers, model_type="qwen2"),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [image_size, image_size],
            "patch_size": [patch_size, patch_size],
        },
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
    )
    return _save_random_model(InternVLForConditionalGeneration, config, processor, out_dir, seed=seed)


def _builtin_cache_dir() -> Path:
    root = os.environ.get("MCL_CACHE_DIR") or Path.home() / ".cache" / "mcl"
    return Path(root) / "models"


def _builtin_builder(name: str) -> tuple[Callable[[Path, list[str]], Path], list[str]]:
    """The builder and vocabulary of a built-in model (looked up at call time: tests replace them)."""
    builders = {
        "tiny-llava": (build_tiny_llava, tiny_llava_vocabulary()),
        "tiny-qwen2.5-vl": (build_tiny_qwen2_5_vl, tiny_vocabulary(QWEN2_5_VL_TEMPLATE_WORDS)),
        "tiny-internvl": (build_tiny_internvl, tiny_vocabulary(INTERNVL_TEMPLATE_WORDS)),
    }
    return builders[name]


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Turn a config's ``model.name`` into something ``from_pretrained`` accepts.

    Built-in names are built once into the cache (keyed by a hash of their vocabulary); an existing local
    folder is returned as an absolute path; an ``org/name`` hub id is returned unchanged. Anything else is
    an error listing the valid forms.
    """
    if name_or_path in BUILTIN_MODELS:
        build, vocabulary = _builtin_builder(name_or_path)
        key = hashlib.sha256(json.dumps([TINY_BUILD_VERSION, vocabulary]).encode()).hexdigest()[:12]
        folder = Path(cache_dir) if cache_dir else _builtin_cache_dir()
        target = folder / f"{name_or_path}-{key}"
        if not (target / "config.json").exists():
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            build(tmp, vocabulary)
            try:
                tmp.rename(target)
            except OSError:  # another process built it first
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
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
    path: str, *, trust_remote_code: bool = False, dtype: str = "float32"
) -> tuple[torch.nn.Module, Any]:
    """Load an image-text-to-text model (``AutoModelForImageTextToText``) and its processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    processor = load_processor(path, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        path, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype)
    )
    return model, processor
