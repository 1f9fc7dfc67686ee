"""Measurements behind ``fedsoda bench``: a client's training step, for any method.

- ``python -m fedsoda.benchmark --folder CLIENT_MODEL ...`` loads one client model folder in
  a fresh process and prints JSON with the peak memory of its training steps (peak RSS above
  the baseline after imports and data loading on CPU, ``fedsoda.accounting``'s window;
  ``torch.cuda.max_memory_allocated`` on CUDA) and the FLOPs of one step
  (``torch.utils.flop_counter``, with formulas for bitsandbytes' 4-bit matmuls and CPU flash
  attention, which it does not know), uncached and, for a model with a frozen emulator, with
  the activation cache warm.
- ``interleaved_step_times`` times the steps of every method in one process, in turns, so
  the load of a shared machine falls on all methods alike.

The workload is fixed-length sequences built from real SST-2 training examples: a k-shot
prompt ("Review: ...\\nSentiment: positive" shots, then the target review) cut from the left
to exactly ``seq_len`` tokens, with the loss on the target's answer token(s) only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedsoda.accounting import peak_bytes, run_probe, start_peak_window

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
    targets, shots = order[:count], itertools.cycle(order[count:])  # long seq_len: reuse shots
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


class ClientUnderTest:
    """One method's client model, loaded from its folder, with a trainer and a workload."""

    def __init__(self, folder: str, pool: list[dict], batch_size: int, device: str = "cpu",
                 seed: int = 0) -> None:
        from transformers import AutoTokenizer

        from fedsoda.activation_cache import ActivationCache, uncacheable_reason
        from fedsoda.data.task import pad_id
        from fedsoda.surgery.build import open_sub_llm
        from fedsoda.training import LocalTrainer

        self.pool, self.batch_size, self.rng = pool, batch_size, random.Random(seed)
        self.sub = open_sub_llm(folder, device=device)
        tokenizer = AutoTokenizer.from_pretrained(Path(folder) / "model")
        self.trainer = LocalTrainer(self.sub.model, self.sub.adapter_layers, 1e-4, 0.01,
                                    pad_id(tokenizer))
        self.device = self.trainer.device
        self.cache_note = uncacheable_reason(self.trainer.split)
        self.cache = ActivationCache(max_bytes=2**40) if self.cache_note is None else None

    def _draw(self) -> list[int]:
        return self.rng.sample(range(len(self.pool)), self.batch_size)

    def step(self) -> None:
        """A training step as clients run it without the cache (frozen layers under no_grad)."""
        self.trainer.cache = None
        self.trainer.step(self.pool, self._draw())

    def cached_step(self) -> None:
        """A training step whose examples' emulator outputs are all in the cache."""
        self.trainer.cache = self.cache
        self.trainer.step(self.pool, self._draw())
        self.trainer.cache = None

    def whole_model_step(self) -> None:
        """The step before the split: one forward through every layer (``answer_loss``)."""
        from fedsoda.training import answer_loss

        batch = self.trainer.batch(self.pool, self._draw())
        self.trainer.optimizer.zero_grad(set_to_none=True)
        answer_loss(self.sub.model, batch).backward()
        self.trainer.optimizer.step()

    def fill_cache(self) -> float:
        """Cache every example of the workload; returns the seconds per example."""
        from fedsoda.activation_cache import cached_prefix, frozen_fingerprint

        self.cache.bind(frozen_fingerprint(self.trainer.split))
        seconds = 0.0
        for start in range(0, len(self.pool), self.batch_size):
            keys = list(range(start, min(start + self.batch_size, len(self.pool))))
            batch = self.trainer.batch(self.pool, keys)
            fill = lambda batch=batch, keys=keys: cached_prefix(  # noqa: E731
                self.trainer.split, batch, keys, self.cache)
            seconds += sum(timed(fill, 1, self.device))
        return seconds / len(self.pool)


