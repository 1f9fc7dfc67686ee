"""bf16 against float32 matmuls for a client's NF4 sub-LLM and the server's alignment on this
CPU, side by side in one process: seconds a step, and how close each path's LoRA gradients
are to those of a float32 copy of the same weights (dequantized, every activation float32).

    FEDSODA_DATA_DIR=../shared/data .venv/bin/python bench/cpu_matmul.py --out bench/cpu_matmul.json

The model: NF4 SmolLM2-135M with LoRA on layers 0-2 (the longest backward), B drawn small
instead of zero so that every LoRA tensor has a gradient. The batch: 8 SST-2 training prompts
with their answers. A "client step" is cross-entropy at the answer token, as clients train; an
"alignment step" is a KL divergence over the 49,152-word vocabulary at every position, as
pre-alignment. "bf16" is how weights computed before ``fedsoda.surgery.cpu_matmul``;
"fp32_matmuls_bf16_attention" is float32 matmuls with attention still in bf16 (before the
module's float32 attention), to measure that part alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.nn.functional as F

from fedsoda.data.sst2 import TASK
from fedsoda.data.task import load_rows
from fedsoda.models.layers import unwrap
from fedsoda.models.loading import load
from fedsoda.surgery import cpu_matmul
from fedsoda.surgery.lora import attach_lora, set_trainable
from fedsoda.surgery.quantize import quantize_nf4

LAYERS = [0, 1, 2]


def step(model, batch, kind: str) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    base = unwrap(model)
    hidden = base.model(**batch, use_cache=False).last_hidden_state
    if kind == "client":
        last = batch["attention_mask"].sum(1) - 2  # predicts the last (answer) token
        answer = batch["input_ids"][torch.arange(len(last)), last + 1]
        loss = F.cross_entropy(base.lm_head(hidden[torch.arange(len(last)), last]).float(), answer)
    else:
        logits = base.lm_head(hidden).float()
        loss = F.kl_div(F.log_softmax(logits, -1), F.softmax(logits.detach() * 0.9, -1),
                        reduction="batchmean")
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def float32_reference(model):
    """``model`` with every 4-bit layer dequantized into a float32 linear, all in float32."""
    reference = copy.deepcopy(model)
    for module in list(reference.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                dense = torch.nn.Linear(child.in_features, child.out_features, bias=False)
                dense.weight.data = bnb.functional.dequantize_4bit(
                    child.weight.data, child.weight.quant_state).float()
                setattr(module, name, dense)
    reference.float()
    for name, param in reference.named_parameters():
        param.requires_grad_("lora_" in name)
    return reference


def cosine(grads: dict, reference: dict) -> float:
    a = torch.cat([grads[n].float().flatten() for n in reference])
    b = torch.cat([reference[n].flatten() for n in reference])
    return float(a @ b / a.norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/cpu_matmul.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    full, tokenizer = load("smollm2-135m")
    texts = [f"Review: {r['sentence'].strip()}\nSentiment:{TASK.options[r['label']]}"
             for r in load_rows(TASK, "train")[:8]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    os.environ["FEDSODA_FP32_MATMULS"] = "0"  # load_nf4 keeps bf16 matmuls for the baseline
    bf16 = attach_lora(quantize_nf4(full), LAYERS)
    del os.environ["FEDSODA_FP32_MATMULS"]
    set_trainable(bf16, LAYERS)
    for name, param in bf16.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    fours = lambda model: [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]  # noqa: E731
    assert {m.compute_dtype for m in fours(bf16)} == {torch.bfloat16}, "the baseline must be bf16"
    fp32 = cpu_matmul.use_fp32_matmuls(copy.deepcopy(bf16), "cpu")
    bf16_attention = copy.deepcopy(fp32)  # float32 matmuls, but attention left in bf16
    unwrap(bf16_attention).set_attn_implementation("sdpa")
    models = {"bf16": bf16, "fp32_matmuls": fp32, "fp32_matmuls_bf16_attention": bf16_attention,
              "float32_reference": float32_reference(bf16)}
    rows = {}
    for kind in ("client", "alignment"):
        times, grads = {m: [] for m in models}, {}
        for _ in range(args.repeats):
            for mode, model in models.items():
                start = time.perf_counter()
                grads[mode] = step(model, batch, kind)
                times[mode].append(time.perf_counter() - start)
        ref, median = grads["float32_reference"], {m: statistics.median(t) for m, t in times.items()}
        rows[kind] = {"seconds": times, "speedup_median": median["bf16"] / median["fp32_matmuls"],
                      "attention_speedup_median":
                          median["fp32_matmuls_bf16_attention"] / median["fp32_matmuls"],
                      "grad_cosine_to_reference": {m: cosine(grads[m], ref) for m in (
                          "bf16", "fp32_matmuls", "fp32_matmuls_bf16_attention")}}
        print(f"{kind} step: bf16 {statistics.median(times['bf16']):.2f} s, float32 matmuls "
              f"{statistics.median(times['fp32_matmuls']):.2f} s ({rows[kind]['speedup_median']:.1f}x); "
              f"gradient cosine to float32: bf16 {rows[kind]['grad_cosine_to_reference']['bf16']:.5f}, "
              f"float32 matmuls {rows[kind]['grad_cosine_to_reference']['fp32_matmuls']:.5f}")
        print(f"  of which attention: bf16 attention {median['fp32_matmuls_bf16_attention']:.2f} s "
              f"against float32 {median['fp32_matmuls']:.2f} s "
              f"({rows[kind]['attention_speedup_median']:.2f}x); gradient cosine with bf16 "
              f"attention {rows[kind]['grad_cosine_to_reference']['fp32_matmuls_bf16_attention']:.5f}")
    record = {"cpu": torch.backends.cpu.get_cpu_capability(),
              "native_bf16": cpu_matmul.native_bf16_matmul("cpu"), "threads": torch.get_num_threads(),
              "tokens": list(batch["input_ids"].shape), **rows}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
