"""Per-task training and evaluation at real scale on one GPU: tokens/s, MFU, peak memory.

Builds a random-weight LLaVA-1.5-7B-architecture checkpoint (Llama-2-7B text model + CLIP ViT-L/14-336,
576 image tokens per image) with the same builder as the tiny test model, then runs mcl's per-task function
(`mcl.worker.local.run_task_locally`: the code a Ray Train worker runs, without Ray) on the generated stream
with LoRA in bf16, and prints the figures. No Ray, MLflow or DeepSpeed needed, so it runs on a bare GPU box.

Usage:
    python jobs/benchmark_gpu.py --out gpu.json                      # 7B shape on cuda, LoRA r=128
    python jobs/benchmark_gpu.py --shape tiny --steps 4 --device cpu  # smoke run (what the tests do)

FLOPs model (printed with the figures): the language model runs forward and backward (activation
gradients only: its weights are frozen, LoRA's are tiny), ~4 * N_lm FLOPs per token; the frozen vision
tower runs forward only, ~2 * N_vision per image token. MFU = those FLOPs per second / peak (790 TFLOP/s
bf16 for an H200 by default). "MFU (6N)" uses the full-fine-tuning convention 6 * N per token instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mcl.config import load_config
    from mcl.data import Preprocessor, rows_to_batch, sample_row, training_order
    from mcl.streams import build_stream
    from mcl.tiny_models import BUILTIN_MODELS, LLAVA_15_7B, TINY_LLAVA, build_random_model
    from mcl.worker.job import TaskJob
    from mcl.worker.local import run_task_locally

    work = Path(args.workdir).resolve()
    shape = LLAVA_15_7B if args.shape == "7b" else TINY_LLAVA
    dtype = args.dtype or ("bfloat16" if args.shape == "7b" else "float32")
    model_dir = work / f"llava-{args.shape}-random"
    t0 = time.perf_counter()
    if not (model_dir / "config.json").exists():
        print(f"building a random {args.shape} LLaVA in {model_dir} on {args.device} ({dtype})", flush=True)
        vocabulary = BUILTIN_MODELS["tiny-llava"].vocabulary()
        build_random_model("llava", model_dir, vocabulary, shape, device=args.device, dtype=dtype)
    build_s = time.perf_counter() - t0

    n_train = args.batch_size * args.steps
    stream = build_stream(
        "generated",
        work / "data",
        {"train_per_task": n_train, "test_per_task": args.eval_samples, "tasks": ["aerial"]},
    )
    task = stream.tasks[0]
    cfg = load_config(
        None,
        [
            f"model.name={model_dir}",
            f"model.dtype={dtype}",
            f"model.lora.r={args.lora_r}",
            f"model.lora.alpha={2 * args.lora_r}",
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            f"train.batch_size={args.batch_size}",
            "train.epochs=1",
            f"train.log_every={max(1, args.steps // 5)}",
            f"eval.batch_size={args.eval_batch_size}",
            "eval.max_new_tokens=4",
        ],
    )
    rows = training_order(task.train, epochs=1, global_batch=args.batch_size, seed=0)
    eval_rows = [sample_row(s) for s in task.test]
    sample = Preprocessor(str(model_dir), train=True)(rows_to_batch(rows[: args.batch_size]))
    tokens_per_sample = float(sum(len(ids) for ids in sample["input_ids"]) / args.batch_size)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    job = TaskJob(cfg.to_dict(), str(model_dir), 0, stream.task_names, None, len(rows) // args.batch_size)
    t0 = time.perf_counter()
    result = run_task_locally(job, rows, eval_rows, work / "task", device=device)
    task_wall_s = time.perf_counter() - t0
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None

    from transformers import AutoConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        meta = LlavaForConditionalGeneration(AutoConfig.from_pretrained(model_dir))
    n_lm = _params(meta.model.language_model) + _params(meta.lm_head)
    n_vision = _params(meta.model.vision_tower)
    image_tokens = (shape.image_size // shape.patch_size) ** 2 + 1
    flops_per_sample = 4 * n_lm * tokens_per_sample + 2 * n_vision * image_tokens
    flops_6n = 6 * (n_lm * tokens_per_sample + n_vision * image_tokens)
    sps = result.timing["steady_samples_per_s"]
    peak = args.peak_tflops * 1e12
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": args.shape,
        "dtype": dtype,
        "lora_r": args.lora_r,
        "batch_size": args.batch_size,
        "steps": len(result.train_log),
        "params_language_model": n_lm,
        "params_vision_tower": n_vision,
        "tokens_per_sample": tokens_per_sample,
        "train_samples_per_s": sps,
        "train_tokens_per_s": sps * tokens_per_sample,
        "mfu": sps * flops_per_sample / peak,
        "mfu_6n": sps * flops_6n / peak,
        "eval_samples_per_s": result.timing["eval_samples"] / result.timing["eval_s"],
        "peak_memory_gib": peak_gib,
        "model_build_s": build_s,
        "task_setup_s": result.timing["setup_s"],
        "task_wall_s": task_wall_s,
        "first_loss": result.train_log[0]["loss"],
        "last_loss": result.train_log[-1]["loss"],
        "peak_tflops": args.peak_tflops,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=("7b", "tiny"), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="", help="default: bfloat16 for 7b, float32 for tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--lora-r", type=int, default=128, help="MR-LoRA's rank on LLaVA-1.5-7B")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak of the GPU (H200: ~790)")
    parser.add_argument("--workdir", default="/tmp/mcl-gpu-bench")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    fig = run(args)
    print()
    for key, value in fig.items():
        print(f"{key:24} {value:.4g}" if isinstance(value, float) else f"{key:24} {value}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(fig, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
