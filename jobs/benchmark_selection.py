"""Throughput of per-sample task selection (HiDe-LLaVA, DISCO, ModalPrompt) against answering with one task's
LoRA slice or prompt, and as tasks are added.

Usage:
    python jobs/benchmark_selection.py                         # hide_llava, disco, modalprompt (4 tasks)
    python jobs/benchmark_selection.py --methods disco --out selection.json eval.batch_size=16

For each method: train it through the stream in this process (``mcl.run.run_stream_locally``, one worker,
DeepSpeed off, a temporary folder removed afterwards), load the last task's state as an evaluation actor does
(``Method.load_for_evaluation``), then answer the same test samples (every task's, ``eval.max_samples_per_task``
each), in the same batches, two ways:

  selected  what the method's evaluation does: the forward hooks read each prompt's instruction and image
            features, the task weights come from the anchors, and the mixed layers weight every seen slice
            per sample (HiDe: the top layer, the rest fused; DISCO: every layer). One ``generate`` per batch.
  single    one LoRA slice in every layer (the hooks detached), or the last task's prompt inserted without
            features or selection: the cost of a single-adapter method's answer.

Also the ``selected`` evaluation with the state after the second task (``selected_at_2_tasks``), over the same
samples: whether the cost grows with the number of tasks.

Each mode first runs one untimed warm-up batch; then every batch runs in both modes back to back (the order
rotating), ``repeats`` times, and a mode's time is the sum over batches of each batch's best time. On CPU,
torch uses ``scaling.cpus_per_worker`` threads, as one Ray worker. Also reported: the selection accuracy
(percent of test samples whose largest task weight is their own task).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "default.yaml"
METHODS = ("hide_llava", "disco", "modalprompt")
LOCAL_SETTINGS = ("scaling.num_workers=1", "scaling.deepspeed=false")


def _ensure_paths() -> None:
    for path in (REPO / "platform", REPO, REPO / "jobs"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def selection_benchmark(
    method: str,
    overrides: Sequence[str] = (),
    *,
    config: str | Path = DEFAULT_CONFIG,
    repeats: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``method`` in-process and measure its selected evaluation against one slice.

    Returns ``{"settings": {...}, "selected"|"single": {"samples_per_s", "seconds"}, "ratio_selected_vs_single",
    "selection_acc"}``, with more than 2 tasks also ``"selected_at_2_tasks"`` and ``"ratio_last_vs_2_tasks"``.
    """
    _ensure_paths()
    import torch
    from benchmark_routing import test_batches

    from mcl.config import load_config
    from mcl.data import cached_processor
    from mcl.methods_api import TaskContext, build_method
    from mcl.models import load_model_and_processor
    from mcl.run import prepare_run, run_stream_locally

    if method not in METHODS:
        raise ValueError(f"selection_benchmark measures {', '.join(METHODS)}, not {method!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cfg = load_config(config, [*overrides, f"method.name={method}", *LOCAL_SETTINGS])
    prep = prepare_run(cfg, log=lambda _m: None)
    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="mcl-selection-bench-"))
    try:
        log(f"training {method} through {len(prep.stream.tasks)} tasks (in-process) into {work}")
        result = run_stream_locally(prep, work, log=lambda _m: None)
        device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(cfg.scaling.cpus_per_worker)
        dtype = getattr(torch, cfg.model.dtype)
        names = tuple(t.name for t in prep.stream.tasks)
        tokenizer = cached_processor(prep.model_path).tokenizer
        own, batches, gen = test_batches(prep, tokenizer, device, dtype)
        tasks = prep.stream.tasks

        def answerers(task: int) -> dict[str, Callable[[dict[str, Any]], Any]]:
            base, processor = load_model_and_processor(prep.model_path, dtype=cfg.model.dtype)
            ctx = TaskContext(task, names, cfg.model.lora, seed=cfg.train.seed, processor=processor)
            impl = build_method(method, cfg.method.params)
            model = impl.load_for_evaluation(base, Path(result.state_dirs[task]), ctx).to(device).eval()
            return _modes(method, impl, model, ctx, gen)

        last = len(names) - 1
        modes = answerers(last)
        for fn in modes.values():
            fn(batches[0])
        best, outputs = _time_interleaved(modes, batches, repeats, device)
        chosen = outputs["selected"]
        if last > 1:  # the same evaluation with the state after task 2: does the cost grow with the tasks?
            early = {"selected_at_2_tasks": answerers(1)["selected"]}
            early["selected_at_2_tasks"](batches[0])
            best.update(_time_interleaved(early, batches, repeats, device)[0])
        names_of_modes = list(best)
        n = len(own)
        figures: dict[str, Any] = {}
        for mode in names_of_modes:
            seconds = sum(best[mode])
            figures[mode] = {"samples_per_s": n / seconds, "seconds": seconds}
            log(f"{method} {mode:>8}: {n / seconds:9.1f} samples/s ({seconds:.3f}s for {n} samples)")
        picks = [c for batch_picks in chosen for c in batch_picks]
        figures.update(
            {
                "settings": {
                    "method": method,
                    "samples": n,
                    "batches": len(batches),
                    "batch_size": cfg.eval.batch_size,
                    "max_new_tokens": cfg.eval.max_new_tokens,
                    "tasks": len(tasks),
                    "repeats": repeats,
                    "device": str(device),
                    "dtype": cfg.model.dtype,
                    "torch_threads": torch.get_num_threads(),
                },
                "ratio_selected_vs_single": figures["selected"]["samples_per_s"]
                / figures["single"]["samples_per_s"],
                "selection_acc": 100.0 * sum(p == o for p, o in zip(picks, own, strict=True)) / n,
            }
        )
        if "selected_at_2_tasks" in figures:
            figures["ratio_last_vs_2_tasks"] = (
                figures["selected"]["samples_per_s"] / figures["selected_at_2_tasks"]["samples_per_s"]
            )
        return figures
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)


