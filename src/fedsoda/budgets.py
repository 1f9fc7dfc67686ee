"""Clients' memory budgets and the memory model that turns a budget into a layer count.

FedPruner (method notes, section 2.2) sizes each client's sub-model to its memory: the peak
of a training step on a client model of ``k`` decoder layers, all of them with LoRA (bf16
weights, fp32 LoRA, AdamW, the FedProx anchor), is affine in ``k``:

    peak(k) = a + b * k

``a`` is what does not depend on the layer count (embeddings, final norm, LM head, the
logits at the answer tokens, the runtime's working buffers); ``b`` is one layer's frozen
weights, its LoRA with gradient, optimizer state and anchor, and the activations its
backward pass keeps. A client with budget ``M`` gets ``K = max{k in 1..L : peak(k) <= M}``
layers; a budget below ``peak(1)`` is an error that names the smallest budget that works.

``calibrate`` fits ``a`` and ``b`` from two dry runs of a training step in fresh processes
(``fedsoda.accounting.client_peak_memory``, the same measurement as every reported peak);
``analytic`` estimates them from the model config alone (meta device, no weights) where
measuring is not possible (on SmolLM2 it comes out ~17% under the measured full-model peak
at the probe's batch shape: it leaves out the framework's working buffers). A model's
``headroom`` keeps a share of each budget free for the noise of CPU peak RSS, which moves
by 10-25 MiB between runs of the same step. Budgets come from a spec such as ``"0.25x4,0.5x4,1.0x2"``
(fractions of the full-model LoRA step's measured peak) or ``"200MiBx4,400MiBx6"``.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

from fedsoda.accounting import client_peak_memory

MiB = 1 << 20
UNITS = {"kib": 1 << 10, "mib": MiB, "gib": 1 << 30}
SOURCES = ("measured", "analytic")
# One budget token: a fraction (0.25) or a size (200MiB), then optionally xCOUNT clients.
_TOKEN = re.compile(r"^(?P<value>[+-]?\d*\.?\d+(?:e[+-]?\d+)?)\s*(?P<unit>[kmg]ib)?"
                    r"(?:\s*x\s*(?P<count>\d+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class MemoryModel:
    """``peak(k) = a + b*k`` bytes for a client model of ``k`` decoder layers, LoRA on all.

    ``source`` says how ``a`` and ``b`` were obtained: ``"measured"`` (``points`` holds the
    two ``(k, peak bytes)`` dry runs they were fitted to) or ``"analytic"`` (from the config).
    ``headroom`` is a share of the predicted peak kept free for measurement noise when a
    budget is turned into layers. On this CPU, five dry runs of the same 6-layer SmolLM2 step
    (batch 8) peaked between 231 and 256 MiB; at 12 and 30 layers they agreed within ~7 and
    ~10 MiB (three runs of ``bench/budgets.py``; its JSON holds the last).
    """

    a: float  # bytes that do not depend on the layer count
    b: float  # bytes per decoder layer
    source: str
    points: tuple[tuple[int, int], ...] = ()
    headroom: float = 0.0  # k fits a budget M when peak(k) * (1 + headroom) <= M

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"memory model source must be one of {SOURCES}, got {self.source!r}")
        if not self.b > 0:
            raise ValueError(f"a memory model needs a positive per-layer cost, got b={self.b:.0f} "
                             f"bytes (points {self.points}): the measurements are noise; "
                             "calibrate at layer counts further apart")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"memory model headroom must be in [0, 1), got {self.headroom}")
        if self.a + self.b <= 0:
            raise ValueError(f"a memory model must predict a positive peak for one layer, got "
                             f"a={self.a:.0f}, b={self.b:.0f}")

    def peak(self, k: int) -> int:
        """Predicted peak bytes of a training step on a client model of ``k`` layers."""
        return round(self.a + self.b * k)

    def needs(self, k: int) -> int:
        """The smallest budget in bytes that holds ``k`` layers: the peak plus the headroom."""
        return math.ceil((self.a + self.b * k) * (1 + self.headroom)) if self.headroom \
            else self.peak(k)

    def measured_fit(self, k: int, budget_bytes: int) -> bool:
        """Whether ``k`` layers were measured (a calibration point) at or under the budget.

        A measured point needs no headroom against a prediction's error: fractional budgets
        are defined by the full-model point, so a budget of ``1.0`` holds the full model (the
        clients FedLoRA-exclusive lets take part), not ``L - 2`` layers."""
        return any(pk == k and peak <= budget_bytes for pk, peak in self.points)

    def layers_for(self, budget_bytes: int, num_layers: int) -> int:
        """The largest ``k`` in ``1..num_layers`` whose predicted peak (with the headroom)
        fits the budget, or whose measured peak does."""
        if num_layers < 1:
            raise ValueError(f"a model has at least one layer, got num_layers={num_layers}")
        for k in range(num_layers, 0, -1):
            if self.needs(k) <= budget_bytes or self.measured_fit(k, budget_bytes):
                return k
        smallest = math.ceil(self.needs(1) / MiB * 10) / 10
        raise ValueError(f"a memory budget of {budget_bytes / MiB:.1f} MiB cannot hold a client "
                         f"model of one layer: the smallest budget that works is {smallest:.1f} "
                         f"MiB ({self.source} memory model)")


@dataclass(frozen=True)
class BlockMemoryModel:
    """FedPruner+ (method notes 2.7): ``peak(K^A, K^F) = a + b_attn*K^A + b_mlp*K^F`` bytes
    for a client model holding ``K^A`` attention and ``K^F`` MLP blocks, LoRA on all of them.

    ``points`` holds the ``(K^A, K^F, peak bytes)`` dry runs it was fitted to
    (``calibrate_blocks``); ``headroom`` works as in ``MemoryModel``. The fit errs high: on
    SmolLM2 (pinned allocator, ``fedsoda.accounting``) a whole layer costs less than its two
    blocks apart (30.7 MiB against 13.5 + 17.9), so a plane fitted to single-kind runs
    over-predicts sub-models that mix both kinds, by up to 8% (``bench/block_budgets.py``:
    of the 43 pairs a 25% or 50% budget allows, none measured over its budget, the largest
    peak/budget 0.991, and none over its prediction by more than 0.06%)."""

    a: float
    b_attn: float  # bytes per attention block (its weights, LoRA, optimizer state, activations)
    b_mlp: float  # bytes per MLP block
    points: tuple[tuple[int, int, int], ...] = ()
    headroom: float = 0.0

    def __post_init__(self) -> None:
        if not (self.b_attn > 0 and self.b_mlp > 0):
            raise ValueError(f"a block memory model needs positive per-block costs, got "
                             f"b_attn={self.b_attn:.0f}, b_mlp={self.b_mlp:.0f} bytes (points "
                             f"{self.points}): the measurements are noise")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"memory model headroom must be in [0, 1), got {self.headroom}")

    def needs(self, k_attn: int, k_mlp: int) -> int:
        """The smallest budget in bytes that holds the blocks: the peak plus the headroom."""
        return math.ceil((self.a + self.b_attn * k_attn + self.b_mlp * k_mlp) * (1 + self.headroom))

    def measured_fit(self, k_attn: int, k_mlp: int, budget_bytes: int) -> bool:
        """Whether these block counts were measured (a calibration point) within the budget:
        as in ``MemoryModel.measured_fit``, a budget of ``1.0`` holds every block."""
        return any((ka, kf) == (k_attn, k_mlp) and peak <= budget_bytes for ka, kf, peak in self.points)

    def pairs_for(self, budget_bytes: int, num_layers: int) -> list[tuple[int, int]]:
        """Every ``K^A`` in ``0..L`` with the largest ``K^F`` in ``0..L`` that fits the budget,
        at least one block in all; an error naming the smallest budget if none fits."""
        pairs = []
        for k_attn in range(num_layers + 1):
            fits = [k for k in range(num_layers, -1, -1) if self.needs(k_attn, k) <= budget_bytes
                    or self.measured_fit(k_attn, k, budget_bytes)]
            if fits and k_attn + fits[0] >= 1:
                pairs.append((k_attn, fits[0]))
        if not pairs:
            smallest = math.ceil(min(self.needs(1, 0), self.needs(0, 1)) / MiB * 10) / 10
            raise ValueError(f"a memory budget of {budget_bytes / MiB:.1f} MiB cannot hold one "
                             f"attention or MLP block: the smallest budget that works is "
                             f"{smallest:.1f} MiB (block memory model)")
        return pairs


def calibrate_blocks(folder: Path | str, task: str, batch_size: int, max_tokens: int,
                     data_dir: str | None, headroom: float = 0.0) -> BlockMemoryModel:
    """Five dry runs of the layered model in ``folder``: all ``L`` whole layers (the full-model
    peak that fractional budgets refer to, ``points[0]``), then MLP blocks only and attention
    blocks only, each at ``L/5`` and at ``L`` layers (``fit_blocks``)."""
    n = _num_layers(folder)
    small = default_sizes(n)[0]
    points = []
    for k_attn, k_mlp in ((n, n), (0, small), (0, n), (small, 0), (n, 0)):
        layers, blocks = spread_blocks(k_attn, k_mlp, n)
        peak = client_peak_memory(folder, task, batch_size, max_tokens, data_dir,
                                  layers=layers, blocks=blocks)
        points.append((k_attn, k_mlp, peak))
    return fit_blocks(points, headroom)


def fit_blocks(points, headroom: float = 0.0) -> BlockMemoryModel:
    """From ``(L, L)``, ``(0, k)``, ``(0, L)``, ``(k, 0)``, ``(L, 0)`` peaks: each block's cost
    is the slope between the two runs of its kind, which measures it across the scales that
    budgets fall in (one plane through three runs at ``L`` puts the cost of no blocks at 265
    MB on SmolLM2, where 6 MLP blocks peak at 190 MB); ``a`` is the larger of the two lines'
    intercepts, so that both kinds' runs are predicted at or above what they measured."""
    whole, (_, k_f, mlp_small), (_, n_f, mlp_large), (k_a, _, attn_small), (n_a, _, attn_large) = points
    b_mlp = (mlp_large - mlp_small) / (n_f - k_f)
    b_attn = (attn_large - attn_small) / (n_a - k_a)
    a = max(mlp_small - b_mlp * k_f, attn_small - b_attn * k_a)
    return BlockMemoryModel(a=a, b_attn=b_attn, b_mlp=b_mlp, points=tuple(map(tuple, points)),
                            headroom=headroom)


