"""Data-path figures: memory of reading a task at two sizes, and batched against per-sample evaluation.

Usage:
    python jobs/benchmark_data.py                        # tasks of 1,000 and 20,000 samples; 160 eval samples
    python jobs/benchmark_data.py --out data.json        # also write the figures as JSON
    python jobs/benchmark_data.py --sizes 1000,50000 --eval-samples 320 --eval-batch 16
    python jobs/benchmark_data.py --smoke                # sizes 100 and 400, 16 eval samples (the test runs it)

Reading a task (goal: memory stays flat as the task grows). For each size n, a task is written in the
published MLLM-CL formats: ``train.json`` (LLaVA conversations, n rows) and ``test.jsonl`` (MLLM-CL test
rows ``{question_id, image, text, answer}``, n rows), all rows pointing at a small pool of real PNG images
(IMAGE_POOL images of IMAGE_SIDE x IMAGE_SIDE pixels; many rows share one). Then a fresh Python process per
size (so ``ru_maxrss`` is that size's own peak) imports mcl, loads the tiny LLaVA's processor, preprocesses one
row and turns it into an Arrow block (pyarrow and its pandas shim load then, as in every Ray run): that is the
baseline. Then it does what the driver and a worker do with a task, timing each stage and recording the
resident memory after it:

  read        ``read_llava_conversations`` and ``read_mllmcl_test`` (every sample of both files, parsed as a
              stream and kept on disk: ``mcl.streams.store.SampleList``)
  check       ``check_images`` over all samples (each distinct image decoded once)
  rows        the evaluation rows as the runner builds them (``mcl.data.SampleRows`` over the test samples),
              turned into Arrow blocks one at a time (``mcl.data.arrow_blocks``, what ``ray_dataset`` hands
              to Ray's object store block by block; the object store itself is not measured)
  order       the training order the driver builds for a task (``mcl.data.training_order``: indices of a row
              per sample per epoch, the default config's 5 epochs and batch 16)
  preprocess  the training rows through ``mcl.data.local_batches`` and ``Preprocessor`` (image decode,
              chat template, tokenisation), one batch at a time, as a worker consumes them without Ray

Reported per size: the RSS baseline, the peak RSS (``ru_maxrss``), the peak above the baseline, and RSS at
the first and last preprocessed batch; across sizes: the ratios and the growth per 1,000 samples.

Evaluation (goal: not slower than the published per-sample scripts). The tiny LLaVA with a fresh
sequential-LoRA adapter (as ``mcl.worker.recipe`` sets it up) answers the generated stream's test samples through
``mcl.evaluation.generation.GenerationEvaluator`` at ``--eval-batch`` and at batch size 1 (what the published ``model_vqa``-style
scripts do: one sample per ``generate``), two ways: over batches preprocessed up front (the model work that
batching changes) and end to end (``local_batches`` decoding and tokenising inside the clock). Each mode
first evaluates one untimed batch; then the modes take turns, ``--repeats`` passes each, and the best pass
counts. On CPU, torch runs ``--threads`` threads (default 1, as one Ray worker of the default config). The
answers must be identical at both batch sizes; mismatches are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "default.yaml"
IMAGE_POOL = 8
IMAGE_SIDE = 336  # LLaVA-1.5's input size; the tiny processor resizes to 32, so decoding dominates
READ_BATCH = 16  # the default config's train.batch_size
ORDER_EPOCHS = 5  # the default config's train.epochs
FIGURES_TAG = "BENCHMARK_DATA_FIGURES "  # prefix of the child's one JSON line on stdout
SMOKE = {"sizes": "100,400", "eval_samples": 16, "eval_batch": 8, "repeats": 1}
ANSWERS = ("yes", "no", "road", "river", "two", "three")
_MIB = 1024 * 1024


def _ensure_paths() -> None:
    for path in (REPO / "platform", REPO):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def write_image_pool(root: Path, count: int = IMAGE_POOL, side: int = IMAGE_SIDE) -> list[str]:
    """Write ``count`` noisy RGB PNGs under ``root/images``; return their paths relative to ``root``."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(count):
        pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        name = f"images/pool-{k}.png"
        Image.fromarray(pixels, mode="RGB").save(root / name, format="PNG")
        names.append(name)
    return names


