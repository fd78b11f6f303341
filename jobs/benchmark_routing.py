"""Throughput of MR-LoRA's routed evaluation against one adapter and against running every expert.

Usage:
    python jobs/benchmark_routing.py                              # train MR-LoRA (default config, 4 tasks), measure
    python jobs/benchmark_routing.py --state RUN/task03-indoor-router/state   # measure a saved MR-LoRA state
    python jobs/benchmark_routing.py --out routing.json eval.batch_size=16 eval.max_samples_per_task=20

Over the same test samples (every task's, ``eval.max_samples_per_task`` each), the same batches
(``eval.batch_size``) and the same greedy settings (``eval.max_new_tokens``), three ways of answering:

  routed  what MR-LoRA's evaluation does: one router forward per batch, then one mixed-adapter
          ``generate`` (``adapter_names`` = each sample's expert).
  single  one adapter, as any single-LoRA method evaluates: the last task's expert active, one ``generate``.
  naive   the approach routing avoids: the same router forward, then one ``generate`` per expert over the
          whole batch, keeping each sample's answer from its routed expert (experts x the generation work).
  dispatch  the mixed-adapter ``generate`` alone, with each batch's routes computed before timing: what
          routed inference would cost if the router were free (the bound on routed / single).

Each mode first runs one untimed warm-up batch. Then every batch runs in the three modes back to back (the
order rotating), ``repeats`` times; a mode's time is the sum over batches of each batch's best time, so all
modes see the same machine load. On CPU, torch uses ``scaling.cpus_per_worker`` threads, as one Ray worker.
The routed answers must equal the naive ones for the same routes (``predictions_equal``).
Training (without ``--state``) runs in this process without Ray (``mcl.run.run_stream_locally``, one
worker, DeepSpeed off) into a temporary folder that is removed afterwards.
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
# Always in-process, one worker, no DeepSpeed: this measures inference, not the distributed trainer.
LOCAL_SETTINGS = ("method.name=mr_lora", "scaling.num_workers=1", "scaling.deepspeed=false")


def _ensure_paths() -> None:
    for path in (REPO / "platform", REPO):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def routing_benchmark(
    overrides: Sequence[str] = (),
    *,
    config: str | Path = DEFAULT_CONFIG,
    state_dir: str | Path | None = None,
    repeats: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train MR-LoRA (or load ``state_dir``) and measure routed, single-adapter and naive evaluation.

    Args:
        overrides: ``key=value`` config overrides (``eval.batch_size``, ``eval.max_samples_per_task``,
            ``eval.max_new_tokens``, ``stream.*``, ``train.*``, ``method.params.*``, ``scaling.use_gpu``...);
            the method is always ``mr_lora``, trained in-process with one worker and no DeepSpeed.
        config: The experiment YAML (default: ``jobs/configs/default.yaml``).
        state_dir: A saved MR-LoRA state after a ``router`` phase (``<run>/taskNN-<name>-router/state``);
            None trains through the whole stream first.
        repeats: Timed passes over all batches (per batch and mode, the best time counts).
        log: Progress printer.

    Returns:
        ``{"settings": {...}, "routed"|"single"|"naive": {"samples_per_s", "seconds", "generate_calls",
        "forward_calls"}, "ratio_routed_vs_single", "ratio_routed_vs_naive", "predictions_equal",
        "mismatches", "router_fallback_rate", "experts_used": {expert: samples}}``.
    """
    _ensure_paths()
    import torch

    from mcl.config import load_config
    from mcl.models import load_model_and_processor
    from mcl.run import prepare_run, run_stream_locally
    from methods.mr_lora import (
        ROUTER,
        expert_name,
        load_routed_model,
        read_state,
        route,
        routed_generate,
        router_tokens,
    )

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cfg = load_config(config, [*overrides, *LOCAL_SETTINGS])
    prep = prepare_run(cfg, log=log)
    work = None
    threads = torch.get_num_threads()
    try:
        if state_dir is None:
            work = Path(tempfile.mkdtemp(prefix="mcl-routing-bench-"))
            log(f"training mr_lora through {len(prep.stream.tasks)} tasks (in-process) into {work}")
            result = run_stream_locally(prep, work, log=lambda _m: None)
            state_dir = result.state_dirs[-1]
        experts = read_state(state_dir)["experts"]
        device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        if device.type == "cpu":  # as one Ray worker evaluates (OMP_NUM_THREADS = scaling.cpus_per_worker)
            torch.set_num_threads(cfg.scaling.cpus_per_worker)
        dtype = getattr(torch, cfg.model.dtype)
        base, processor = load_model_and_processor(
            prep.model_path, trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype
        )
        model = load_routed_model(base, state_dir).to(device)
        tokenizer = processor.tokenizer
        _, batches, gen = test_batches(prep, tokenizer, device, dtype)
        tokens = router_tokens(processor, len(experts))
        single_expert = experts[-1]

        def routed(batch: dict[str, Any]) -> tuple[list[str], list[int], list[bool]]:
            chosen, fell_back = route(model, batch, tokens)
            out = routed_generate(model, batch, gen, chosen)
            return tokenizer.batch_decode(out, skip_special_tokens=True), chosen, fell_back

        def single(batch: dict[str, Any]) -> list[str]:
            model.set_adapter(single_expert, inference_mode=True)
            with torch.no_grad():
                out = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1] :]
            model.set_adapter(ROUTER, inference_mode=True)  # as load_routed_model leaves it, for route()
            return tokenizer.batch_decode(out, skip_special_tokens=True)

        def naive(batch: dict[str, Any]) -> tuple[list[str], list[int]]:
            chosen, _ = route(model, batch, tokens)
            answers: list[list[str]] = []
            for name in experts:
                model.set_adapter(name, inference_mode=True)
                with torch.no_grad():
                    out = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1] :]
                answers.append(tokenizer.batch_decode(out, skip_special_tokens=True))
            model.set_adapter(ROUTER, inference_mode=True)
            return [answers[e][i] for i, e in enumerate(chosen)], chosen

        dispatch = _dispatch_mode(model, batches, tokens, gen, tokenizer)
        modes: dict[str, Callable[[dict[str, Any]], Any]] = {
            "routed": routed,
            "single": single,
            "naive": naive,
            "dispatch": dispatch,
        }
        calls = {
            "routed": {"forward_calls": 1, "generate_calls": 1},
            "single": {"forward_calls": 0, "generate_calls": 1},
            "naive": {"forward_calls": 1, "generate_calls": len(experts)},
            "dispatch": {"forward_calls": 0, "generate_calls": 1},
        }
        figures: dict[str, Any] = {}
        n = sum(int(b["input_ids"].shape[0]) for b in batches)
        names = list(modes)
        for fn in modes.values():
            fn(batches[0])  # warm-up (kernels, caches), untimed
        # Interleaved: every batch runs in every mode back to back (rotating which goes first), so the three
        # modes see the same machine load; each batch's time per mode is its best over the repeats.
        best = {mode: [float("inf")] * len(batches) for mode in names}
        outputs: dict[str, list[Any]] = {mode: [None] * len(batches) for mode in names}
        for r in range(repeats):
            for j, batch in enumerate(batches):
                k = (r + j) % len(names)
                for mode in names[k:] + names[:k]:
                    _sync(device)
                    t0 = time.perf_counter()
                    outputs[mode][j] = modes[mode](batch)
                    _sync(device)
                    best[mode][j] = min(best[mode][j], time.perf_counter() - t0)
        for mode in names:
            seconds = sum(best[mode])
            figures[mode] = {
                "samples_per_s": n / seconds,
                "seconds": seconds,
                **{k: v * len(batches) for k, v in calls[mode].items()},
            }
            log(
                f"{mode:>6}: {n / seconds:9.1f} samples/s ({seconds:.3f}s for {n} samples in {len(batches)} batches)"
            )
        routed_texts = [t.strip() for texts, _, _ in outputs["routed"] for t in texts]
        routed_experts = [e for _, chosen, _ in outputs["routed"] for e in chosen]
        fallbacks = [f for _, _, fell in outputs["routed"] for f in fell]
        naive_texts = [t.strip() for texts, _ in outputs["naive"] for t in texts]
        naive_experts = [e for _, chosen in outputs["naive"] for e in chosen]
        mismatches = sum(a != b for a, b in zip(routed_texts, naive_texts, strict=True))
        used: dict[str, int] = {}
        for e in routed_experts:
            used[expert_name(e)] = used.get(expert_name(e), 0) + 1
        figures.update(
            {
                "settings": {
                    "samples": n,
                    "batches": len(batches),
                    "batch_size": cfg.eval.batch_size,
                    "max_new_tokens": cfg.eval.max_new_tokens,
                    "experts": len(experts),
                    "single_expert": single_expert,
                    "repeats": repeats,
                    "device": str(device),
                    "dtype": cfg.model.dtype,
                    "model": prep.model_path,
                    "torch_threads": torch.get_num_threads(),
                },
                "ratio_routed_vs_single": figures["routed"]["samples_per_s"]
                / figures["single"]["samples_per_s"],
                "ratio_routed_vs_naive": figures["routed"]["samples_per_s"]
                / figures["naive"]["samples_per_s"],
                # The bound on routed / single with a free router: the mixed-adapter generate alone.
                "ratio_dispatch_vs_single": figures["dispatch"]["samples_per_s"]
                / figures["single"]["samples_per_s"],
                "predictions_equal": mismatches == 0 and routed_experts == naive_experts,
                "mismatches": mismatches,
                "router_fallback_rate": sum(fallbacks) / len(fallbacks) if fallbacks else 0.0,
                "experts_used": used,
            }
        )
        return figures
    finally:
        torch.set_num_threads(threads)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def test_batches(
    prep: Any, tokenizer: Any, device: Any, dtype: Any
) -> tuple[list[int], list[Any], dict[str, Any]]:
    """Every task's test samples (``eval.max_samples_per_task`` each) as left-padded evaluation batches on
    ``device``, each sample's task index, and the run's greedy generation settings."""
    from mcl.data import Preprocessor, collate, local_batches, sample_row
    from mcl.worker.engine import to_device

    cfg = prep.config
    limit = cfg.eval.max_samples_per_task
    samples = [(i, s) for i, t in enumerate(prep.stream.tasks) for s in (t.test[:limit] if limit else t.test)]
    pre = Preprocessor(prep.model_path, train=False, trust_remote_code=cfg.model.trust_remote_code)
    batches = [
        to_device(collate(b, tokenizer.pad_token_id, left_pad=True), device, dtype)
        for b in local_batches([sample_row(s) for _, s in samples], pre, cfg.eval.batch_size)
    ]
    gen = {
        "max_new_tokens": cfg.eval.max_new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return [i for i, _ in samples], batches, gen


def _dispatch_mode(
    model: Any, batches: list[dict[str, Any]], tokens: Any, gen: dict[str, Any], tokenizer: Any
) -> Callable[[dict[str, Any]], list[str]]:
    """The mixed-adapter ``generate`` alone, each batch's routes computed once here, before timing: what routed
    inference would cost with a free router."""
    from methods.mr_lora import route, routed_generate

    routes = {id(b): route(model, b, tokens)[0] for b in batches}

    def dispatch(batch: dict[str, Any]) -> list[str]:
        out = routed_generate(model, batch, gen, routes[id(batch)])
        return tokenizer.batch_decode(out, skip_special_tokens=True)

    return dispatch


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", "") == "cuda":
        torch.cuda.synchronize(device)


def format_routing_report(figures: dict[str, Any]) -> str:
    """The figures of :func:`routing_benchmark` as text: rates per mode and the two ratios."""
    s = figures["settings"]
    lines = [
        f"{s['samples']} test samples, batch {s['batch_size']}, {s['experts']} experts, "
        f"max_new_tokens {s['max_new_tokens']}, {s['device']} ({s['dtype']})"
    ]
    for mode in ("routed", "single", "naive", "dispatch"):
        f = figures[mode]
        lines.append(
            f"  {mode:>6}  {f['samples_per_s']:9.1f} samples/s  "
            f"({f['forward_calls']} router forwards, {f['generate_calls']} generate calls)"
        )
    lines += [
        f"  routed / single  {figures['ratio_routed_vs_single']:.3f}",
        f"  routed / naive   {figures['ratio_routed_vs_naive']:.3f}",
        f"  dispatch / single {figures['ratio_dispatch_vs_single']:.3f} (the mixed-adapter generate alone, routes given:"
        " routed / single with a free router)",
        f"  routed answers equal naive answers for the same routes: {figures['predictions_equal']} "
        f"({figures['mismatches']} mismatches); router fallback rate {figures['router_fallback_rate']:.3f}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML")
    parser.add_argument(
        "--state", default=None, help="saved MR-LoRA state after a router phase (skip training)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; each batch's best time counts")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    figures = routing_benchmark(
        args.overrides, config=args.config, state_dir=args.state, repeats=args.repeats
    )
    print(format_routing_report(figures))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