def workload(folder: str, seq_len: int, batch_size: int, data_dir: str | None) -> list[dict]:
    """The examples every method's steps draw from (the same for all: same tokenizer, seed)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(folder) / "model")
    return fixed_length_examples(tokenizer, seq_len, batch_size * POOL_BATCHES, data_dir)


def measure_memory_and_flops(folder: str, seq_len: int, batch_size: int, warmup: int,
                             data_dir: str | None, device: str = "cpu", cached: bool = True) -> dict:
    """Peak memory and FLOPs of a client's step, uncached and cached (in a fresh process)."""
    from fedsoda.training import configure_threads

    threads = configure_threads()
    pool = workload(folder, seq_len, batch_size, data_dir)
    # The window opens after imports and data loading: what it sees is the model and the step.
    baseline = start_peak_window()
    client = ClientUnderTest(folder, pool, batch_size, device)
    flops = count_flops(client.step)  # the first warm-up step; the counter holds no tensors
    for _ in range(warmup - 1):
        client.step()
    cuda = client.device.type == "cuda"
    result = {"peak_memory_bytes": peak_bytes(cuda, baseline), "baseline_bytes": baseline,
              "device": client.device.type, "threads": threads, "step_flops": flops,
              "frozen_layers": client.trainer.split.first_trainable,
              "trainable_layers": client.sub.adapter_layers}
    if client.cache is None or not cached:
        return result | ({"cache_note": client.cache_note} if client.cache_note else {})
    # A new window (same baseline): the cached phase's own peak, the cache included.
    if client.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        start_peak_window()
    client.fill_cache()
    result["step_flops_cached"] = count_flops(client.cached_step)
    client.cached_step()
    return result | {"peak_memory_bytes_cached": peak_bytes(cuda, baseline),
                     "cache_bytes_per_example": client.cache.memory_bytes / len(pool)}


def interleaved_step_times(clients: dict[str, ClientUnderTest], steps: int, warmup: int,
                           cached: tuple[str, ...] = (),
                           whole_model: tuple[str, ...] = ()) -> dict[str, dict]:
    """Step times of every client, taken in turns (one step of each, ``steps`` times), so a
    change in the machine's load during the run falls on every method alike. Cached steps
    are timed for the clients named in ``cached`` that have a frozen emulator."""
    kinds = {}
    for name, client in clients.items():
        kinds[name] = {"step_times": client.step}
        if client.cache is not None and name in cached:
            kinds[name]["step_times_cached"] = client.cached_step
        if name in whole_model:
            kinds[name]["step_times_whole_model_path"] = client.whole_model_step
    out = {name: {} for name in clients}
    for name, client in clients.items():
        if "step_times_cached" in kinds[name]:
            out[name]["cache_fill_seconds_per_example"] = client.fill_cache()
        for run in kinds[name].values():
            for _ in range(warmup):
                run()
    for _ in range(steps):
        for name, client in clients.items():
            for key, run in kinds[name].items():
                out[name].setdefault(key, []).extend(timed(run, 1, client.device))
    for name, client in clients.items():
        if "step_times_cached" in kinds[name]:
            out[name]["cache"] = client.cache.stats()
    for figures in out.values():
        for key in [k for k in figures if k.startswith("step_times")]:
            figures[key.replace("step_times", "step_seconds")] = statistics.median(figures[key])
    return out


def probe_client(folder: Path | str, seq_len: int, batch_size: int, warmup: int,
                 data_dir: str | None, device: str, cached: bool = True,
                 env: dict | None = None) -> dict:
    """``measure_memory_and_flops`` in a fresh Python process (peak memory is its alone)."""
    arguments = ["--folder", str(folder), "--seq-len", str(seq_len), "--batch-size",
                 str(batch_size), "--warmup", str(warmup), "--device", device]
    arguments += ["--data-dir", str(data_dir)] if data_dir else []
    arguments += [] if cached else ["--no-cache"]
    return run_probe("fedsoda.benchmark", arguments, f"client probe of {folder}", env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--no-cache", action="store_true", help="skip the cached step")
    args = parser.parse_args()
    print(json.dumps(measure_memory_and_flops(args.folder, args.seq_len, args.batch_size,
                                              args.warmup, args.data_dir, args.device,
                                              cached=not args.no_cache)))


if __name__ == "__main__":
    main()