def _modes(method: str, impl: Any, model: Any, ctx: Any, gen: dict[str, Any]) -> dict[str, Callable[[Any], Any]]:
    """The method's own evaluation (``selected``: per-sample selection) and one task's adapter or prompt without
    selection (``single``: what a single-adapter method's answer costs)."""
    import torch

    from mcl.adapters import vision_tower

    def selected(batch: dict[str, Any]) -> list[int]:
        if method != "modalprompt":
            impl.selector.attach(model.get_input_embeddings(), vision_tower(model)[1])
            for layer, (mixing, seen) in zip(layers, saved, strict=True):
                layer.mixing, layer.seen = mixing, seen
        with torch.no_grad():
            return impl.generate(model, batch, gen, ctx)[1]["selected_task"]

    if method == "modalprompt":
        from methods.modalprompt import insert_prompts

        def single(batch: dict[str, Any]) -> None:  # the last task's prompt, no features, no selection
            ids = impl.embedding.prompt_ids(ctx.task_index, batch["input_ids"].device)
            prompted, _ = insert_prompts(batch, ids.expand(batch["input_ids"].shape[0], -1), impl.bos)
            with torch.no_grad():
                model.generate(**prompted, **gen)

        return {"selected": selected, "single": single}

    from methods.hide_llava import slice_layers

    layers = list(slice_layers(model).values())
    saved = [(layer.mixing, layer.seen) for layer in layers]

    def single(batch: dict[str, Any]) -> None:  # one slice in every layer, the selection hooks detached
        impl.selector.detach()
        for layer in layers:
            layer.mixing, layer.seen = "fused", 1
        with torch.no_grad():
            model.generate(**batch, **gen)

    return {"selected": selected, "single": single}


def _time_interleaved(
    modes: dict[str, Callable[[Any], Any]], batches: list[Any], repeats: int, device: Any
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Every batch in every mode back to back (the first mode rotating), ``repeats`` times: each batch's best
    time per mode, and each mode's last output per batch."""
    import torch

    names = list(modes)
    best = {m: [float("inf")] * len(batches) for m in names}
    outputs: dict[str, list[Any]] = {m: [None] * len(batches) for m in names}
    for r in range(repeats):
        for j, batch in enumerate(batches):
            k = (r + j) % len(names)
            for mode in names[k:] + names[:k]:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                outputs[mode][j] = modes[mode](batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best[mode][j] = min(best[mode][j], time.perf_counter() - t0)
    return best, outputs


def format_selection_report(figures: dict[str, Any]) -> str:
    s = figures["settings"]
    return "\n".join(
        [
            f"{s['method']}: {s['samples']} test samples of {s['tasks']} tasks, batch {s['batch_size']}, "
            f"max_new_tokens {s['max_new_tokens']}, {s['device']} ({s['dtype']})",
            f"  selected  {figures['selected']['samples_per_s']:9.1f} samples/s",
            f"  single    {figures['single']['samples_per_s']:9.1f} samples/s",
            f"  selected / single  {figures['ratio_selected_vs_single']:.3f}; "
            f"selection accuracy {figures['selection_acc']:.1f}%",
        ]
        + (
            [
                f"  selected with 2 tasks trained {figures['selected_at_2_tasks']['samples_per_s']:9.1f} "
                f"samples/s; {s['tasks']} tasks / 2 tasks {figures['ratio_last_vs_2_tasks']:.3f}"
            ]
            if "selected_at_2_tasks" in figures
            else []
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; each batch's best time counts")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    all_figures = {}
    for method in args.methods.split(","):
        figures = selection_benchmark(method, args.overrides, config=args.config, repeats=args.repeats)
        print(format_selection_report(figures))
        all_figures[method] = figures
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(all_figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
