"""Every check before compute: method, model, stream, annotations, images, and an earlier run's folder."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcl.config import ExperimentConfig, save_config
from mcl.errors import ConfigError, DataError, UnknownNameError
from mcl.methods_api import Method, build_method
from mcl.models import resolve_model_path
from mcl.run.rundir import RunDir
from mcl.streams import Stream, TaskData, build_stream
from mcl.streams.check import DataReport, read_clean_stream
from mcl.streams.formats import check_images
from mcl.streams.probes import load_probes
from mcl.streams.store import ChainedSamples

# Settings that may change between an interrupted run and its resumption (where and how it runs).
RESUMABLE_CHANGES = (
    "scaling.ray_address",
    "scaling.ray_num_cpus",
    "scaling.max_failures",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every",
)


@dataclass
class PreparedRun:
    """A validated run: nothing here has trained yet."""

    config: ExperimentConfig
    method: Method
    model_path: str
    stream: Stream
    data_report: DataReport | None = None  # with stream.skip_bad_samples: the samples left out
    probes: list[TaskData] = field(default_factory=list)  # stream.probes: evaluation-only tasks
    manifest_sha256: str = ""  # with stream.manifest: the hash of the manifest the data was checked against

    @property
    def probe_names(self) -> list[str]:
        return [p.name for p in self.probes]


def prepare_run(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> PreparedRun:
    """Validate names, data and images; build the tiny model if asked. Raises on any problem.

    With ``stream.skip_bad_samples``, bad samples (see :mod:`mcl.streams.check`) are left out instead, with a
    count per task and split printed; only problems of whole files or folders still raise.
    """
    method = build_method(cfg.method.name, cfg.method.params)
    model_path = resolve_model_path(cfg.model.name)
    check_image_text_model(model_path, cfg.model.trust_remote_code)
    check_kernels(cfg, log)
    check_eval_answer_types(cfg)
    stream, report = _read_stream(cfg, log)
    manifest_hash = _check_manifest(cfg, log)
    _check_answer_types(stream)
    _check_eval_samples(stream, cfg)
    probes = load_probes(cfg.stream.probes, cfg.eval.max_samples_per_task)
    _check_answer_types(Stream("probes", probes))
    if cfg.stream.check_images and report is None:
        check_images(ChainedSamples([split for t in stream.tasks for split in (t.train, t.test)]))
    if cfg.stream.check_images and probes:
        check_images(ChainedSamples([p.test for p in probes]))
    counts = ", ".join(f"{t.name} {len(t.train)}/{len(t.test)}" for t in stream.tasks)
    log(f"stream {stream.name!r}: {len(stream.tasks)} tasks (train/test: {counts})")
    if probes:
        log("probes: " + ", ".join(f"{p.name} {len(p.test)}" for p in probes))
    return PreparedRun(cfg, method, model_path, stream, report, probes=probes, manifest_sha256=manifest_hash)


def _check_manifest(cfg: ExperimentConfig, log: Callable[[str], None]) -> str:
    """With ``stream.manifest``, the data under ``stream.root`` checked against it (after the stream was read,
    so that a generated stream exists); returns the manifest's sha256 ("" without one)."""
    if not cfg.stream.manifest:
        return ""
    from mcl.streams.manifest import check_manifest

    return check_manifest(cfg.stream.root, cfg.stream.manifest, log=log)


def _read_stream(cfg: ExperimentConfig, log: Callable[[str], None]) -> tuple[Stream, DataReport | None]:
    """The stream (bad samples left out with ``stream.skip_bad_samples``), in ``stream.task_order``."""
    stream, report = _read_clean(cfg, log)
    return stream.reordered(cfg.stream.task_order), report


def _read_clean(cfg: ExperimentConfig, log: Callable[[str], None]) -> tuple[Stream, DataReport | None]:
    if not cfg.stream.skip_bad_samples:
        return build_stream(cfg.stream.name, cfg.stream.root, cfg.stream.options), None
    stream, report = read_clean_stream(
        cfg.stream.name, cfg.stream.root, cfg.stream.options, images=cfg.stream.check_images
    )
    skipped = [
        f"{s.task}/{s.split} {s.skipped} ({', '.join(f'{k} {n}' for k, n in s.problems.items())})"
        for s in report.splits
        if s.skipped
    ]
    log(f"stream.skip_bad_samples: left out {report.skipped} bad samples {'; '.join(skipped)}".rstrip())
    return stream, report


def _check_answer_types(stream: Stream) -> None:
    from mcl.evaluation.scoring import SCORERS

    for task in stream.tasks:
        for sample in task.test:
            if sample.answer_type not in SCORERS:
                raise DataError(
                    f"task {task.name!r} sample {sample.id!r}: unknown answer_type {sample.answer_type!r}; "
                    f"valid types: {', '.join(sorted(SCORERS))}"
                )


def check_eval_answer_types(cfg: ExperimentConfig) -> None:
    """Every answer type named by ``eval.max_new_tokens_by_type`` / ``eval.stop_strings_by_type`` has a
    scorer (:data:`mcl.evaluation.scoring.SCORERS`); raises :class:`ConfigError` naming the field."""
    from mcl.evaluation.scoring import SCORERS

    for name in ("max_new_tokens_by_type", "stop_strings_by_type"):
        for kind in getattr(cfg.eval, name):
            if kind not in SCORERS:
                raise ConfigError(
                    f"eval.{name}.{kind}: unknown answer type {kind!r}; valid types: {', '.join(sorted(SCORERS))}"
                )


