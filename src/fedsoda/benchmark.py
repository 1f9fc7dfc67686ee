"""Measurements behind ``fedsoda bench``: the client step of one method in a fresh process.

``python -m fedsoda.benchmark --folder CLIENT_MODEL ...`` loads a client model folder (as
clients hold it), and prints JSON with

- peak memory of the training steps: peak RSS above the post-import baseline on CPU
  (``fedsoda.accounting``'s window), ``torch.cuda.max_memory_allocated`` on CUDA;
- FLOPs of one step (``torch.utils.flop_counter``, with formulas for the 4-bit matmuls of
  bitsandbytes and CPU flash attention, which it does not know);
- the median time of ``steps`` training steps after ``warmup``, without and (for a model
  with a frozen emulator) with the activation cache warm for every example drawn.

The workload is fixed-length sequences built from real SST-2 training examples: a k-shot
prompt ("Review: ...\\nSentiment: positive" shots, then the target review) cut from the left
to exactly ``seq_len`` tokens, with the loss on the target's answer token(s) only.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedsoda.accounting import peak_since_window, start_peak_window

POOL_BATCHES = 4  # steps draw their mini-batches from batch_size * POOL_BATCHES examples


def fixed_length_examples(tokenizer, seq_len: int, count: int, data_dir: str | None,
                          seed: int = 0) -> list[dict[str, list[int]]]:
    """``count`` SST-2 training examples as k-shot prompts of exactly ``seq_len`` tokens."""
    from fedsoda.data.task import IGNORE_INDEX, encode_for_training, load_rows, special_prefix
    from fedsoda.data.tasks import get_task

    task = get_task("sst2")
    rows = load_rows(task, task.train_split, data_dir)
    order = random.Random(seed).sample(range(len(rows)), min(len(rows), count * 16))
    special = special_prefix(tokenizer)
    targets, shots = order[:count], iter(order[count:])
    out = []
    for index in targets:
        target = encode_for_training(tokenizer, task.to_example(rows[index]), seq_len - len(special))
        ids, labels = target["input_ids"][len(special):], target["labels"][len(special):]
        need = seq_len - len(special) - len(ids)
        context: list[int] = []
        while len(context) < need:
            shot = task.to_example(rows[next(shots)])
            context = list(tokenizer(shot.prompt + shot.answer + "\n\n",
                                     add_special_tokens=False)["input_ids"]) + context
        context = context[len(context) - need:] if need else []
        out.append({"input_ids": special + context + ids,
                    "labels": [IGNORE_INDEX] * (len(special) + need) + labels})
    return out


def _flop_formulas() -> dict:
    """FLOP formulas for ops ``FlopCounterMode`` does not count by itself."""
    from torch.utils import flop_counter

    def gemm_4bit(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(out_shape) * a_shape[-1]

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    formulas = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_flash_backward}
    try:
        import bitsandbytes  # noqa: F401  registers torch.ops.bitsandbytes

        formulas[torch.ops.bitsandbytes.gemm_4bit] = gemm_4bit
    except ImportError:
        pass
    return formulas


def count_flops(step: Callable[[], object]) -> int:
    """Matmul and attention FLOPs of one call of ``step`` (causal attention counted in full)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_formulas()) as counter:
        step()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], object], count: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(count):
        _sync(device)
        began = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - began)
    return times


