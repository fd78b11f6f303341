"""Length-grouped batches (``train.group_by_length``): padding fraction and training samples/s, off vs on.

Usage:
    python jobs/benchmark_length.py                      # 320 samples, 1 epoch of 20 steps of 16 (micro 4)
    python jobs/benchmark_length.py --out length.json    # also write the figures as JSON
    python jobs/benchmark_length.py --smoke              # 64 samples, batch 8, micro 2 (the test runs it)

The task: ``--samples`` rows written in MLLM-CL's training format (LLaVA conversations) over a pool of real
PNGs and read back with ``mcl.streams.formats.read_llava_conversations``. Lengths spread as in instruction
data: 55% short VQA (question 8-20 words, answer 1-3), 30% medium (question 10-40, answer 10-60), 15% long
descriptions (question 10-30, answer 80-250); words from the tiny model's vocabulary (one token each). Token
lengths (prompt + image tokens + answer + EOS) are counted by ``mcl.lengths`` and printed (mean, p50, p95,
max).

Both modes train one epoch of the same rows (``mcl.data.training_order``, seed 0) on the tiny LLaVA with a
fresh sequential-LoRA adapter, in this process, one worker: each global batch runs as micro-batches of
``--micro-batch`` consecutive rows whose gradients accumulate before one AdamW step (what a worker does with
``train.micro_batch_size``). ``off`` trains the method's order as it is, ``on`` the order regrouped by
``mcl.data.group_by_length`` (what the driver does with the option on). Rows are preprocessed before the clock;
each step collates its micro-batches inside it (padding to the longest of each). Padding fraction = padded
tokens / all tokens of the micro-batches (from their attention masks); it is also computed from the lengths
alone for 2 and 4 workers. Samples/s is over the whole epoch (every step: the grouped order puts its longest
batch first, so a steady-state window would flatter it), after one untimed warm-up pass of a few steps; the
modes take turns ``--repeats`` times and the best pass counts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "default.yaml"
MIX = (  # share, question words, answer words
    (0.55, (8, 20), (1, 3)),
    (0.30, (10, 40), (10, 60)),
    (0.15, (10, 30), (80, 250)),
)
IMAGE_POOL = 8
WARMUP_STEPS = 3  # steps of the untimed warm-up pass
SMOKE = {"samples": 64, "batch_size": 8, "micro_batch": 2, "repeats": 1}
FIGURES_TAG = "BENCHMARK_LENGTH_FIGURES "


def _ensure_paths() -> None:
    for path in (REPO / "platform", REPO):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def write_task(folder: Path, n: int, words: list[str], seed: int = 0) -> Path:
    """Write ``folder/train.json`` (LLaVA conversations, lengths from MIX) and its image pool; return the file."""
    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed)
    for k in range(IMAGE_POOL):
        Image.fromarray(pixels.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"images/{k}.png")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        _, question, answer = rng.choices(MIX, weights=[share for share, _, _ in MIX])[0]
        text = lambda span: " ".join(rng.choice(words) for _ in range(rng.randint(*span)))  # noqa: E731
        rows.append(
            {
                "id": f"row-{i:06d}",
                "image": f"images/{i % IMAGE_POOL}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{text(question)} ?"},
                    {"from": "gpt", "value": text(answer)},
                ],
            }
        )
    path = folder / "train.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def length_stats(lengths: Any) -> dict[str, float]:
    """Mean, p50, p95 and max of token lengths."""
    import numpy as np

    lengths = np.asarray(lengths)
    return {
        "mean": float(lengths.mean()),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": float(lengths.max()),
    }


def padding_fraction(lengths: Any, global_batch: int, workers: int, micro: int) -> float:
    """Padded / all tokens of the micro-batches the engine cuts from an order with these position lengths
    (row ``j`` of a global batch to rank ``j % workers``, each rank's rows in consecutive runs of ``micro``)."""
    import numpy as np

    padded = total = 0
    for start in range(0, len(lengths), global_batch):
        batch = np.asarray(lengths[start : start + global_batch])
        for rank in range(workers):
            mine = batch[rank::workers]
            for m in range(0, len(mine), micro):
                chunk = mine[m : m + micro]
                padded += int(chunk.max()) * len(chunk) - int(chunk.sum())
                total += int(chunk.max()) * len(chunk)
    return padded / total


def train_epoch(setup: dict[str, Any], batches: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Train one pass over ``batches`` (each a list of preprocessed micro-batches); samples/s and padding."""
    import torch

    from mcl.data import collate
    from mcl.methods_api import build_method
    from mcl.models import load_model_and_processor
    from mcl.worker.engine import build_optimizer, model_inputs, seed_everything
    from mcl.worker.losses import per_sample_loss

    cfg, ctx = setup["cfg"], setup["ctx"]
    seed_everything(cfg.train.seed)
    base, processor = load_model_and_processor(setup["model_path"], dtype=cfg.model.dtype)
    method = build_method(cfg.method.name, cfg.method.params)
    model = method.setup_model(base, ctx)
    method.before_task(model, ctx)
    optimizer, _ = build_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    pad_id = processor.tokenizer.pad_token_id
    padded = total = 0
    start = time.perf_counter()
    for micro_batches in batches:
        for np_batch in micro_batches:
            batch = collate(np_batch, pad_id, left_pad=False)
            padded += int((batch["attention_mask"] == 0).sum())
            total += batch["attention_mask"].numel()
            loss = per_sample_loss(model(**model_inputs(batch)).logits, batch["labels"]) / len(micro_batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - start
    rows = sum(len(mb["input_ids"]) for b in batches for mb in b)
    return {"samples_per_s": rows / train_s, "train_s": train_s, "padding_fraction": padded / total}


def _micro_batches(order: Any, preprocess: Any, global_batch: int, micro: int) -> list[list[dict[str, Any]]]:
    from mcl.data import rows_to_batch

    return [
        [preprocess(rows_to_batch(order[s + m : s + m + micro])) for m in range(0, global_batch, micro)]
        for s in range(0, len(order), global_batch)
    ]


def run(samples: int, batch_size: int, micro_batch: int, repeats: int, threads: int) -> dict[str, Any]:
    """Build the task, measure lengths, train both modes; return the figures."""
    _ensure_paths()
    import torch

    from mcl.config import load_config
    from mcl.data import Preprocessor, cached_processor, group_by_length, training_order
    from mcl.lengths import LengthCounter, order_lengths
    from mcl.logs import quiet_known_warnings
    from mcl.methods_api import TaskContext
    from mcl.models import resolve_model_path
    from mcl.streams.formats import read_llava_conversations
    from mcl.tiny_models import BUILTIN_MODELS

    quiet_known_warnings()
    torch.set_num_threads(threads)
    model_path = resolve_model_path("tiny-llava")
    words = [w for w in BUILTIN_MODELS["tiny-llava"].vocabulary() if w.isalpha() and w.islower()]
    cfg = load_config(DEFAULT_CONFIG, [f"train.batch_size={batch_size}", "train.epochs=1"])
    with tempfile.TemporaryDirectory() as tmp:
        train = read_llava_conversations(write_task(Path(tmp), samples, words), tmp, "spread")
        order = training_order(train, epochs=1, global_batch=batch_size, seed=cfg.train.seed)
        t0 = time.perf_counter()
        lengths = order_lengths(order, LengthCounter(cached_processor(model_path)))
        lengths_s = time.perf_counter() - t0
        grouped = group_by_length(order, lengths, global_batch=batch_size, micro_batch=micro_batch, seed=0)
        preprocess = Preprocessor(model_path, train=True)
        modes = {
            "off": _micro_batches(order, preprocess, batch_size, micro_batch),
            "on": _micro_batches(grouped, preprocess, batch_size, micro_batch),
        }
    by_row = dict(zip(order.index.tolist(), lengths.tolist(), strict=True))
    grouped_lengths = [by_row[i] for i in grouped.index.tolist()]
    ctx = TaskContext(task_index=0, task_names=("spread",), lora=cfg.model.lora, seed=cfg.train.seed)
    setup = {"cfg": cfg, "ctx": ctx, "model_path": model_path}
    train_epoch(setup, modes["off"][:WARMUP_STEPS])  # untimed: first-use costs land in neither mode
    passes: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for _ in range(repeats):
        for mode, batches in modes.items():
            passes[mode].append(train_epoch(setup, batches))
    best = {mode: max(p, key=lambda f: f["samples_per_s"]) for mode, p in passes.items()}
    return {
        "samples": samples,
        "global_batch": batch_size,
        "micro_batch": micro_batch,
        "steps": len(order) // batch_size,
        "torch_threads": threads,
        "length_stats": length_stats(list(by_row.values())),
        "lengths_s": lengths_s,
        "off": best["off"],
        "on": best["on"],
        "speedup": best["on"]["samples_per_s"] / best["off"]["samples_per_s"],
        "padding_by_workers": {
            f"{w} workers x micro {m}": {
                "off": padding_fraction(lengths, batch_size, w, m),
                "on": padding_fraction(
                    [
                        by_row[i]
                        for i in group_by_length(
                            order, lengths, global_batch=batch_size, num_workers=w, micro_batch=m
                        ).index.tolist()
                    ],
                    batch_size,
                    w,
                    m,
                ),
            }
            for w, m in ((2, micro_batch), (4, max(1, micro_batch // 2)))
            if batch_size % (w * m) == 0
        },
        # The same cut computed from the counted lengths: equal to the measured fractions when they are exact.
        "padding_from_lengths": {
            "off": padding_fraction(lengths, batch_size, 1, micro_batch),
            "on": padding_fraction(grouped_lengths, batch_size, 1, micro_batch),
        },
    }


def report(f: dict[str, Any]) -> str:
    """The figures as a short text table."""
    s = f["length_stats"]
    lines = [
        f"task: {f['samples']} samples, 1 epoch of {f['steps']} steps of {f['global_batch']} "
        f"(micro-batches of {f['micro_batch']}), {f['torch_threads']} torch threads",
        f"token lengths (prompt + image + answer): mean {s['mean']:.0f}, p50 {s['p50']:.0f}, "
        f"p95 {s['p95']:.0f}, max {s['max']:.0f}; counted in {f['lengths_s']:.2f} s",
        f"{'group_by_length':<28}{'off':>10}{'on':>10}",
        f"{'padding fraction':<28}{f['off']['padding_fraction']:>10.3f}{f['on']['padding_fraction']:>10.3f}",
        f"{'samples/s (epoch)':<28}{f['off']['samples_per_s']:>10.2f}{f['on']['samples_per_s']:>10.2f}",
        f"{'epoch time (s)':<28}{f['off']['train_s']:>10.2f}{f['on']['train_s']:>10.2f}",
    ]
    for name, pad in f["padding_by_workers"].items():
        lines.append(f"{'padding, ' + name:<28}{pad['off']:>10.3f}{pad['on']:>10.3f}")
    lines.append(f"speedup (samples/s on / off): {f['speedup']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4)  # a shared host is noisy: best of 4
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny task, one pass (what the test runs)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    options = {k: getattr(args, k) for k in ("samples", "batch_size", "micro_batch", "repeats")}
    if args.smoke:
        options.update(SMOKE)
    figures = run(**options, threads=args.threads)
    print(report(figures))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
