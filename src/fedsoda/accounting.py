"""Client peak memory in a training step, measured in a fresh process.

On CPU: the process's peak RSS over the training steps minus its RSS after imports and data
loading (so the interpreter, libraries and the parsed data set do not count); the model's
weights do. A memory probe trains on the evaluation split's widest batch (``--widest``), so
its peak does not depend on which batches it drew. ``fedsoda.benchmark`` measures
``fedsoda bench``'s peaks the same way but as a timing run: drawn batches, glibc's defaults.
On CUDA: ``torch.cuda.max_memory_allocated``.

Memory probes run with glibc's allocator pinned (``PINNED_ALLOCATOR``: a fixed 128 KiB
mmap threshold, so every large tensor is mapped on allocation and unmapped on free). With
glibc's defaults the threshold adapts upward after the first frees and freed activations stay
in fragmented heaps, so peak RSS measures the allocator's history rather than the step: on
SmolLM2-135M (batch 8, 256 tokens, this 2-core CPU) the same 5-MLP-block step peaked at 209
and 274 MiB in two runs, a full-model step at 1,078 MiB after 2 steps and 1,282 MiB after 10,
and block costs did not add up (3 attention + 5 MLP blocks 65 MiB above 5 + 3). Pinned, the
full-model step peaks at 898 MiB after 4 and 10 steps alike (on drawn batches; 1,020-1,025
MiB on the widest), repeated runs agree within 0.5%, and attention and MLP blocks add up
(``fedsoda.budgets.fit_blocks``, ``bench/block_budgets.py``). A device that
must hold a budget runs its client this way (``docs/deployment.md``); it costs step time
(6.8 s against 3.2 s on the full model here), which is why the simulation's clients and the
timing probes (``depth_cost``, ``fedsoda bench``) keep glibc's defaults.
Run as ``python -m fedsoda.accounting --folder SUBLLM --task sst2`` it prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

# glibc reads these at process start; elsewhere they are ignored (macOS: peaks as measured).
PINNED_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def pinned_env() -> dict:
    """This process's environment with the allocator pinned, for a memory probe's child."""
    return {**os.environ, **PINNED_ALLOCATOR}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(field)


def start_peak_window() -> int:
    """Current RSS, and restart peak tracking from it.

    ``ru_maxrss`` is a lifetime peak, so a transient spike while importing would hide the
    training step; writing 5 to ``/proc/self/clear_refs`` resets the kernel's peak (VmHWM).
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_bytes("VmRSS")
    except OSError:  # not Linux: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_since_window() -> int:
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(cuda: bool, baseline: int) -> int:
    """The step's peak: CUDA max allocated, or peak RSS above ``baseline`` on CPU."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated()
    return peak_since_window() - baseline


def run_probe(module: str, arguments: list[str], what: str, env: dict | None = None) -> dict:
    """Run ``python -m module arguments`` in a fresh process; the JSON of its last line."""
    done = subprocess.run([sys.executable, "-m", module, *arguments], capture_output=True,
                          text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def client_peak_memory(folder: Path | str, task: str, batch_size: int, max_tokens: int,
                       data_dir: str | None, steps: int = 2, layers=None, blocks=None) -> int:
    """Peak memory of a client training step (fresh process, allocator pinned, on the
    evaluation split's widest batch) on the sub-LLM folder ``folder``,
    or, with ``layers``, on the client model of those full-model layers of the layered model
    in ``folder`` (``fedsoda.surgery.layered``) with LoRA trained on all of them; ``blocks``
    (one ``Assignment.blocks`` string per layer) drops the blocks they do not keep first."""
    arguments = ["--folder", str(folder), "--task", task, "--batch-size", str(batch_size),
                 "--max-tokens", str(max_tokens), "--steps", str(steps), "--widest"]
    if layers is not None:
        arguments += ["--layers", ",".join(str(i) for i in layers)]
    if blocks:
        arguments += ["--blocks", ",".join(blocks)]
    if data_dir:
        arguments += ["--data-dir", str(data_dir)]
    return int(run_probe("fedsoda.accounting", arguments, "memory probe", pinned_env())["peak_bytes"])


def depth_cost(folder: Path | str, task: str, batch_size: int, max_tokens: int,
               data_dir: str | None, depth: int, steps: int = 3) -> dict:
    """A training step at fine-tuning depth ``depth`` (HierFedLoRA): the whole layered model in
    ``folder``, LoRA on its top ``depth`` layers only, measured in a fresh process:
    ``{"peak_bytes", "step_seconds"}`` (mean over ``steps`` steps, the first included)."""
    from fedsoda.surgery.layered import folder_num_layers  # torch: only when measuring

    total = folder_num_layers(folder)
    if not 1 <= depth <= total:
        raise ValueError(f"a depth is 1..{total} layers, got {depth}")
    arguments = ["--folder", str(folder), "--task", task, "--batch-size", str(batch_size),
                 "--max-tokens", str(max_tokens), "--steps", str(steps),
                 "--layers", ",".join(str(i) for i in range(total)), "--top", str(depth)]
    if data_dir:
        arguments += ["--data-dir", str(data_dir)]
    found = run_probe("fedsoda.accounting", arguments, "depth cost probe")
    return {"peak_bytes": int(found["peak_bytes"]), "step_seconds": found["seconds"] / steps}


def similarity_peak_memory(folder: Path | str, task: str, samples: int, max_tokens: int,
                           data_dir: str | None, units: bool = False, dtype: str = "float32") -> int:
    """Peak memory (fresh process) of FedPruner's similarity probe on the layered model in
    ``folder``, as a client runs it: ``samples`` examples through the model one layer at a
    time with the global LoRA of every layer in hand, then the CKA matrices."""
    arguments = ["--folder", str(folder), "--task", task, "--max-tokens", str(max_tokens),
                 "--similarity", str(samples), "--probe-dtype", dtype]
    if units:
        arguments.append("--units")
    if data_dir:
        arguments += ["--data-dir", str(data_dir)]
    return int(run_probe("fedsoda.accounting", arguments, "similarity memory probe",
                             pinned_env())["peak_bytes"])


def _similarity(args: argparse.Namespace, examples, pad: int) -> None:
    """What a client's probe handler holds and computes (``federated.client_app.probe``)."""
    import torch

    from fedsoda.surgery.cka import cka_matrix
    from fedsoda.surgery.layered import folder_num_layers, lora_shapes
    from fedsoda.surgery.lora import LoraSpec
    from fedsoda.surgery.streamed import streamed_probe
    from fedsoda.training import probe_batches

    # The global LoRA of every layer arrives with the message: tensors of its real shapes,
    # made from the layer files' headers (building a model to read them would count here).
    spec = LoraSpec()
    lora = {name: torch.randn(shape) for index in range(folder_num_layers(args.folder))
            for name, shape in lora_shapes(args.folder, index, spec.r, spec.targets).items()}
    result = streamed_probe(args.folder, folder_num_layers(args.folder),
                            probe_batches(list(examples), pad), lora=lora, units=args.units,
                            dtype=getattr(torch, args.probe_dtype))
    layers, units = result if args.units else (result, None)
    cka_matrix(layers.outputs)
    if units is not None:
        cka_matrix(units.attn_outputs), cka_matrix(units.mlp_outputs)


def _probe(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

    from fedsoda.data.task import EncodedExamples, load_rows, pad_id, widest_examples
    from fedsoda.data.tasks import get_task
    from fedsoda.surgery.blocks import drop_blocks
    from fedsoda.surgery.build import open_sub_llm
    from fedsoda.surgery.layered import load_layered
    from fedsoda.surgery.lora import attach_lora
    from fedsoda.training import configure_threads, local_train

    configure_threads()  # idle cores only: oversubscribed threads make the probe crawl
    task = get_task(args.task)
    layers = [int(i) for i in args.layers.split(",")] if args.layers else None
    layered = layers is not None or args.similarity  # a layered folder holds its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(Path(args.folder) / ("" if layered else "model"))
    # Examples of the evaluation split, which the server holds: it never reads clients'
    # training data, and a step's peak depends only on the examples' form and length. A
    # memory probe (--widest) trains on the split's widest batch, every step the same: random
    # draws made the peak depend on the draws (on SmolLM2 22 MLP blocks peaked 21 MiB higher
    # after 10 steps than after 2), where a client meets wide batches over its rounds. A
    # timing probe draws batches from the first rows, as typical steps.
    rows = load_rows(task, task.eval_split, args.data_dir)
    if args.widest:
        examples = widest_examples(task, rows, tokenizer, args.max_tokens, args.batch_size)
    else:
        rows = rows[: args.similarity or args.batch_size * 4]
        examples = EncodedExamples(task, rows, tokenizer, args.max_tokens)
    # The window opens after the data set is read: parsing every training row is not part of
    # a training step, and its transient peak would otherwise count.
    baseline = start_peak_window()
    if args.similarity:
        _similarity(args, examples, pad_id(tokenizer))
        return {"peak_bytes": peak_bytes(False, baseline), "device": "cpu", "baseline_bytes": baseline}
    if layers is None:
        sub = open_sub_llm(args.folder)
        model, trainable = sub.model, sub.adapter_layers
    else:
        # --top D: LoRA on the top D layers only, nothing below them trains (a depth)
        trainable = list(range(len(layers)))[-args.top:] if args.top else list(range(len(layers)))
        base = load_layered(args.folder, layers)
        if args.blocks:  # as the client builds it: blocks go before LoRA, so theirs is never made
            drop_blocks(base, args.blocks.split(","))
        model = attach_lora(base, trainable)
    trained = local_train(model, trainable, examples, args.steps, args.batch_size, 1e-4, 0.01, 0,
                          pad_id(tokenizer))
    cuda = torch.cuda.is_available()
    return {"peak_bytes": peak_bytes(cuda, baseline), "device": "cuda" if cuda else "cpu",
            "baseline_bytes": baseline, "seconds": trained["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--layers", default=None, help="full-model layers of a layered model")
    parser.add_argument("--blocks", default=None,
                        help="per layer, the blocks it keeps (attn+mlp,mlp,attn); with --layers")
    parser.add_argument("--widest", action="store_true",
                        help="train on the evaluation split's widest batch (a memory probe)")
    parser.add_argument("--top", type=int, default=0, metavar="DEPTH",
                        help="with --layers: LoRA and training on the top DEPTH layers only")
    parser.add_argument("--similarity", type=int, default=0, metavar="SAMPLES",
                        help="measure FedPruner's similarity probe on this many examples instead")
    parser.add_argument("--units", action="store_true", help="with --similarity: FedPruner+'s")
    parser.add_argument("--probe-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="with --similarity: how the kept rows are stored")
    print(json.dumps(_probe(parser.parse_args())))


if __name__ == "__main__":
    main()