def matmul_throughput(device: str, m: int, k: int, n: int, seconds: float = 1.0) -> dict:
    """FLOP/s of ``[m, k] @ [k, n]`` in float32 and bfloat16 (the client's layer shapes) and of
    a large square matmul; the best of these is the machine's peak the steps are held to."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for shape in ((m, k, n), (2048, 2048, 2048)):
            a = torch.randn(shape[0], shape[1], dtype=dtype, device=device)
            b = torch.randn(shape[1], shape[2], dtype=dtype, device=device)
            a @ b
            calls = 0
            _sync(torch.device(device))
            began = time.perf_counter()
            while time.perf_counter() - began < seconds / 2 or calls < 2:
                a @ b
                calls += 1
                _sync(torch.device(device))
            rate = 2 * math.prod(shape) * calls / (time.perf_counter() - began)
            out[f"{str(dtype).removeprefix('torch.')}_{'x'.join(map(str, shape))}"] = rate
            best = max(best, rate)
        out[f"{str(dtype).removeprefix('torch.')}_peak"] = best
    return out


def _peak(device: torch.device, baseline: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return peak_since_window() - baseline


def measure_client(folder: str, seq_len: int, batch_size: int, steps: int, warmup: int,
                   data_dir: str | None, device: str = "cpu", cached: bool = False,
                   whole_model_path: bool = False) -> dict:
    """Peak memory, FLOPs and step times of a client model folder (call in a fresh process)."""
    from transformers import AutoTokenizer

    from fedsoda.activation_cache import ActivationCache, cached_prefix, uncacheable_reason
    from fedsoda.data.task import pad_id
    from fedsoda.surgery.build import open_sub_llm
    from fedsoda.training import LocalTrainer, answer_loss, configure_threads

    threads = configure_threads()
    tokenizer = AutoTokenizer.from_pretrained(Path(folder) / "model")
    pool = fixed_length_examples(tokenizer, seq_len, batch_size * POOL_BATCHES, data_dir)
    # The window opens after imports and data loading: what it sees is the model and the step.
    baseline = start_peak_window()
    began = time.perf_counter()
    sub = open_sub_llm(folder, device=device)
    load_seconds = time.perf_counter() - began
    rng = random.Random(0)
    draws = [rng.sample(range(len(pool)), batch_size) for _ in range(max(1, warmup) + 2 * steps)]
    trainer = LocalTrainer(sub.model, sub.adapter_layers, 1e-4, 0.01, pad_id(tokenizer))
    dev = trainer.device

    def step() -> float:
        return trainer.step(pool, draws.pop())

    flops = count_flops(step)  # the first warm-up step; the counter holds no tensors
    for _ in range(warmup - 1):
        step()
    result = {"peak_memory_bytes": _peak(dev, baseline), "device": dev.type, "threads": threads,
              "baseline_bytes": baseline, "load_seconds": load_seconds,
              "frozen_layers": trainer.split.first_trainable,
              "trainable_layers": sub.adapter_layers, "step_flops": flops}
    result["step_times"] = timed(step, steps, dev)
    result["step_seconds"] = statistics.median(result["step_times"])
    if whole_model_path:  # the path before the split: one forward through every layer
        def whole_model_step() -> None:
            batch = trainer.batch(pool, draws.pop())
            trainer.optimizer.zero_grad(set_to_none=True)
            answer_loss(sub.model, batch).backward()
            trainer.optimizer.step()
        result["step_seconds_whole_model_path"] = statistics.median(timed(whole_model_step, steps, dev))
    reason = uncacheable_reason(trainer.split)
    if cached and reason is None:
        result.update(_measure_cached(trainer, pool, batch_size, steps, dev, baseline,
                                      ActivationCache(max_bytes=2**40), cached_prefix, rng))
    elif cached:
        result["cache_note"] = reason
    return result


def _measure_cached(trainer, pool, batch_size, steps, device, baseline, cache, cached_prefix,
                    rng) -> dict:
    """Steps with every drawn example's emulator output already cached."""
    from fedsoda.activation_cache import frozen_fingerprint

    cache.bind(frozen_fingerprint(trainer.split))
    trainer.cache = cache
    # A new peak window (same baseline): the cached phase's own peak, cache included.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        start_peak_window()
    fill_times = []
    for start in range(0, len(pool), batch_size):
        keys = list(range(start, min(start + batch_size, len(pool))))
        fill_times += timed(lambda keys=keys: cached_prefix(trainer.split, trainer.batch(pool, keys),
                                                            keys, cache), 1, device)
    draws = [rng.sample(range(len(pool)), batch_size) for _ in range(steps + 1)]

    def step() -> float:
        return trainer.step(pool, draws.pop())

    flops = count_flops(step)
    times = timed(step, steps, device)
    return {"step_flops_cached": flops, "step_times_cached": times,
            "step_seconds_cached": statistics.median(times),
            "cache_fill_seconds_per_example": sum(fill_times) / len(pool),
            "cache_bytes_per_example": cache.memory_bytes / len(pool),
            "peak_memory_bytes_cached": _peak(device, baseline), "cache": cache.stats()}


def probe_client(folder: Path | str, seq_len: int, batch_size: int, steps: int, warmup: int,
                 data_dir: str | None, device: str, cached: bool, whole_model_path: bool,
                 env: dict | None = None) -> dict:
    """``measure_client`` in a fresh Python process (so peak memory is this method's alone)."""
    command = [sys.executable, "-m", "fedsoda.benchmark", "--folder", str(folder),
               "--seq-len", str(seq_len), "--batch-size", str(batch_size), "--steps", str(steps),
               "--warmup", str(warmup), "--device", device]
    command += ["--data-dir", str(data_dir)] if data_dir else []
    command += ["--cached"] if cached else []
    command += ["--whole-model-path"] if whole_model_path else []
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"client probe of {folder} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cached", action="store_true")
    parser.add_argument("--whole-model-path", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure_client(args.folder, args.seq_len, args.batch_size, args.steps,
                                    args.warmup, args.data_dir, args.device, args.cached,
                                    args.whole_model_path)))


if __name__ == "__main__":
    main()