def _check_eval_samples(stream: Stream, cfg: ExperimentConfig) -> None:
    for task in stream.tasks:
        n_eval = min(len(task.test), cfg.eval.max_samples_per_task or len(task.test))
        if n_eval < cfg.scaling.num_workers:
            raise DataError(
                f"task {task.name!r} has {n_eval} test samples for {cfg.scaling.num_workers} workers; "
                "every worker needs at least one"
            )


def check_image_text_model(model_path: str, trust_remote_code: bool) -> None:
    """Fail early (before any run exists) if the model's config cannot be read or is not image-text-to-text."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UnknownNameError(f"model {model_path!r} cannot be loaded: {exc}") from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not trust_remote_code:
        raise UnknownNameError(
            f"model {model_path!r} is a {config.model_type!r} model, not an image-text-to-text one "
            "(AutoModelForImageTextToText cannot load it)"
        )


def run_name(cfg: ExperimentConfig) -> str:
    """``tracking.run_name``, or ``<method>-<stream>-<time>`` when it is empty."""
    return cfg.tracking.run_name or f"{cfg.method.name}-{cfg.stream.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_run_dir(prep: PreparedRun, name: str, resume: bool) -> tuple[RunDir, bool]:
    """The run folder ``<tracking.output_dir>/<name>`` with the run's config saved in it, and whether it held
    an earlier attempt. An earlier attempt is refused without ``resume``, and with a different config."""
    cfg = prep.config
    run_dir = RunDir((Path(cfg.tracking.output_dir) / name).resolve())
    existing = run_dir.holds_a_run()
    if existing and not resume:
        # Ray Train would restore from the old run's phase folders; refuse instead of mixing two runs.
        raise ConfigError(
            f"tracking.run_name: {run_dir.path} already holds a run; pick another run_name or resume it"
        )
    if existing and run_dir.config_file.exists():
        check_resumable(cfg, run_dir, prep.model_path)
    run_dir.create()
    save_config(cfg, run_dir.config_file)
    return run_dir, existing


def check_resumable(cfg: ExperimentConfig, run_dir: RunDir, model_path: str) -> None:
    """Refuse to resume ``run_dir`` with a config that differs from its saved one (but where it runs)."""
    from mcl.config import changed_fields, load_config

    saved, current = load_config(run_dir.config_file).flat(), cfg.flat()
    # Compare the LoRA targets that take effect: "" (the family default, since 2026-12-02) equals the regex a
    # run saved before then spelled out, when that regex is the model family's default.
    key = "model.lora.target_modules"
    if "" in (saved.get(key), current.get(key)):
        default = _family_lora_targets(model_path)
        for flat in (saved, current):
            if flat.get(key) == "" and default is not None:
                flat[key] = default
    changed = changed_fields(saved, current, RESUMABLE_CHANGES)
    if changed:
        diff = "; ".join(changed[:8])
        raise ConfigError(
            f"tracking.run_name: {run_dir.path} holds a run with a different config ({diff}); "
            "resume it with the same config or pick another run_name"
        )


def _family_lora_targets(model_path: str) -> str | None:
    """The default LoRA targets of the model family at ``model_path`` (None if the family or config is unknown)."""
    from mcl.models import model_family

    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(model_path).model_type
    except (OSError, ValueError):
        return None
    family = model_family(model_type)
    return family.lora_targets if family is not None else None


def check_kernels(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> None:
    """Fail before any run exists when a kernel the config asks for cannot run: flash attention without GPUs
    or without ``flash-attn``, or ZeRO offload where DeepSpeed's CPU Adam cannot be built. Checked where this
    driver is the same kind of machine as the workers (a CPU run, or a driver that sees a GPU); otherwise the
    workers stop with the same message when they build the model."""
    import importlib.util

    if cfg.model.attn_implementation == "flash_attention_2":
        if not cfg.scaling.use_gpu:
            raise ConfigError(
                "model.attn_implementation: flash_attention_2 needs GPUs (scaling.use_gpu=true)"
            )
        if _driver_like_workers(cfg) and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "model.attn_implementation: flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn); or use sdpa"
            )
    if cfg.scaling.offload != "none" and _driver_like_workers(cfg):
        log("scaling.offload: building DeepSpeed's CPU Adam (the first time takes about a minute)")
        try:
            cpu_adam_op(cfg.scaling.use_gpu)
        except Exception as exc:  # the op's JIT build: no compiler, no ninja, an unsupported CPU
            raise ConfigError(
                f"scaling.offload: {cfg.scaling.offload} needs DeepSpeed's CPU Adam, which cannot be built here "
                f"({type(exc).__name__}: {exc}); set scaling.offload=none or install a C++ compiler and ninja"
            ) from None


def _driver_like_workers(cfg: ExperimentConfig) -> bool:
    if not cfg.scaling.use_gpu:
        return True
    import torch

    return torch.cuda.is_available()


def cpu_adam_op(use_gpu: bool) -> Any:
    """Build (or load the cached build of) DeepSpeed's CPU Adam op for this machine's accelerator."""
    import os

    from mcl.worker.engine import use_interpreter_ninja

    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    use_interpreter_ninja()  # the workers' ninja: one build for driver and workers
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    if builder is None or not builder.is_compatible():
        raise RuntimeError(
            f"DeepSpeed's CPUAdamBuilder is not compatible with {get_accelerator().device_name()}"
        )
    return builder.load()