def write_task_files(folder: Path, n: int, images: Sequence[str]) -> dict[str, Path]:
    """Write ``train.json`` (LLaVA conversations) and ``test.jsonl`` (MLLM-CL test rows), ``n`` rows each.

    Row ``i`` uses ``images[i % len(images)]`` (paths relative to the folder's parent, the image root).
    """
    folder.mkdir(parents=True, exist_ok=True)
    train = [
        {
            "id": f"train-{i:07d}",
            "image": images[i % len(images)],
            "conversations": [
                {"from": "human", "value": f"<image>\n{_question(i)}"},
                {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]},
            ],
        }
        for i in range(n)
    ]
    paths = {"train": folder / "train.json", "test": folder / "test.jsonl"}
    paths["train"].write_text(json.dumps(train, indent=1) + "\n", encoding="utf-8")
    with paths["test"].open("w", encoding="utf-8") as f:
        for i in range(n):
            row = {
                "question_id": i,
                "image": images[(i * 7) % len(images)],
                "text": _question(i),
                "answer": ANSWERS[(i * 5) % len(ANSWERS)],
            }
            f.write(json.dumps(row) + "\n")
    return paths


def _question(i: int) -> str:
    return f"What is shown in region {i % 97}? Answer the question using a single word or phrase."


def measure_reading(
    train_path: Path,
    test_path: Path,
    image_root: Path,
    model_path: str,
    batch_size: int,
    epochs: int,
    max_batches: int,
) -> dict[str, Any]:
    """Run in a fresh process: the stages of reading one task, with time and RSS after each (bytes).

    ``max_batches`` > 0 preprocesses only the first ``max_batches`` training batches; 0 preprocesses all.
    """
    _ensure_paths()
    from mcl.data import (
        ROW_KEYS,
        Preprocessor,
        SampleRows,
        arrow_blocks,
        local_batches,
        rows_to_batch,
        training_order,
    )
    from mcl.streams.formats import check_images, read_llava_conversations, read_mllmcl_test
    from mcl.streams.store import ChainedSamples

    preprocess = Preprocessor(model_path, train=True)
    # Baseline: imports done, processor loaded, one image decoded and one prompt tokenised.
    warm = dict.fromkeys(ROW_KEYS, "warm-up")
    warm.update(image=str(image_root / "images" / "pool-0.png"), answer="yes", supervised=True)
    preprocess(rows_to_batch([warm]))
    list(arrow_blocks([warm]))  # imports pyarrow and its pandas shim, as Ray Data does in every real run
    figures: dict[str, Any] = {"baseline_rss": current_rss(), "baseline_peak_rss": peak_rss(), "stages": {}}

    def stage(name: str, t0: float, **extra: Any) -> None:
        figures["stages"][name] = {"s": time.perf_counter() - t0, "rss": current_rss(), **extra}

    t0 = time.perf_counter()
    train = read_llava_conversations(train_path, image_root, "bench")
    test = read_mllmcl_test(test_path, image_root, "bench")
    stage("read", t0, samples=len(train) + len(test))
    t0 = time.perf_counter()
    check_images(ChainedSamples([train, test]))
    stage("check", t0)
    t0 = time.perf_counter()
    eval_rows = SampleRows(ChainedSamples([test]))
    blocks = sum(1 for _ in arrow_blocks(eval_rows))
    stage("rows", t0, rows=len(eval_rows), blocks=blocks)
    t0 = time.perf_counter()
    order = training_order(train, epochs=epochs, global_batch=batch_size, seed=0)
    stage("order", t0, rows=len(order), epochs=epochs)
    t0 = time.perf_counter()
    batches = 0
    rows_done = 0
    first_batch_rss = None
    for batch in local_batches(SampleRows(train), preprocess, batch_size):
        batches += 1
        rows_done += len(batch["id"])
        if first_batch_rss is None:
            first_batch_rss = current_rss()
        if batches == max_batches:
            break
    stage("preprocess", t0, batches=batches, rows=rows_done, first_batch_rss=first_batch_rss)
    figures["peak_rss"] = peak_rss()
    figures["held_rows"] = len(train) + len(test) + len(order)
    return figures