def _num_layers(folder: Path | str) -> int:
    # Deferred: surgery.layered loads torch; the CLI checks budget specs with this module
    # before anything heavy is imported.
    from fedsoda.surgery.layered import folder_num_layers

    return folder_num_layers(folder)


def spread_layers(k: int, num_layers: int) -> list[int]:
    """``k`` evenly spread full-model layers: the middle layer of each of ``k`` equal spans."""
    if not 1 <= k <= num_layers:
        raise ValueError(f"a client model has 1..{num_layers} layers, got {k}")
    return [(2 * i + 1) * num_layers // (2 * k) for i in range(k)]


def spread_blocks(k_attn: int, k_mlp: int, num_layers: int) -> tuple[list[int], list[str]]:
    """A client model of ``k_attn`` attention and ``k_mlp`` MLP blocks, each kind evenly spread
    (``spread_layers``): its full-model layers and per layer the blocks it keeps, as
    ``fedsoda.accounting.client_peak_memory`` takes them. A step's peak depends on the counts,
    not on which layers (every layer has the same size)."""
    attn = set(spread_layers(k_attn, num_layers)) if k_attn else set()
    mlp = set(spread_layers(k_mlp, num_layers)) if k_mlp else set()
    layers = sorted(attn | mlp)
    return layers, ["attn+mlp" if i in attn and i in mlp else "attn" if i in attn else "mlp"
                    for i in layers]


def measure_peak(folder: Path | str, k: int, task: str, batch_size: int, max_tokens: int,
                 data_dir: str | None) -> int:
    """Measured peak bytes (fresh process) of a training step on ``k`` evenly spread layers of
    the layered model in ``folder`` (``fedsoda.surgery.layered``), LoRA on all of them."""
    layers = spread_layers(k, _num_layers(folder))
    return client_peak_memory(folder, task, batch_size, max_tokens, data_dir, layers=layers)


def default_sizes(num_layers: int) -> tuple[int, int]:
    """Two layer counts to calibrate at: a fifth of the model and all of it (6 and 30 of
    SmolLM2's 30). Far apart, so CPU RSS noise (10-25 MiB a run) moves ``b`` little; every
    budget lies between them, so the line interpolates; the full-model step is the peak that
    fractional budgets refer to, so its measurement serves twice (``points[-1]``)."""
    if num_layers < 2:
        raise ValueError(f"calibration needs two layer counts; the model has {num_layers} layer")
    return max(1, num_layers // 5), num_layers


def calibrate(folder: Path | str, task: str, batch_size: int, max_tokens: int,
              data_dir: str | None, sizes: tuple[int, int] | None = None,
              headroom: float = 0.0) -> MemoryModel:
    """Fit ``a`` and ``b`` to the measured peaks of two dry runs at ``sizes`` layers (default
    ``default_sizes``) of the layered model in ``folder``; ``points`` holds them in order."""
    k1, k2 = sorted(sizes or default_sizes(_num_layers(folder)))
    if k1 == k2:
        raise ValueError(f"calibration needs two different layer counts, got {sizes}")
    p1, p2 = (measure_peak(folder, k, task, batch_size, max_tokens, data_dir) for k in (k1, k2))
    b = (p2 - p1) / (k2 - k1)
    return MemoryModel(a=p1 - b * k1, b=b, source="measured", points=((k1, p1), (k2, p2)),
                       headroom=headroom)


def saved_activation_bytes(config, batch_size: int, seq_len: int) -> int:
    """Bytes one decoder layer keeps for the backward pass of a LoRA step (an estimate).

    Per token: the bf16 tensors of ``fedsoda.planner.saved_activation_bytes`` (norm and
    projection inputs, q/k/v, gate/up/activation outputs), plus the fp32 copy of its input
    that PEFT makes for each LoRA-carrying projection (q, k, v, o, gate, up: hidden wide;
    down: intermediate wide). Per sequence and head: the S x S attention probabilities in
    bf16, which attention keeps when it runs unfused (CPU); fused kernels keep less.
    """
    hidden, inner = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = head_dim * config.num_key_value_heads
    per_token = 2 * (6 * hidden + 2 * kv + 4 * inner) + 4 * (6 * hidden + inner)
    return batch_size * seq_len * per_token + 2 * batch_size * heads * seq_len * seq_len


def analytic(config, batch_size: int, seq_len: int, answer_tokens: int | None = None,
             spec=None) -> MemoryModel:
    """``a`` and ``b`` from a model config alone (a ``PretrainedConfig``), for LoRA ``spec``
    (default ``LoraSpec()``) on every layer; the fallback where no dry run is possible.

    ``a``: bf16 weights outside the decoder stack, the embedding output, and the logits at
    ``answer_tokens`` labelled tokens per example (bf16, their fp32 copy and its gradient);
    by default every one of the ``seq_len`` tokens, the safe bound (SST-2's and BoolQ's
    answers are one token). ``b``: one layer's bf16 weights, its LoRA parameters with
    gradient, two AdamW moments and the FedProx anchor (5 x fp32), and its saved
    activations. Interpreter and framework buffers are left out: a measured model holds them.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from fedsoda.models import decoder_layers
    from fedsoda.surgery.lora import LoraSpec, attach_lora, lora_numel
    from fedsoda.surgery.subllm import prune_config

    one = copy.deepcopy(config)
    prune_config(one, [0])  # one decoder layer: every layer of these families is the same size
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one)
    layer_params = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    base_params = sum(p.numel() for p in model.parameters()) - layer_params
    lora = lora_numel(attach_lora(model, [0], spec or LoraSpec()), [0])
    labelled = seq_len if answer_tokens is None else answer_tokens
    a = (2 * base_params + 2 * batch_size * seq_len * config.hidden_size
         + (2 + 4 + 4) * batch_size * labelled * config.vocab_size)
    b = 2 * layer_params + 5 * 4 * lora + saved_activation_bytes(config, batch_size, seq_len)
    return MemoryModel(a=float(a), b=float(b), source="analytic")


def budgets_from_spec(spec: str, clients: int, full_peak: int | None = None) -> list[int]:
    """Bytes of each client's budget, in client order, from ``"BUDGETxCOUNT,..."``.

    A budget is a fraction of ``full_peak`` (the full-model LoRA step's measured peak, e.g.
    ``0.25x4``) or a size in KiB/MiB/GiB (``200MiBx4``); ``xCOUNT`` defaults to one client.
    An empty spec gives every client ``full_peak``.
    """
    if not spec.strip():
        spec = f"1.0x{clients}"
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        match = _TOKEN.match(part)
        if not match:
            raise ValueError(f"budgets: {part!r} is not BUDGETxCOUNT (a fraction of the full-model "
                             "peak such as 0.25x4, or a size such as 200MiBx4)")
        value, unit = float(match["value"]), match["unit"]
        count = int(match["count"]) if match["count"] else 1
        if value <= 0 or count < 1:
            raise ValueError(f"budgets: {part!r} needs a positive budget and at least one client")
        if unit is None and full_peak is None:
            raise ValueError(f"budgets: {part!r} is a fraction of the full-model peak, which "
                             "is not known here; give sizes in MiB instead")
        if unit is None and full_peak <= 0:
            raise ValueError(f"budgets: the full-model peak must be positive, got {full_peak}")
        size = int(value * full_peak) if unit is None else int(value * UNITS[unit.lower()])
        if size < 1:
            raise ValueError(f"budgets: {part!r} is under one byte")
        out += [size] * count
    if len(out) != clients:
        raise ValueError(f"budgets list {len(out)} clients, the run has clients={clients}")
    return out
