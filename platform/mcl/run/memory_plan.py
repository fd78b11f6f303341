"""The memory plan: per-worker memory of a run, estimated from the model's config alone (no weights, no Ray).

:func:`model_dims` counts a model's parameters on the meta device (nothing allocated) and reads the
dimensions the activations depend on; :func:`plan_memory` turns them and the run's config into a
:class:`MemoryPlan` (bytes per worker: weights, gradients, optimizer states, activations, logits; host memory
for offloaded state; the device memory it is compared with); :func:`format_plan` prints it and
:meth:`MemoryPlan.flat` gives it to MLflow. :func:`measure_seq_len` finds the sequence length from the stream's
training rows (tokenized with the model's chat template, image tokens included).

The plan covers the base LoRA recipe: LoRA on ``model.lora.target_modules`` (or the family default) plus the
projector when ``model.lora.train_projector``. Methods that train more (MR-LoRA's router, UNIFIER's branches)
or keep a teacher (LwF, QUAD) need more than it says. Not counted: the CUDA context, allocator
fragmentation, DeepSpeed's communication buckets, ZeRO-3's gathered layers: the plan compares its total with
``1 - RESERVED_FRACTION`` of the device memory.

Rules, per worker, N workers, ZeRO stage Z (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", sec. 3 and 5):

- weights in the model's dtype: the base model, the LoRA matrices and peft's copy of the trained projector
  (``modules_to_save``); ZeRO-3 partitions them (/N), ``scaling.offload=optimizer_and_params`` moves them to
  host memory;
- gradients of the trainable parameters in the model's dtype; /N from ZeRO-2;
- Adam states: with DeepSpeed in 16-bit, an fp32 master copy plus m and v, 12 bytes a trainable parameter
  (ZeRO paper, sec. 3.1: "K = 12"); otherwise m and v in the parameters' dtype (8 bytes in fp32); /N from
  ZeRO-1; ``scaling.offload`` moves them to host memory;
- activations of one micro-batch of b rows of s tokens per language-model layer, hidden h, a heads,
  intermediate i (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  sec. 4.1, eq. 1: ``s*b*h*(34 + 5*a*s/h)`` bytes at 16-bit for GPT's 4h MLP with dropout): attention
  ``10*s*b*h``, two norms ``4*s*b*h``, the MLP ``2*s*b*h + 4*s*b*i`` (``8*s*b*i`` gated, SwiGLU), no dropout
  masks (these models train without dropout), plus ``5*a*s*s*b`` for eager attention (sdpa and flash
  attention keep no score matrix). fp32 doubles it. With ``train.gradient_checkpointing`` only each layer's
  input is kept (``2*s*b*h``) plus one layer's full activations during its recomputation;
- the vision tower: frozen under LoRA it keeps nothing for the backward pass but its output features (the
  projector's input); when LoRA targets it, its layers count as the language model's do (not checkpointed);
- logits and loss: ``s*b*V`` logits in the model's dtype plus the fp32 copy ``mcl.worker.losses.per_sample_loss``
  makes (``.float()`` on the shifted logits, contiguous for the cross-entropy), the fp32 log-softmax the
  cross-entropy keeps, and its fp32 gradient in the backward pass: ``(dtype bytes + 12)*s*b*V``.

Checked (``tests/engine/test_memory_plan.py``): for a 65 M-parameter LLaVA trained with LoRA on CPU the plan
is 0.93 of the measured peak RSS growth; for Qwen-VL-Chat LoRA at batch 1 (QwenLM/Qwen-VL README, one A100
80 GB) it is 0.85 of the published 23.3 G at 384 tokens and 0.87 of 27.3 G at 2048 tokens (read as GiB).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcl.config import ExperimentConfig
    from mcl.run.prepare import PreparedRun
    from mcl.streams.samples import Sample

GIB = 1024**3
RESERVED_FRACTION = 0.1  # of the device memory: CUDA context, fragmentation, buffers the plan does not count
DEFAULT_TEXT_TOKENS = 512  # text tokens per row when the stream's rows or the processor cannot be read
DEFAULT_IMAGE_SIDE = 448  # image side (px) assumed for dynamic-resolution models (Qwen2.5-VL) without images
SEQ_SAMPLE_ROWS = 256  # training rows tokenized to measure the sequence length
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelDims:
    """What the plan needs to know about a model: parameter counts and the dimensions activations scale with.

    Attributes:
        params: Parameters of the base model (all of them, frozen or not).
        lora_params: Parameters the LoRA adapter adds: ``r * (in + out)`` for every targeted linear layer.
        projector_params: Parameters of the projector trained beside LoRA (0 when it is not trained).
        text_hidden, text_intermediate, text_heads, text_layers, vocab_size: The language model.
        vision_hidden, vision_intermediate, vision_heads, vision_layers: The vision tower.
        vision_patches: Tokens the vision tower sees per image.
        image_tokens: Tokens one image becomes in the language model's sequence.
        gated_mlp: The language model's MLP is gated (SwiGLU: three projections).
        vision_trained: LoRA targets modules of the vision tower.
    """

    params: int
    lora_params: int
    projector_params: int
    text_hidden: int
    text_intermediate: int
    text_heads: int
    text_layers: int
    vocab_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    vision_layers: int
    vision_patches: int
    image_tokens: int
    gated_mlp: bool = True
    vision_trained: bool = False

    @property
    def trainable(self) -> int:
        """Parameters the optimizer steps."""
        return self.lora_params + self.projector_params


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated memory of one worker, in bytes. ``fits`` is None when the device memory is unknown."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    host: int
    device_memory: int
    device: str
    params: int
    trainable: int
    seq_len: int
    seq_source: str
    micro_batch: int
    setup: str

    @property
    def total(self) -> int:
        """Device bytes: everything but the offloaded state."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def usable(self) -> int:
        """The part of the device memory the plan may fill (``1 - RESERVED_FRACTION``)."""
        return int(self.device_memory * (1 - RESERVED_FRACTION))

    @property
    def fits(self) -> bool | None:
        return None if not self.device_memory else self.total <= self.usable

    def flat(self) -> dict[str, Any]:
        """``plan.*`` params for MLflow: GiB with two decimals, counts, the setup and the verdict."""
        out: dict[str, Any] = {f"plan.{k}_gib": round(v / GIB, 2) for k, v in self._sizes().items()}
        out.update({f"plan.{k}": v for k, v in asdict(self).items() if k not in self._sizes()})
        out["plan.fits"] = self.fits
        return out

    def _sizes(self) -> dict[str, int]:
        parts = ("weights", "gradients", "optimizer", "activations", "logits", "host", "device_memory")
        return {**{k: getattr(self, k) for k in parts}, "total": self.total}


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a small aligned table (GiB, one decimal) with a verdict line."""
    rows = [
        (f"weights ({_count(plan.params)} params)", plan.weights),
        (f"gradients ({_count(plan.trainable)} trainable params)", plan.gradients),
        ("optimizer states (Adam)", plan.optimizer),
        (f"activations (micro-batch {plan.micro_batch} x {plan.seq_len} tokens)", plan.activations),
        ("logits + fp32 loss", plan.logits),
        ("total on the device", plan.total),
        ("host memory (offloaded state)", plan.host),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"memory plan per worker: {plan.setup}", f"  sequence length: {plan.seq_source}"]
    lines += [f"  {name:<{width}}  {size / GIB:7.1f} GiB" for name, size in rows]
    if plan.fits is None:
        lines.append(f"  device memory unknown ({plan.device}): set scaling.device_memory_gb to compare")
    else:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(
            f"  {verdict}: {plan.total / GIB:.1f} GiB of {plan.usable / GIB:.1f} GiB usable "
            f"({1 - RESERVED_FRACTION:.0%} of {plan.device_memory / GIB:.1f} GiB, {plan.device})"
        )
    return "\n".join(lines)


# -- model dimensions from a transformers config


def model_dims(config: Any, lora: Any, image_size: tuple[int, int] | None = None) -> ModelDims:
    """The :class:`ModelDims` of a transformers image-text-to-text ``config`` under ``lora``
    (:class:`mcl.config.LoraConfig`), built on the meta device: no weights are allocated or read."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text, vision = config.get_text_config(), config.vision_config
    patches, image_tokens = image_token_counts(config, image_size)
    lora_params, vision_trained = _lora_params(model, lora)
    return ModelDims(
        params=sum(p.numel() for p in model.parameters()),
        lora_params=lora_params,
        projector_params=_projector_params(model) if lora.train_projector else 0,
        text_hidden=text.hidden_size,
        text_intermediate=text.intermediate_size,
        text_heads=text.num_attention_heads,
        text_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size,
        vision_heads=_first_attr(vision, "num_attention_heads", "num_heads"),
        vision_layers=_first_attr(vision, "num_hidden_layers", "depth"),
        vision_patches=patches,
        image_tokens=image_tokens,
        gated_mlp=getattr(text, "hidden_act", "silu") in ("silu", "swiglu"),
        vision_trained=vision_trained,
    )


