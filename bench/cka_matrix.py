"""Linear CKA between SmolLM2-135M's layer outputs, with and without each sample's first token.

    FEDSODA_DATA_DIR=../shared/data python bench/cka_matrix.py \
        --out bench/cka_matrix.json --image docs/img/cka-smollm2.png

FedPruner groups layers by the CKA between their outputs (``fedsoda.surgery.cka``). On this
model the first token of every sample carries a few massive activations (the attention sink):
with it, CKA is ~1.0 between nearly all layers above 10 and the grouping would see one blob.
This measures both matrices on the same WikiText-2 validation paragraphs (chosen as the
FedSODA public set is, ``fedsoda.data.public``), the block influence of every layer, and the
spectral and contiguous groups of the first-token-free matrix for a few group counts, with
the representative each group's importance picks. One forward pass per token choice.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from fedsoda.data.public import sample_paragraphs, tokenize_batches, wikitext_paragraphs
from fedsoda.models import load
from fedsoda.surgery.cka import cka_matrix, probe_layers
from fedsoda.surgery.grouping import (
    contiguous_groups,
    select_representatives,
    selection_probabilities,
    spectral_groups,
)
from fedsoda.training import configure_threads

PAIRS = ((12, 15), (12, 21), (12, 27))


def off_diagonal_mean(matrix: torch.Tensor, first: int, last: int) -> float:
    """Mean CKA over the pairs ``i != j`` of layers ``first..last``."""
    block = matrix[first:last + 1, first:last + 1]
    size = block.shape[0]
    return float((block.sum() - block.diagonal().sum()) / (size * size - size))


def grouping_report(matrix: torch.Tensor, influence: list[float], k: int) -> dict:
    """Spectral and contiguous groups, and the argmax representative of each group."""
    report = {}
    for name, grouping in (("spectral", spectral_groups), ("contiguous", contiguous_groups)):
        groups = grouping(matrix, k)
        probabilities = selection_probabilities(influence, groups)
        report[name] = {"groups": groups,
                        "representatives": select_representatives(probabilities, groups)}
    return report


def draw(matrices: dict[str, torch.Tensor], path: Path, title: str) -> None:
    figure = Figure(figsize=(11, 5), layout="constrained")
    axes = figure.subplots(1, 2)
    for axis, (label, matrix) in zip(axes, matrices.items(), strict=True):
        image = axis.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
        axis.set_title(label)
        axis.set_xlabel("layer")
        axis.set_ylabel("layer")
    figure.colorbar(image, ax=axes, shrink=0.8, label="linear CKA")
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--groups", default="6,12")
    parser.add_argument("--out", default="bench/cka_matrix.json")
    parser.add_argument("--image", default="docs/img/cka-smollm2.png")
    args = parser.parse_args()
    threads = configure_threads()
    began = time.perf_counter()
    model, tokenizer = load(args.model)
    texts = sample_paragraphs(wikitext_paragraphs("validation", args.data_dir), args.samples,
                              args.seed)
    batches = tokenize_batches(tokenizer, texts, args.seq_len, args.batch_size)
    results: dict = {"args": vars(args), "threads": threads,
                     "real_tokens": int(sum(b["attention_mask"].sum() for b in batches))}
    matrices = {}
    for skip_first in (False, True):
        probe = probe_layers(model, batches, skip_first, args.max_tokens, args.seed)
        matrix = cka_matrix(probe.outputs)
        key = "without_first_token" if skip_first else "with_first_token"
        matrices[key] = matrix
        results[key] = {
            "tokens": probe.tokens,
            "tokens_used": probe.outputs[0].shape[0],
            "pairs": {f"{i},{j}": round(float(matrix[i, j]), 4) for i, j in PAIRS},
            "mean_cka_layers_10_29": round(off_diagonal_mean(matrix, 10, 29), 4),
            "min_cka_layers_10_29": round(float(matrix[10:, 10:].min()), 4),
            "mean_cka_layers_10_29_vs_0_2": round(float(matrix[10:, :3].mean()), 4),
            "block_influence": [round(value, 5) for value in probe.influence],
            "cka": [[round(float(v), 4) for v in row] for row in matrix],
        }
        summary = {name: value for name, value in results[key].items()
                   if name not in ("cka", "block_influence")}
        print(json.dumps({key: summary}), flush=True)
    influence = results["without_first_token"]["block_influence"]
    results["groups"] = {k: grouping_report(matrices["without_first_token"], influence, int(k))
                         for k in args.groups.split(",")}
    print(json.dumps({"groups": results["groups"]}), flush=True)
    print(json.dumps({"block_influence": influence}), flush=True)
    results["seconds"] = round(time.perf_counter() - began, 1)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    draw({f"first token included ({results['with_first_token']['tokens_used']} tokens)":
          matrices["with_first_token"],
          f"first token left out ({results['without_first_token']['tokens_used']} tokens)":
          matrices["without_first_token"]},
         Path(args.image),
         f"{args.model}: linear CKA between decoder-layer outputs, "
         f"{args.samples} WikiText-2 validation paragraphs")
    print(f"wrote {args.out} and {args.image} in {results['seconds']} s")


if __name__ == "__main__":
    main()