def reading_benchmark(
    sizes: Sequence[int],
    work: Path,
    model_path: str,
    *,
    batch_size: int = READ_BATCH,
    epochs: int = ORDER_EPOCHS,
    max_batches: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write a task of each size and measure reading it, each in a fresh process; return the figures."""
    images = write_image_pool(work)
    per_size: dict[str, Any] = {}
    for n in sizes:
        paths = write_task_files(work / f"n{n}", n, images)
        log(f"reading a task of {n} + {n} samples in a fresh process ...")
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--measure-read",
            json.dumps(
                {
                    "train_path": str(paths["train"]),
                    "test_path": str(paths["test"]),
                    "image_root": str(work),
                    "model_path": model_path,
                    "batch_size": batch_size,
                    "epochs": epochs,
                    "max_batches": max_batches,
                }
            ),
        ]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(FIGURES_TAG)]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"measuring size {n} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        fig = json.loads(lines[-1][len(FIGURES_TAG) :])
        fig["process_wall_s"] = time.perf_counter() - t0
        fig["samples"] = n
        fig["annotation_bytes"] = sum(p.stat().st_size for p in paths.values())
        per_size[str(n)] = _to_mib(fig)
    small, large = per_size[str(min(sizes))], per_size[str(max(sizes))]
    thousands = (max(sizes) - min(sizes)) / 1000
    return {
        "settings": {
            "sizes": list(sizes),
            "image_pool": IMAGE_POOL,
            "image_side": IMAGE_SIDE,
            "batch_size": batch_size,
            "epochs": epochs,
            "max_batches": max_batches,
            "model": model_path,
        },
        "sizes": per_size,
        "peak_ratio": large["peak_rss_mib"] / small["peak_rss_mib"],
        "peak_above_baseline_ratio": _ratio(
            large["peak_above_baseline_mib"], small["peak_above_baseline_mib"]
        ),
        # Samples are per file; the task has n training and n test samples.
        "peak_growth_mib_per_1k": (large["peak_rss_mib"] - small["peak_rss_mib"]) / thousands,
        "held_growth_mib_per_1k": (large["held_above_baseline_mib"] - small["held_above_baseline_mib"])
        / thousands,
        "streaming_growth_mib": {k: v["preprocess_growth_mib"] for k, v in per_size.items()},
    }


def _to_mib(fig: dict[str, Any]) -> dict[str, Any]:
    """The child's byte counts as MiB, plus the derived differences."""
    base = fig["baseline_rss"]
    stages = {
        name: {
            (f"{k}_mib" if k.endswith("rss") else k): (v / _MIB if k.endswith("rss") and v is not None else v)
            for k, v in st.items()
        }
        for name, st in fig["stages"].items()
    }
    prep = fig["stages"]["preprocess"]
    first = prep["first_batch_rss"] if prep["first_batch_rss"] is not None else prep["rss"]
    return {
        "samples": fig["samples"],
        "held_rows": fig["held_rows"],
        "annotation_mib": fig["annotation_bytes"] / _MIB,
        "baseline_rss_mib": base / _MIB,
        "baseline_peak_rss_mib": fig["baseline_peak_rss"] / _MIB,
        "peak_rss_mib": fig["peak_rss"] / _MIB,
        "peak_above_baseline_mib": (fig["peak_rss"] - base) / _MIB,
        "held_above_baseline_mib": (fig["stages"]["order"]["rss"] - base) / _MIB,
        "preprocess_growth_mib": (prep["rss"] - first) / _MIB,
        "process_wall_s": fig["process_wall_s"],
        "stages": stages,
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def evaluation_benchmark(
    work: Path,
    model_path: str,
    *,
    samples: int,
    batch_size: int,
    repeats: int,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time ``mcl.evaluation.generation.GenerationEvaluator`` at ``batch_size`` and at 1 on the same samples; compare the answers.

    On CPU, torch runs ``threads`` threads (default 1: one Ray worker of the default config, which sets
    ``OMP_NUM_THREADS`` to ``scaling.cpus_per_worker``).
    """
    _ensure_paths()
    import torch

    from mcl.config import load_config
    from mcl.data import sample_row
    from mcl.streams import build_stream

    if samples < 1 or batch_size < 1 or repeats < 1:
        raise ValueError("samples, batch size and repeats must be >= 1")
    cfg = load_config(
        DEFAULT_CONFIG, ["scaling.deepspeed=false", "scaling.num_workers=1", f"eval.batch_size={batch_size}"]
    )
    per_task = math.ceil(samples / 4)
    log(f"evaluation: generating the stream ({per_task} test samples per task) ...")
    stream = build_stream(
        "generated", work / "generated", {"seed": 0, "train_per_task": 1, "test_per_task": per_task}
    )
    rows = [sample_row(s) for t in stream.tasks for s in t.test][:samples]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    previous_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        figures = _time_evaluation(rows, stream.task_names, model_path, cfg, device, repeats, log)
    finally:
        torch.set_num_threads(previous_threads)
    return figures


def _time_evaluation(
    rows: list[dict[str, Any]],
    task_names: Sequence[str],
    model_path: str,
    cfg: Any,
    device: Any,
    repeats: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    import torch

    from mcl.data import Preprocessor, local_batches
    from mcl.evaluation.generation import GenerationEvaluator
    from mcl.methods_api import TaskContext, build_method
    from mcl.models import load_model_and_processor
    from mcl.worker.engine import StepEngine, seed_everything

    batch_size = cfg.eval.batch_size
    dtype = getattr(torch, cfg.model.dtype)
    method = build_method("sequential_lora", {})
    seed_everything(cfg.train.seed)
    base, processor = load_model_and_processor(model_path, dtype=cfg.model.dtype)
    ctx = TaskContext(
        task_index=0, task_names=tuple(task_names), lora=cfg.model.lora, seed=0, processor=processor
    )
    model = method.setup_model(base, ctx)
    engine = StepEngine(model, cfg, 1, device)
    evaluator = GenerationEvaluator(engine.module, method, processor, cfg.eval.max_new_tokens, device, dtype)
    pre = Preprocessor(model_path, train=False)

    def run(batches: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return evaluator.predict(batches, ctx)

    sizes = {"batched": batch_size, "bs1": 1}
    prepared = {mode: list(local_batches(rows, pre, bs)) for mode, bs in sizes.items()}
    modes: dict[str, Callable[[str], list[dict[str, Any]]]] = {
        "generate": lambda mode: run(prepared[mode]),
        "end_to_end": lambda mode: run(local_batches(rows, pre, sizes[mode])),
    }
    for mode in sizes:  # warm-up, untimed
        run(prepared[mode][:1])
    best = {(way, mode): float("inf") for way in modes for mode in sizes}
    records: dict[str, list[dict[str, Any]]] = {}
    names = list(sizes)
    for r in range(repeats):
        for way, fn in modes.items():
            for mode in names[r % 2 :] + names[: r % 2]:  # alternate which batch size goes first
                _sync(device)
                t0 = time.perf_counter()
                out = fn(mode)
                _sync(device)
                best[way, mode] = min(best[way, mode], time.perf_counter() - t0)
                records.setdefault(mode, out)
    n = len(rows)
    figures: dict[str, Any] = {
        "settings": {
            "samples": n,
            "batch_size": batch_size,
            "repeats": repeats,
            "max_new_tokens": cfg.eval.max_new_tokens,
            "device": str(device),
            "dtype": cfg.model.dtype,
            "torch_threads": torch.get_num_threads(),
            "model": model_path,
        }
    }
    for way in modes:
        figures[way] = {
            mode: {"samples_per_s": n / best[way, mode], "seconds": best[way, mode], "batch_size": bs}
            for mode, bs in sizes.items()
        }
        figures[way]["ratio"] = best[way, "bs1"] / best[way, "batched"]
        log(
            f"evaluation {way}: batch {batch_size} {figures[way]['batched']['samples_per_s']:.1f} samples/s, "
            f"batch 1 {figures[way]['bs1']['samples_per_s']:.1f} samples/s"
        )
    by_id = {r["id"]: r["prediction"] for r in records["bs1"]}
    mismatches = [
        {"id": r["id"], "batched": r["prediction"], "bs1": by_id.get(r["id"])}
        for r in records["batched"]
        if by_id.get(r["id"]) != r["prediction"]
    ]
    figures["predictions_equal"] = not mismatches and len(by_id) == len(records["batched"]) == n
    figures["mismatches"] = mismatches
    figures["example_prediction"] = records["batched"][0]["prediction"] if records["batched"] else None
    return figures


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", "") == "cuda":
        torch.cuda.synchronize(device)


def format_reading_report(fig: dict[str, Any]) -> str:
    s = fig["settings"]
    keys = [str(n) for n in s["sizes"]]
    per = [fig["sizes"][k] for k in keys]

    def row(label: str, values: Iterable[str]) -> str:
        return f"{label:46}" + "".join(f"{v:>16}" for v in values)

    def stage(name: str, key: str, fmt: str) -> Iterable[str]:
        return (format(p["stages"][name][key], fmt) for p in per)

    prep = [p["stages"]["preprocess"] for p in per]
    prep_label = "all training rows" if not s["max_batches"] else f"first {s['max_batches']} batches"
    lines = [
        f"reading a task (one fresh process per size; {s['image_pool']} shared {s['image_side']}px PNGs; "
        f"tiny LLaVA processor; batch {s['batch_size']})",
        row("samples per file (train.json, test.jsonl)", (f"{p['samples']:,}" for p in per)),
        row("annotation files (MiB)", (f"{p['annotation_mib']:.2f}" for p in per)),
        row("read both files (s)", stage("read", "s", ".2f")),
        row("check_images (s)", stage("check", "s", ".2f")),
        row("eval rows as Arrow blocks (s)", stage("rows", "s", ".3f")),
        row(f"training_order, {s['epochs']} epochs (s)", stage("order", "s", ".3f")),
        row(f"preprocess {prep_label} (s)", stage("preprocess", "s", ".2f")),
        row("  rows preprocessed (rows/s)", (f"{p['rows']} ({p['rows'] / p['s']:.0f})" for p in prep)),
        row("RSS baseline: imports + processor (MiB)", (f"{p['baseline_rss_mib']:.1f}" for p in per)),
        row("RSS after reading (MiB)", stage("read", "rss_mib", ".1f")),
        row("RSS after the eval rows' blocks (MiB)", stage("rows", "rss_mib", ".1f")),
        row("RSS after training_order (MiB)", stage("order", "rss_mib", ".1f")),
        row(
            "RSS at first / last preprocessed batch",
            (f"{p['first_batch_rss_mib']:.1f} / {p['rss_mib']:.1f}" for p in prep),
        ),
        row("peak RSS (ru_maxrss, MiB)", (f"{p['peak_rss_mib']:.1f}" for p in per)),
        row("peak above baseline (MiB)", (f"{p['peak_above_baseline_mib']:.1f}" for p in per)),
        "",
        f"peak RSS {keys[-1]} / {keys[0]}: {fig['peak_ratio']:.3f}; peak above baseline {keys[-1]} / {keys[0]}: "
        f"{fig['peak_above_baseline_ratio']:.2f}",
        f"growth per 1,000 samples per file (a training and a test sample each): peak RSS "
        f"{fig['peak_growth_mib_per_1k']:.2f} MiB, RSS holding samples, rows and training order "
        f"{fig['held_growth_mib_per_1k']:.2f} MiB",
        "what the driver holds per sample: an 8-byte file offset and an 8-byte id hash (samples are kept on "
        "disk, annotation files parsed as a stream), and 12 bytes per row of the training order (indices). "
        "Images are decoded batch by batch: streaming all rows moves RSS by "
        + " / ".join(f"{v:.1f}" for v in fig["streaming_growth_mib"].values())
        + " MiB from the first to the last batch.",
    ]
    return "\n".join(lines)


def format_evaluation_report(fig: dict[str, Any]) -> str:
    s = fig["settings"]
    lines = [
        f"evaluation: mcl.evaluation.generation.GenerationEvaluator, tiny LLaVA + LoRA, {s['samples']} generated test samples, "
        f"max_new_tokens {s['max_new_tokens']}, {s['device']} ({s['dtype']}), torch threads: "
        f"{s['torch_threads']}, best of {s['repeats']} passes",
        f"{'':46}{'batch ' + str(s['batch_size']):>16}{'batch 1':>16}{'ratio':>10}",
    ]
    for way, label in (
        ("generate", "preprocessed up front (samples/s)"),
        ("end_to_end", "decode + tokenise in the loop"),
    ):
        f = fig[way]
        lines.append(
            f"{label:46}{f['batched']['samples_per_s']:16.1f}{f['bs1']['samples_per_s']:16.1f}{f['ratio']:10.2f}"
        )
    lines.append(
        f"answers identical at both batch sizes: {fig['predictions_equal']} ({len(fig['mismatches'])} mismatches)"
    )
    for m in fig["mismatches"][:5]:
        lines.append(f"  {m['id']}: batch {s['batch_size']} {m['batched']!r}, batch 1 {m['bs1']!r}")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,20000", help="task sizes to read (default: %(default)s)")
    parser.add_argument(
        "--eval-samples", type=int, default=160, help="test samples evaluated (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-batch", type=int, default=32, help="batched evaluation's batch size (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluation passes; the best counts")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for evaluation on CPU (default: %(default)s)"
    )
    parser.add_argument(
        "--read-batches",
        type=int,
        default=0,
        help="preprocess only this many training batches per size (0: all)",
    )
    parser.add_argument("--smoke", action="store_true", help=f"tiny settings for the test: {SMOKE}")
    parser.add_argument("--out", default="", help="also write the figures as JSON to this file")
    parser.add_argument("--measure-read", default=None, help=argparse.SUPPRESS)  # the per-size child
    args = parser.parse_args(argv)

    if args.measure_read is not None:
        spec = json.loads(args.measure_read)
        spec.update({k: Path(spec[k]) for k in ("train_path", "test_path", "image_root")})
        print(FIGURES_TAG + json.dumps(measure_reading(**spec)), flush=True)
        return 0
    if args.smoke:
        args.sizes, args.eval_samples = SMOKE["sizes"], SMOKE["eval_samples"]
        args.eval_batch, args.repeats = SMOKE["eval_batch"], SMOKE["repeats"]
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if len(sizes) < 2 or sizes[0] < 1:
        parser.error("--sizes needs at least two positive sizes")

    _ensure_paths()
    from mcl.models import resolve_model_path

    model_path = resolve_model_path("tiny-llava")
    work = Path(tempfile.mkdtemp(prefix="mcl-data-bench-"))
    load_before = _load_average()
    try:
        reading = reading_benchmark(sizes, work / "reading", model_path, max_batches=args.read_batches)
        evaluation = evaluation_benchmark(
            work / "evaluation",
            model_path,
            samples=args.eval_samples,
            batch_size=args.eval_batch,
            repeats=args.repeats,
            threads=args.threads,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        "host": {
            "cpus": os.cpu_count(),
            "load_1min_before": load_before,
            "load_1min_after": _load_average(),
        },
        "reading": reading,
        "evaluation": evaluation,
    }
    print()
    print(format_reading_report(reading))
    print()
    print(format_evaluation_report(evaluation))
    host = figures["host"]
    if host["load_1min_before"] is not None and host["load_1min_after"] is not None:
        print(
            f"\nhost: {host['cpus']} CPUs, load average (1 min) {host['load_1min_before']:.2f} before, "
            f"{host['load_1min_after']:.2f} after (other work on the host skews the timings)"
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(figures), indent=1) + "\n")
        print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
