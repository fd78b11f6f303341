"""Training throughput of mcl's full path (Ray Train + DeepSpeed + Ray Data) against a bare PyTorch loop.

Usage:
    python jobs/benchmark.py                               # default config, 1 worker x 2 CPUs, 120 steps
    python jobs/benchmark.py --out bench.json              # also write the figures as JSON
    python jobs/benchmark.py --config my.yaml model.dtype=bfloat16 scaling.cpus_per_worker=8
    python jobs/benchmark.py --no-routing                  # skip MR-LoRA's routed-inference figures

Both paths train task 0 of the stream on the same rows in the same order, with the same model (dtype, and
LoRA set up by the method exactly as mcl.worker.recipe does), the same global batch and the same core count:

  full  what mcl.run.run_experiment runs, for task 0 alone: one TorchTrainer (mcl.run.executors.ray_train.fit_phases) whose worker
        streams its shard from Ray Data (images decoded and tokenised on the fly, on the same machine),
        trains under DeepSpeed ZeRO, evaluates and saves a checkpoint. Ray gives each worker
        OMP_NUM_THREADS = scaling.cpus_per_worker.
  bare  one process: the same rows preprocessed up front with mcl.data.Preprocessor, then forward,
        per_sample_loss, backward, gradient clipping, torch.optim.AdamW step, with
        torch.set_num_threads(scaling.num_workers * scaling.cpus_per_worker).

Steady-state rates exclude each path's first 2 steps; one-off start-up (Ray init, planning the phase, worker
start, model load, DeepSpeed init) is reported separately. ``plan_s`` times only planning the phase (its
training rows and job): the Ray datasets are built inside mcl.run.executors.ray_train.fit_phases (one Ray Train job per
run), so their cost is part of ``fit_wall_s`` and ``fit_overhead_s``; before 2026-12-02 they were built
ahead of the fit and timed as ``datasets_s``. Evaluation runs in the full path (it is part of the task) but
is not measured. The benchmark settings (BENCH_SETTINGS: 1 worker x 2 CPUs, 12 epochs, 8 test samples per
task) are applied on top of the config; key=value overrides on the command line win over both.

Step checkpoints (``--checkpoint-every N``, default 20; 0 skips it): the full path again with
``train.checkpoint_every_steps=N``, in the same run; the job prints the step time with and without them and
the cost of one checkpoint (every rank saves its part, Ray Train copies it into the run's storage).

Then, unless ``--no-routing``: MR-LoRA's routed evaluation (one router pass + one mixed-adapter generate per
batch) against evaluating with a single adapter and against running every expert on every batch, from
``jobs/benchmark_routing.py`` (MR-LoRA trained in-process on the config's stream first).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
BENCH_SETTINGS = (
    "scaling.num_workers=1",
    "scaling.cpus_per_worker=2",
    "train.epochs=12",
    "eval.max_samples_per_task=8",
)
TARGET_RATIO = 0.9
WARMUP_STEPS = 2  # Excluded from the steady-state rates (the same cut as TaskResult.timing).


def bare_loop(
    prep: Any, rows: list[dict[str, Any]], log: Callable[[str], None] = print, *, decode_in_loop: bool = False
) -> dict[str, Any]:
    """Train task 0 on ``rows`` in a plain PyTorch loop in this process; return its figures.

    ``decode_in_loop=False`` preprocesses every row before the clock starts (pure training speed);
    ``True`` decodes and tokenises each batch inside the timed loop, as a PyTorch DataLoader with
    ``num_workers=0`` would: the same work per sample as the full path, which streams preprocessing.
    """
    import torch

    from mcl.data import Preprocessor, collate, rows_to_batch
    from mcl.logs import quiet_known_warnings
    from mcl.methods_api import TaskContext, build_method
    from mcl.models import load_model_and_processor
    from mcl.worker.engine import build_optimizer, model_inputs, seed_everything, to_device
    from mcl.worker.losses import per_sample_loss

    cfg = prep.config
    batch_size = cfg.train.batch_size
    threads = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.model.dtype)
    quiet_known_warnings()  # as mcl.worker.recipe does
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        preprocess = Preprocessor(prep.model_path, train=True, trust_remote_code=cfg.model.trust_remote_code)
        row_batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        if decode_in_loop:
            # Load the processor outside the clock, as the full path does.
            preprocess(rows_to_batch(row_batches[0]))
            np_batches: list[Any] = row_batches
        else:
            log(f"bare: preprocessing {len(rows)} rows in-process")
            np_batches = [preprocess(rows_to_batch(b)) for b in row_batches]
        preprocess_s = time.perf_counter() - t0

        # The same steps as mcl.worker.recipe.PhaseRecipe.setup: seed, load, let the method wrap the model.
        t0 = time.perf_counter()
        method = build_method(cfg.method.name, cfg.method.params)
        ctx = TaskContext(
            task_index=0,
            task_names=tuple(prep.stream.task_names),
            lora=cfg.model.lora,
            previous_state_dir=None,
            rank=0,
            world_size=1,
            seed=cfg.train.seed,
        )
        seed_everything(cfg.train.seed)
        base, processor = load_model_and_processor(
            prep.model_path, trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype
        )
        model = method.setup_model(base, ctx).to(device)
        model_load_s = time.perf_counter() - t0

        pad_id = processor.tokenizer.pad_token_id

        def to_batch(item: Any) -> dict[str, Any]:
            np_batch = preprocess(rows_to_batch(item)) if decode_in_loop else item
            return to_device(collate(np_batch, pad_id, left_pad=False), device, dtype)

        batches = np_batches if decode_in_loop else [to_batch(b) for b in np_batches]
        method.before_task(model, ctx)  # before the optimiser, as in mcl.worker.recipe
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = build_optimizer(model, cfg)
        model.train()

        log(f"bare: training {len(batches)} steps of {batch_size} samples with {threads} torch threads")
        losses: list[float] = []
        t_steady = None
        t_train = time.perf_counter()
        for step, item in enumerate(batches, start=1):
            batch = to_batch(item) if decode_in_loop else item
            outputs = model(**model_inputs(batch))
            loss = per_sample_loss(outputs.logits, batch["labels"])
            extra = method.extra_loss(model, batch, outputs, ctx)
            total = loss + extra if extra is not None else loss
            total.backward()
            if cfg.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))  # a device sync, as in the full path's loss logging
            if step == WARMUP_STEPS:
                t_steady = time.perf_counter()
        t_end = time.perf_counter()
        steps = len(batches)
        train_s = t_end - t_train
        steady_samples = max(0, steps - WARMUP_STEPS) * batch_size
        steady_s = t_end - t_steady if t_steady is not None else float("nan")
        figures = {
            "steady_samples_per_s": steady_samples / steady_s if steady_samples else float("nan"),
            "train_samples_per_s": steps * batch_size / train_s,
            "train_s": train_s,
            "steps": steps,
            "batch_size": batch_size,
            "torch_threads": threads,
            "device": str(device),
            "model_load_s": model_load_s,
            "preprocess_s": preprocess_s,
            "decode_in_loop": decode_in_loop,
            "first_loss": losses[0],
            "last_loss": losses[-1],
        }
        del model, base, optimizer, batches, np_batches, params
        gc.collect()
        return figures
    finally:
        torch.set_num_threads(previous_threads)


def full_path(prep: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train task 0 exactly as mcl.run.run_experiment does (one TorchTrainer); return its figures."""
    import ray

    from mcl.run import PlannedPhase, RunDir, phase_folder, phase_job
    from mcl.run.cluster import init_ray_for_run
    from mcl.run.executors.ray_train import fit_phases
    from mcl.worker.job import TaskResult

    cfg = prep.config
    started = not ray.is_initialized()
    t0 = time.perf_counter()
    init_ray_for_run(cfg)
    ray_init_s = time.perf_counter() - t0
    storage = (
        Path(cfg.tracking.output_dir).resolve() / f"benchmark-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    try:
        t0 = time.perf_counter()
        phase = prep.method.phases(0)[0]
        job, rows = phase_job(prep, 0, phase, None)
        job.evaluate_before = False
        steps = job.steps
        folder = phase_folder(prep, 0, phase)
        planned = PlannedPhase(job.key, folder, job, rows)
        plan_s = time.perf_counter() - t0  # the Ray datasets are built in fit_phases, timed in fit_wall_s
        log(
            f"full: training {steps} steps of {cfg.train.batch_size} samples on {cfg.scaling.num_workers} "
            f"Ray Train worker(s) x {cfg.scaling.cpus_per_worker} CPUs"
        )
        t0 = time.perf_counter()
        fit_phases(prep, [planned], RunDir(storage))
        fit_wall_s = time.perf_counter() - t0
        result = TaskResult.load(RunDir(storage).phase(folder).path)
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    timing = result.timing
    return {
        "steady_samples_per_s": timing["steady_samples_per_s"],
        "train_samples_per_s": timing["train_samples_per_s"],
        "train_s": timing["train_s"],
        "steady_data_wait_s": timing["steady_data_wait_s"],
        "steady_train_s": timing["steady_train_s"],
        "steps": steps,
        "batch_size": cfg.train.batch_size,
        "num_workers": cfg.scaling.num_workers,
        "cpus_per_worker": cfg.scaling.cpus_per_worker,
        "ray_init_s": ray_init_s,
        "plan_s": plan_s,
        "fit_wall_s": fit_wall_s,
        "fit_overhead_s": fit_wall_s - timing["train_s"] - timing["eval_s"],
        "worker_setup_s": timing["setup_s"],
        "eval_s": timing["eval_s"],
        "first_loss": result.train_log[0]["loss"],
        "last_loss": result.train_log[-1]["loss"],
    }


def with_step_checkpoints(prep: Any, every: int) -> Any:
    """``prep`` with ``train.checkpoint_every_steps = every``."""
    import dataclasses

    cfg = prep.config
    train = dataclasses.replace(cfg.train, checkpoint_every_steps=every)
    return dataclasses.replace(prep, config=dataclasses.replace(cfg, train=train))


def checkpoint_figures(full: dict[str, Any], with_ckpt: dict[str, Any], every: int) -> dict[str, Any]:
    """Step time with step checkpoints every ``every`` steps against none, from two full-path runs."""
    steps = full["steps"]
    taken = (steps - 1) // every  # none after the last step: the phase's own folder is saved then
    step_ms = 1000 * full["train_s"] / steps
    step_ms_ckpt = 1000 * with_ckpt["train_s"] / steps
    return {
        "every": every,
        "checkpoints": taken,
        "step_ms": step_ms,
        "step_ms_with_checkpoints": step_ms_ckpt,
        "seconds_per_checkpoint": (with_ckpt["train_s"] - full["train_s"]) / taken if taken else float("nan"),
        "steady_samples_per_s": with_ckpt["steady_samples_per_s"],
        "slowdown": step_ms_ckpt / step_ms,
    }


def run_benchmark(prep: Any, log: Callable[[str], None] = print, checkpoint_every: int = 0) -> dict[str, Any]:
    """Both paths on task 0 of ``prep``'s stream (the bare loop first, on a machine without Ray running);
    with ``checkpoint_every``, the full path once more with step checkpoints."""
    from mcl.run import task_training_rows

    cfg = prep.config
    load_before = _load_average()
    rows = task_training_rows(prep, 0)
    bare = bare_loop(prep, rows, log)
    bare_decoding = bare_loop(prep, rows, log, decode_in_loop=True)
    full = full_path(prep, log)
    if not full["steps"] == bare["steps"] == bare_decoding["steps"]:
        raise RuntimeError(
            f"the paths trained different step counts: full {full['steps']}, bare {bare['steps']}"
        )
    ratio = full["steady_samples_per_s"] / bare_decoding["steady_samples_per_s"]
    ratio_pretokenized = full["steady_samples_per_s"] / bare["steady_samples_per_s"]
    checkpoints = None
    if checkpoint_every:
        log(f"full, with a step checkpoint every {checkpoint_every} steps")
        with_ckpt = full_path(with_step_checkpoints(prep, checkpoint_every), log)
        checkpoints = checkpoint_figures(full, with_ckpt, checkpoint_every)
    return {
        "settings": {
            "model": cfg.model.name,
            "dtype": cfg.model.dtype,
            "method": cfg.method.name,
            "stream": cfg.stream.name,
            "task": prep.stream.task_names[0],
            "steps": bare["steps"],
            "batch_size": cfg.train.batch_size,
            "num_workers": cfg.scaling.num_workers,
            "cpus_per_worker": cfg.scaling.cpus_per_worker,
            "deepspeed": cfg.scaling.deepspeed,
            "zero_stage": cfg.scaling.zero_stage,
            "use_gpu": cfg.scaling.use_gpu,
            "host_cpus": os.cpu_count(),
            "host_load_1min_before": load_before,
            "host_load_1min_after": _load_average(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        },
        "full": full,
        "bare": bare,
        "bare_decoding": bare_decoding,
        # Headline: the same work per sample (decode + tokenise + train) on the same cores.
        "ratio": ratio,
        # Against pure training on pre-tokenised tensors: on a CPU-only host the full path's streamed
        # preprocessing competes with training for the same cores, which this ratio charges to the full path.
        "ratio_vs_pretokenized": ratio_pretokenized,
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(ratio >= TARGET_RATIO),
        "step_checkpoints": checkpoints,
    }


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def format_report(fig: dict[str, Any]) -> str:
    s, full, bare, bare_dec = fig["settings"], fig["full"], fig["bare"], fig["bare_decoding"]
    engine = f"DeepSpeed ZeRO-{s['zero_stage']}" if s["deepspeed"] else "plain torch"
    lines = [
        f"mcl benchmark: {s['model']} ({s['dtype']}), {s['method']}, stream {s['stream']!r} task "
        f"{s['task']!r}: {s['steps']} steps x {s['batch_size']} samples",
        f"full: Ray Train + {engine} + Ray Data, {s['num_workers']} worker(s) x {s['cpus_per_worker']} CPUs; "
        f"bare: 1 process, {bare['torch_threads']} torch threads on {bare['device']}; host CPUs: {s['host_cpus']}",
        "",
        "bare: decoding in the loop (as a DataLoader with num_workers=0); bare-pre: tensors made up front",
        "",
        f"{'training throughput':36}{'full':>12}{'bare':>12}{'bare-pre':>12}",
        f"{'steady samples/s (steps 3+)':36}{full['steady_samples_per_s']:12.2f}"
        f"{bare_dec['steady_samples_per_s']:12.2f}{bare['steady_samples_per_s']:12.2f}",
        f"{'mean samples/s (all steps)':36}{full['train_samples_per_s']:12.2f}"
        f"{bare_dec['train_samples_per_s']:12.2f}{bare['train_samples_per_s']:12.2f}",
        f"{'training time (s)':36}{full['train_s']:12.2f}{bare_dec['train_s']:12.2f}{bare['train_s']:12.2f}",
        f"{'loss, first step':36}{full['first_loss']:12.4f}{bare_dec['first_loss']:12.4f}{bare['first_loss']:12.4f}",
        f"{'loss, last step':36}{full['last_loss']:12.4f}{bare_dec['last_loss']:12.4f}{bare['last_loss']:12.4f}",
        f"full: time blocked on Ray Data in steady state {full['steady_data_wait_s']:.2f}s "
        f"of {full['steady_train_s']:.2f}s",
        "",
        f"full / bare (steady, same work per sample): {fig['ratio']:.3f}  (target >= {fig['target_ratio']:.2f}: "
        f"{'met' if fig['meets_target'] else 'NOT met'})",
        f"full / bare-pre (steady, preprocessing charged to the full path only): {fig['ratio_vs_pretokenized']:.3f}",
        "",
        "one-off start-up (s)",
        f"  {'full: Ray init':62}{full['ray_init_s']:8.2f}",
        f"  {'full: planning the phase (training rows, job)':62}{full['plan_s']:8.2f}",
        f"  {'full: fit wall - train - eval (datasets, workers, setup, ckpt)':62}"
        f"{full['fit_overhead_s']:8.2f}",
        f"  {'  of which in the worker: model load + LoRA + DeepSpeed init':62}{full['worker_setup_s']:8.2f}",
        f"  {'full: fit wall time (eval: ' + format(full['eval_s'], '.2f') + ' s, not measured)':62}"
        f"{full['fit_wall_s']:8.2f}",
        f"  {'bare: model load + LoRA':62}{bare['model_load_s']:8.2f}",
        f"  {'bare: preprocessing up front':62}{bare['preprocess_s']:8.2f}",
    ]
    ck = fig.get("step_checkpoints")
    if ck:
        lines += [
            "",
            f"step checkpoints every {ck['every']} steps ({ck['checkpoints']} in the phase), full path:",
            f"  step time {ck['step_ms_with_checkpoints']:.1f} ms with, {ck['step_ms']:.1f} ms without "
            f"(x{ck['slowdown']:.2f}); {ck['seconds_per_checkpoint']:.2f} s per checkpoint",
        ]
    if s["host_load_1min_before"] is not None and s["host_load_1min_after"] is not None:
        lines.append(
            f"host load average (1 min): {s['host_load_1min_before']:.2f} before, "
            f"{s['host_load_1min_after']:.2f} after (other work on the host skews the figures)"
        )
    if s["omp_num_threads_env"] not in (None, str(s["cpus_per_worker"])):
        lines.append(
            f"warning: OMP_NUM_THREADS={s['omp_num_threads_env']} is set here and inherited by the Ray "
            f"workers, so they may not run {s['cpus_per_worker']} threads like the bare loop"
        )
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _routing_figures(args: argparse.Namespace) -> dict[str, Any]:
    """MR-LoRA's routed evaluation vs one adapter vs every expert (jobs/benchmark_routing.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark_routing import format_routing_report, routing_benchmark

    print("\nrouted inference (MR-LoRA): training it in-process on the config's stream first ...")
    overrides = [o for o in args.overrides if not o.startswith("scaling.")]
    figures = routing_benchmark(overrides, config=args.config, log=lambda _m: None)
    print(format_routing_report(figures))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: %(default)s)"
    )
    parser.add_argument("--out", default="", help="also write the figures as JSON to this file")
    parser.add_argument(
        "--no-routing", action="store_true", help="skip the MR-LoRA routed-inference measurement"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=20,
        help="also time the full path with a step checkpoint every N steps (0: skip; default %(default)s)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=32")
    args = parser.parse_args(argv)

    from mcl.config import load_config
    from mcl.errors import MclError

    try:
        cfg = load_config(args.config, [*BENCH_SETTINGS, *args.overrides])
        from mcl.run import prepare_run

        prep = prepare_run(cfg)
    except MclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    figures = run_benchmark(prep, checkpoint_every=args.checkpoint_every)
    print()
    print(format_report(figures))
    if not args.no_routing:
        figures["routing"] = _routing_figures(args)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(figures), indent=1) + "\n")
        print(f"\nfigures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