def _first_attr(obj: Any, *names: str) -> int:
    for name in names:
        if getattr(obj, name, None) is not None:
            return int(getattr(obj, name))
    raise ValueError(f"{type(obj).__name__} has none of {', '.join(names)}")


def _lora_params(model: Any, lora: Any) -> tuple[int, bool]:
    """Parameters LoRA adds (peft matches a string target by ``re.fullmatch`` on module names) and whether it
    targets the vision tower."""
    import torch

    from mcl.adapters import lora_target_modules, vision_tower

    pattern = re.compile(lora_target_modules(model, lora))
    tower, _ = vision_tower(model)
    total, in_tower = 0, False
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
            total += lora.r * (module.in_features + module.out_features)
            in_tower = in_tower or name.startswith(tower + ".")
    return total, in_tower


def _projector_params(model: Any) -> int:
    from mcl.adapters import projector_modules

    return sum(p.numel() for _, m in projector_modules(model) for p in m.parameters())


def image_token_counts(
    config: Any, image_size: tuple[int, int] | None = None, pixels: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(tokens the vision tower sees, tokens the language model sees) for one image of ``image_size``
    (height, width; needed only by dynamic-resolution models such as Qwen2.5-VL, default
    ``DEFAULT_IMAGE_SIDE`` square, resized as its processor does between ``pixels`` = (min, max) pixels,
    default the processor's defaults)."""
    vision = config.vision_config
    merge = getattr(vision, "spatial_merge_size", None)
    if merge:  # Qwen2-VL / Qwen2.5-VL: patches of the resized image, merged merge x merge
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        patch = vision.patch_size
        height, width = image_size or (DEFAULT_IMAGE_SIDE, DEFAULT_IMAGE_SIDE)
        bounds = {"min_pixels": pixels[0], "max_pixels": pixels[1]} if pixels else {}
        h, w = smart_resize(height, width, factor=patch * merge, **bounds)
        patches = (h // patch) * (w // patch)
        return patches, patches // merge**2
    side, patch = vision.image_size, vision.patch_size
    side = side[0] if isinstance(side, list | tuple) else side
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    patches = (side // patch) ** 2
    return patches, int(getattr(config, "image_seq_length", 0) or patches)


# -- the plan


def plan_memory(
    cfg: ExperimentConfig,
    model: ModelDims | Any,
    seq_len: int,
    *,
    seq_source: str = "",
    images_per_row: int = 1,
    device: tuple[int, str] | None = None,
) -> MemoryPlan:
    """The per-worker :class:`MemoryPlan` of ``cfg`` for ``model`` (a :class:`ModelDims` or a transformers
    config) at ``seq_len`` tokens a row (image tokens included) and ``cfg.micro_batch`` rows a micro-batch.

    ``device`` is (bytes, description) of the memory to compare with; default :func:`device_memory`.
    """
    dims = model if isinstance(model, ModelDims) else model_dims(model, cfg.model.lora)
    state = _state_bytes(cfg, dims)
    acts, logits = _activation_bytes(cfg, dims, seq_len, images_per_row)
    memory, name = device if device is not None else device_memory(cfg)
    return MemoryPlan(
        weights=state["weights"],
        gradients=state["gradients"],
        optimizer=state["optimizer"],
        activations=acts,
        logits=logits,
        host=state["host"],
        device_memory=memory,
        device=name,
        params=dims.params,
        trainable=dims.trainable,
        seq_len=seq_len,
        seq_source=seq_source or f"{seq_len} tokens (given)",
        micro_batch=cfg.micro_batch,
        setup=_setup_text(cfg),
    )


def _setup_text(cfg: ExperimentConfig) -> str:
    s = cfg.scaling
    zero = f"DeepSpeed ZeRO-{s.zero_stage}" if s.deepspeed else "torch (DDP)"
    ckpt = "on" if cfg.train.gradient_checkpointing else "off"
    return (
        f"{zero} over {s.num_workers} worker(s), offload {s.offload}, {cfg.model.dtype}, "
        f"{cfg.model.attn_implementation} attention, gradient checkpointing {ckpt}"
    )


def _state_bytes(cfg: ExperimentConfig, dims: ModelDims) -> dict[str, int]:
    """Weights, gradients and optimizer states on the device and what ``scaling.offload`` moves to the host."""
    s, elem = cfg.scaling, _DTYPE_BYTES[cfg.model.dtype]
    zero, n = (s.zero_stage if s.deepspeed else 0), s.num_workers
    weights = (dims.params + dims.trainable) * elem / (n if zero >= 3 else 1)
    gradients = dims.trainable * elem / (n if zero >= 2 else 1)
    adam_bytes = 12 if s.deepspeed and elem == 2 else 2 * elem
    optimizer = dims.trainable * adam_bytes / (n if zero >= 1 else 1)
    host = 0.0
    if s.offload != "none":
        host, optimizer = optimizer, 0.0
    if s.offload == "optimizer_and_params":
        host, weights = host + weights, 0.0
    return {
        k: int(v)
        for k, v in dict(weights=weights, gradients=gradients, optimizer=optimizer, host=host).items()
    }


def layer_activation_bytes(
    tokens: int, seq: int, hidden: int, intermediate: int, heads: int, *, gated: bool, eager: bool, elem: int
) -> float:
    """Bytes one transformer layer keeps for the backward pass over ``tokens`` tokens (micro-batch x ``seq``):
    Korthikanti et al. 2022, eq. 1, with the MLP term for the model's intermediate size (see module doc)."""
    mlp = 2 * hidden + (8 if gated else 4) * intermediate
    per_token = 10 * hidden + 4 * hidden + mlp + (5 * heads * seq if eager else 0)
    return tokens * per_token * elem / 2


def _activation_bytes(
    cfg: ExperimentConfig, dims: ModelDims, seq: int, images_per_row: int
) -> tuple[int, int]:
    """(activations, logits + loss) of one micro-batch."""
    b, elem = cfg.micro_batch, _DTYPE_BYTES[cfg.model.dtype]
    eager = cfg.model.attn_implementation == "eager"
    tokens = b * seq
    layer = layer_activation_bytes(
        tokens,
        seq,
        dims.text_hidden,
        dims.text_intermediate,
        dims.text_heads,
        gated=dims.gated_mlp,
        eager=eager,
        elem=elem,
    )
    if cfg.train.gradient_checkpointing:
        text = dims.text_layers * tokens * dims.text_hidden * elem + layer
    else:
        text = dims.text_layers * layer
    patches = b * images_per_row * dims.vision_patches
    vision = patches * dims.vision_hidden * elem  # the projector's input
    if dims.vision_trained:
        vision += dims.vision_layers * layer_activation_bytes(
            patches,
            dims.vision_patches,
            dims.vision_hidden,
            dims.vision_intermediate,
            dims.vision_heads,
            gated=False,
            eager=eager,
            elem=elem,
        )
    logits = tokens * dims.vocab_size * (elem + 12)
    return int(text + vision), int(logits)


def device_memory(cfg: ExperimentConfig) -> tuple[int, str]:
    """(bytes, description) of one worker's device memory: ``scaling.device_memory_gb`` when set; else GPU 0
    when ``scaling.use_gpu`` and the driver sees one; else, for CPU runs, host RAM / ``scaling.num_workers``;
    (0, why) when it cannot be known here (a GPU run planned on a machine without a GPU)."""
    s = cfg.scaling
    if s.device_memory_gb > 0:
        return int(s.device_memory_gb * GIB), "scaling.device_memory_gb"
    if s.use_gpu:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), f"GPU 0: {props.name}"
        return 0, "no GPU visible here"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // s.num_workers, f"host RAM / {s.num_workers} worker(s)"


# -- the sequence length


@dataclass(frozen=True)
class SeqLength:
    """The tokens per row the plan uses (the longest sampled row) and how they were found."""

    tokens: int
    source: str


def default_seq_len(config: Any, why: str) -> SeqLength:
    """``DEFAULT_TEXT_TOKENS`` text tokens plus one image's tokens, with ``why`` the rows were not measured."""
    _, image = image_token_counts(config)
    total = DEFAULT_TEXT_TOKENS + image
    return SeqLength(total, f"{total} tokens, assumed ({DEFAULT_TEXT_TOKENS} text + {image} image): {why}")


def measure_seq_len(
    samples: Sequence[Sample], model_path: str, config: Any, trust_remote_code: bool = False
) -> SeqLength:
    """The longest (and p95) token length of up to ``SEQ_SAMPLE_ROWS`` evenly spaced training ``samples``:
    the chat-template prompt, the answer and EOS, as :class:`mcl.data.Preprocessor` builds them, each image
    placeholder counted as the image's tokens. Falls back to :func:`default_seq_len` without a processor."""
    from mcl.data import build_prompt
    from mcl.models import load_processor

    if not samples:
        return default_seq_len(config, "no training rows")
    try:
        processor = load_processor(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        return default_seq_len(config, f"no processor at {model_path} ({type(exc).__name__})")
    tokenizer = processor.tokenizer
    image_id = getattr(tokenizer, "image_token_id", None) or getattr(config, "image_token_id", None)
    pixels = _pixel_bounds(processor)
    step = max(1, len(samples) // SEQ_SAMPLE_ROWS)
    lengths = []
    for i in range(0, min(len(samples), step * SEQ_SAMPLE_ROWS), step):
        sample = samples[i]
        prompt = build_prompt(processor, sample.question)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + sample.answer, add_special_tokens=False)["input_ids"]
        n_images = max(1, ids.count(image_id)) if image_id is not None else 1
        _, per_image = image_token_counts(config, _image_size(sample.image), pixels)
        lengths.append(len(ids) - n_images + n_images * per_image + len(answer) + 1)
    lengths.sort()
    p95 = lengths[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)]
    return SeqLength(
        lengths[-1],
        f"{lengths[-1]} tokens, the longest of {len(lengths)} training rows (p95 {p95}, image tokens included)",
    )


def _pixel_bounds(processor: Any) -> tuple[int, int] | None:
    """(min, max) pixels a dynamic-resolution image processor resizes into (Qwen2-VL's ``size``)."""
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    low, high = getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None)
    if isinstance(size, dict):
        low, high = size.get("shortest_edge"), size.get("longest_edge")
    return (int(low), int(high)) if low and high else None


def _image_size(path: str) -> tuple[int, int] | None:
    """(height, width) from the image file's header; None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, ValueError):
        return None


def plan_run(cfg: ExperimentConfig, model_path: str, samples: Sequence[Sample] | None) -> MemoryPlan:
    """The plan of a run of ``cfg`` on the model at ``model_path`` (its config.json only), the sequence length
    measured on ``samples`` (the stream's training rows) when given, else assumed (see
    :func:`default_seq_len`)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    if samples is None:
        seq = default_seq_len(config, "the stream's training rows are not readable here")
    else:
        seq = measure_seq_len(samples, model_path, config, cfg.model.trust_remote_code)
    return plan_memory(cfg, model_dims(config, cfg.model.lora), seq.tokens, seq_source=seq.source)


def plan_prepared(prep: PreparedRun, log: Callable[[str], None] = print) -> MemoryPlan | None:
    """The plan of a prepared run, printed with ``log``, plus a ``warning:`` line when it does not fit; None
    (and a line saying why) when the model's config cannot be planned (e.g. remote code of no known family)."""
    from mcl.streams.store import ChainedSamples

    samples = ChainedSamples([task.train for task in prep.stream.tasks])
    return _logged_plan(prep.config, prep.model_path, samples, log)


def plan_config(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> MemoryPlan | None:
    """The plan of ``cfg`` without preparing the run (``jobs/run_stream.py --plan``): the model's config is
    required, the stream's training rows are used when they can be read (else the sequence length is
    assumed, and the output says so)."""
    from mcl.errors import MclError
    from mcl.models import resolve_model_path
    from mcl.run.prepare import check_image_text_model
    from mcl.streams import build_stream
    from mcl.streams.store import ChainedSamples

    model_path = resolve_model_path(cfg.model.name)
    check_image_text_model(model_path, cfg.model.trust_remote_code)
    samples: Sequence[Sample] | None
    try:
        stream = build_stream(cfg.stream.name, cfg.stream.root, cfg.stream.options)
        samples = ChainedSamples([task.train for task in stream.tasks])
    except MclError as exc:
        log(f"stream {cfg.stream.name!r} not readable here ({exc}); the sequence length is assumed")
        samples = None
    return _logged_plan(cfg, model_path, samples, log)


def _logged_plan(
    cfg: ExperimentConfig, model_path: str, samples: Sequence[Sample] | None, log: Callable[[str], None]
) -> MemoryPlan | None:
    from mcl.errors import MclError

    try:
        plan = plan_run(cfg, model_path, samples)
    except (
        MclError,
        ValueError,
        TypeError,
        OSError,
        KeyError,
        AttributeError,
        ImportError,
        RuntimeError,
    ) as exc:
        log(f"memory plan unavailable for {model_path}: {type(exc).__name__}: {exc}")
        return None
    log(format_plan(plan))
    if plan.fits is False:
        log(
            f"warning: the memory plan needs {plan.total / GIB:.1f} GiB per worker and {plan.device} leaves "
            f"{plan.usable / GIB:.1f} GiB usable: this run will likely run out of memory (raise "
            "scaling.num_workers or zero_stage, set scaling.offload, train.gradient_checkpointing, or lower "
            "train.micro_batch_size)"
        )
    return plan
