"""Evaluation batches: padding fraction and samples/s of greedy evaluation, as it was vs sorted by prompt length
(``eval.sort_by_length``) and stopped per answer type (``eval.max_new_tokens_by_type``,
``eval.stop_strings_by_type``), and how many answers change (must be 0).

Usage:
    python jobs/benchmark_eval_batches.py                    # 192 test rows, batches of 8, 16 new tokens
    python jobs/benchmark_eval_batches.py --out eval.json    # also write the figures as JSON
    python jobs/benchmark_eval_batches.py --smoke            # 24 rows, batches of 4, 8 tokens (the test runs it)

The test rows: ``--samples`` rows over a pool of real PNGs, prompt lengths spread as in a multimodal test
mix: 50% short VQA (question 6-15 words, answer type ``exact``), 30% multiple choice with its options listed
(20-60 words, ``choice``), 20% long reading questions (80-200 words, ``contains``); words from the tiny
model's vocabulary (one token each). Prompt lengths (chat template + image tokens) are counted by
``mcl.lengths.prompt_lengths`` and printed (mean, p50, p95, max).

Three modes evaluate the same rows with the tiny LLaVA (untrained LoRA) through
:class:`mcl.evaluation.generation.GenerationEvaluator`, one worker, in this process:

* ``before``: the rows in their order, every row generating up to ``--max-new-tokens``;
* ``sorted``: ``eval.sort_by_length`` (``mcl.data.evaluation_order``), the same generation;
* ``after``: sorted, grouped by answer type and stopped per type: ``choice`` 2 tokens, ``exact`` 6, ``contains``
  ``--max-new-tokens``, each type's stop string the word the model says most often after its first in
  ``before`` (what ``.`` or a newline is for a trained model).

Rows are preprocessed before the clock; each batch is collated and generated inside it. Padding fraction =
padded prompt tokens / all prompt tokens of the batches (also computed from the lengths for 2 workers, each
rank batching its shard ``rank::2``). Samples/s is wall-clock; samples per CPU-second divides by this
process's CPU time, which a shared host disturbs less. The modes take turns ``--repeats`` times; the best pass
counts. Answers changed: ``sorted`` vs ``before`` prediction by prediction; ``after`` vs ``before``'s answers
cut the same way (first ``k`` tokens of the type, then at the first stop string).
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
MIX = (  # share, words in the question, answer type
    (0.50, (6, 15), "exact"),
    (0.30, (20, 60), "choice"),
    (0.20, (80, 200), "contains"),
)
TYPE_TOKENS = {"choice": 2, "exact": 6}  # max_new_tokens_by_type; contains: --max-new-tokens
IMAGE_POOL = 8
SMOKE = {"samples": 24, "batch_size": 4, "max_new_tokens": 8, "repeats": 1}


def _ensure_paths() -> None:
    for path in (REPO / "platform", REPO):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def make_rows(folder: Path, n: int, words: list[str], seed: int = 0) -> list[dict[str, Any]]:
    """``n`` annotation rows (see the module doc) over an image pool written to ``folder``."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed)
    for k in range(IMAGE_POOL):
        Image.fromarray(pixels.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        _, span, kind = rng.choices(MIX, weights=[share for share, _, _ in MIX])[0]
        question = " ".join(rng.choice(words) for _ in range(rng.randint(*span)))
        rows.append(
            {
                "id": f"row-{i:05d}",
                "image": str(folder / f"{i % IMAGE_POOL}.png"),
                "question": f"{question} ?",
                "answer": rng.choice(words),
                "answer_type": kind,
                "task": "spread",
                "supervised": True,
            }
        )
    return rows


def sharded_padding(lengths: list[int], batch: int, world: int) -> float:
    """Padding fraction when each of ``world`` ranks batches its shard (positions ``rank::world``)."""
    from mcl.lengths import padding_fraction

    padded = sum(
        padding_fraction(lengths[r::world], batch) * _tokens(lengths[r::world], batch) for r in range(world)
    )
    return padded / sum(_tokens(lengths[r::world], batch) for r in range(world))


def _tokens(lengths: list[int], batch: int) -> int:
    return sum(
        max(lengths[s : s + batch]) * len(lengths[s : s + batch]) for s in range(0, len(lengths), batch)
    )


def evaluate(
    evaluator: Any, batches: list[dict[str, Any]], ctx: Any
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Records of one pass over ``batches`` and its samples/s (wall) and samples per CPU-second."""
    wall, cpu = time.perf_counter(), time.process_time()
    records = evaluator.predict(batches, ctx)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = sum(len(b["input_ids"]) for b in batches)
    return records, {"samples_per_s": n / wall, "samples_per_cpu_s": n / cpu, "eval_s": wall}


def _stop_words(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per answer type, the word the model says most often after its first."""
    out: dict[str, list[str]] = {}
    for kind in sorted({r["answer_type"] for r in records}):
        later = [w for r in records if r["answer_type"] == kind for w in r["prediction"].split()[1:]]
        if later:
            out[kind] = [max(sorted(set(later)), key=later.count)]
    return out


class TokenRecorder:
    """The method, with the new tokens of every ``generate`` call kept in call order (``tokens``)."""

    def __init__(self, method: Any) -> None:
        self.method, self.tokens = method, []

    def generate(self, model: Any, batch: Any, kwargs: dict[str, Any], ctx: Any) -> Any:
        out = self.method.generate(model, batch, kwargs, ctx)
        self.tokens.extend(out[0] if isinstance(out, tuple) else out)
        return out


def cut_reference(records: list[dict[str, Any]], tokens: list[Any], limits: Any, tokenizer: Any) -> list[str]:
    """``before``'s answers (its records and new tokens, in order) cut as ``after`` cuts its own: the type's
    first ``k`` new tokens, then at its first stop string."""
    from mcl.evaluation.generation import cut_at_stop

    out = []
    for r, ids in zip(records, tokens, strict=True):
        text = tokenizer.decode(ids[: limits.tokens(r["answer_type"])], skip_special_tokens=True)
        out.append(cut_at_stop(text, limits.stops(r["answer_type"])).strip())
    return out


def run(samples: int, batch_size: int, max_new_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    """Build the rows, measure lengths, evaluate the three modes; return the figures."""
    _ensure_paths()
    import numpy as np
    import torch

    from mcl.config import load_config
    from mcl.data import AnswerOrder, Preprocessor, evaluation_order, local_batches
    from mcl.evaluation.generation import AnswerLimits, GenerationEvaluator
    from mcl.lengths import prompt_lengths
    from mcl.logs import quiet_known_warnings
    from mcl.methods_api import TaskContext, build_method
    from mcl.models import load_model_and_processor, resolve_model_path
    from mcl.tiny_models import BUILTIN_MODELS

    quiet_known_warnings()
    torch.set_num_threads(threads)
    model_path = resolve_model_path("tiny-llava")
    words = [w for w in BUILTIN_MODELS["tiny-llava"].vocabulary() if w.isalpha() and w.islower()]
    cfg = load_config(REPO / "jobs" / "configs" / "default.yaml", [])
    base, processor = load_model_and_processor(model_path, dtype=cfg.model.dtype)
    method = build_method("sequential_lora", {})
    ctx = TaskContext(task_index=0, task_names=("spread",), lora=cfg.model.lora, seed=0, processor=processor)
    model = method.setup_model(base, ctx).eval()
    pre = Preprocessor(model_path, train=False)
    with tempfile.TemporaryDirectory() as tmp:
        rows = make_rows(Path(tmp), samples, words)
        t0 = time.perf_counter()
        lengths = prompt_lengths(rows, model_path)
        lengths_s = time.perf_counter() - t0
        kinds = [r["answer_type"] for r in rows]
        orders = {
            "before": np.arange(len(rows)),
            "sorted": evaluation_order(lengths),
            "after": evaluation_order(lengths, kinds),
        }
        batches = {m: list(local_batches(AnswerOrder(rows, o), pre, batch_size)) for m, o in orders.items()}

    def evaluator(limits: Any) -> Any:
        return GenerationEvaluator(model, method, processor, limits, torch.device("cpu"), torch.float32)

    plain = evaluator(max_new_tokens)
    evaluate(plain, batches["before"][:2], ctx)  # untimed warm-up
    recorder = TokenRecorder(method)
    recording = GenerationEvaluator(
        model, recorder, processor, max_new_tokens, torch.device("cpu"), torch.float32
    )
    before, _ = evaluate(recording, batches["before"], ctx)  # in the rows' order: tokens match records
    limits = AnswerLimits(max_new_tokens, TYPE_TOKENS, _stop_words(before))
    evaluators = {"before": plain, "sorted": plain, "after": evaluator(limits)}
    passes: dict[str, list[dict[str, float]]] = {m: [] for m in orders}
    records: dict[str, list[dict[str, Any]]] = {}
    for _ in range(repeats):
        for mode in orders:
            records[mode], timing = evaluate(evaluators[mode], batches[mode], ctx)
            passes[mode].append(timing)
    best = {m: max(p, key=lambda f: f["samples_per_cpu_s"]) for m, p in passes.items()}
    reference = cut_reference(before, recorder.tokens, limits, processor.tokenizer)
    figures_before = [r["prediction"] for r in before]
    figures: dict[str, Any] = {
        "samples": samples,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "torch_threads": threads,
        "lengths_s": lengths_s,
        "length_stats": _stats(lengths),
        "max_new_tokens_by_type": TYPE_TOKENS,
        "stop_strings_by_type": limits.stop_strings_by_type,
        "answers_changed": {
            "before": sum(
                a != b["prediction"] for a, b in zip(figures_before, records["before"], strict=True)
            ),
            "sorted": sum(
                a["prediction"] != b["prediction"]
                for a, b in zip(records["before"], records["sorted"], strict=True)
            ),
            "after": sum(ref != r["prediction"] for ref, r in zip(reference, records["after"], strict=True)),
        },
        "changed_after": [
            {
                "id": b["id"],
                "type": b["answer_type"],
                "before": b["prediction"],
                "cut": ref,
                "after": a["prediction"],
            }
            for b, ref, a in zip(before, reference, records["after"], strict=True)
            if ref != a["prediction"]
        ],
        "original_order": all([r["id"] for r in records[m]] == [r["id"] for r in rows] for m in orders),
    }
    for mode, order in orders.items():
        ordered = [int(lengths[i]) for i in order]
        figures[mode] = {
            **best[mode],
            "padding_fraction": _batch_padding(batches[mode]),
            "padding_2_workers": sharded_padding(ordered, batch_size, 2),
        }
    figures["speedup_cpu"] = best["after"]["samples_per_cpu_s"] / best["before"]["samples_per_cpu_s"]
    return figures


def _batch_padding(batches: list[dict[str, Any]]) -> float:
    """Padded / all prompt tokens of the preprocessed batches (from their ``input_ids``)."""
    padded = total = 0
    for b in batches:
        sizes = [len(ids) for ids in b["input_ids"]]
        padded += max(sizes) * len(sizes) - sum(sizes)
        total += max(sizes) * len(sizes)
    return padded / total


def _stats(lengths: Any) -> dict[str, float]:
    import numpy as np

    return {
        "mean": float(np.mean(lengths)),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": float(np.max(lengths)),
    }


def report(f: dict[str, Any]) -> str:
    """The figures as a short text table."""
    s = f["length_stats"]
    modes = ("before", "sorted", "after")
    rows = (
        ("padding fraction", "padding_fraction", ".3f"),
        ("padding, 2 workers", "padding_2_workers", ".3f"),
        ("samples/s (wall)", "samples_per_s", ".2f"),
        ("samples per CPU-second", "samples_per_cpu_s", ".2f"),
        ("eval time (s)", "eval_s", ".2f"),
    )
    lines = [
        f"test rows: {f['samples']}, batches of {f['batch_size']}, max_new_tokens {f['max_new_tokens']}, "
        f"{f['torch_threads']} torch threads",
        f"prompt lengths (prompt + image tokens): mean {s['mean']:.0f}, p50 {s['p50']:.0f}, p95 {s['p95']:.0f}, "
        f"max {s['max']:.0f}; counted in {f['lengths_s']:.2f} s",
        f"after: max_new_tokens_by_type {f['max_new_tokens_by_type']}, stop_strings_by_type "
        f"{f['stop_strings_by_type']}",
        f"{'':<26}" + "".join(f"{m:>10}" for m in modes),
        *(f"{name:<26}" + "".join(f"{f[m][key]:>10{fmt}}" for m in modes) for name, key, fmt in rows),
        f"answers changed: sorted {f['answers_changed']['sorted']}, after {f['answers_changed']['after']} "
        f"(of {f['samples']}); predictions in the original order: {f['original_order']}",
        f"speedup (samples per CPU-second, after / before): {f['speedup_cpu']:.2f}x",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)  # a shared host is noisy: best of 3
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny test set, one pass (what the test runs)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    options = {k: getattr(args, k) for k in ("samples", "batch_size", "max_new_tokens", "repeats")}
    if args.smoke:
        options.update(SMOKE)
    figures = run(**options, threads=args.threads)
    print(report(figures))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
