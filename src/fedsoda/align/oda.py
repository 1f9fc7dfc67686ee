"""Orchestrated distillation alignment: keep the sub-LLM faithful to the full LLM.

Teacher: the full LLM with the current global adapter LoRA. Student: the NF4 sub-LLM with the
same adapter LoRA; only the emulator LoRA is trained (FedSODA: on the kept window starts
``s_i``; FedOT and FedBiOT: on every kept emulator layer).

The teacher's emulator (layers ``0..L_E-1``) is frozen and does not depend on the adapter
LoRA, so its activations are computed once per public batch and cached. Only the teacher's
adapter layers and LM head run again at each step, starting from the cached emulator output.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedsoda.align.losses import REPRESENTATION_LOSSES, alignment_loss, kl_divergence, option_kl
from fedsoda.align.settings import AlignSettings
from fedsoda.data.public import public_batches
from fedsoda.data.task import EncodedExamples, Task, first_answer_positions, pad_id
from fedsoda.models import unwrap
from fedsoda.phases import phase
from fedsoda.surgery.lora import set_trainable
from fedsoda.surgery.plan import PruningPlan
from fedsoda.surgery.similarity import capture_layer_outputs
from fedsoda.surgery.subllm import keep_layers
from fedsoda.training import collate


@dataclass(frozen=True)
class Layout:
    """Which layer outputs are compared: teacher (full) index -> student (sub) index."""

    pairs: tuple[tuple[int, int], ...]  # (t_i + n, s_i) for each pruned window
    final: tuple[int, int]  # (L_E - 1, L*_E - 1): the emulator outputs
    full_adapter: tuple[int, ...]  # full-model indices of the adapter layers
    emulator_lora_layers: tuple[int, ...]  # sub-LLM indices s_i

    @classmethod
    def of(cls, plan: PruningPlan) -> Layout:
        sub_emulator = plan.sub_num_layers - plan.adapter_layers
        return cls(
            pairs=tuple((t + plan.n, s) for t, s in plan.index_map),
            final=(plan.emulator_layers - 1, sub_emulator - 1),
            full_adapter=tuple(range(plan.emulator_layers, plan.num_layers)),
            emulator_lora_layers=tuple(s for _, s in plan.index_map),
        )


@dataclass(frozen=True)
class TeacherCache:
    """Public batches with the frozen teacher's emulator activations at the compared layers."""

    batches: tuple[dict, ...]
    hidden: tuple[dict[int, torch.Tensor], ...]  # per batch: full layer index -> [B, T, H]
    # Task examples (batches with labels): the options' tokens, for the option KL; () else.
    option_ids: tuple[int, ...] = ()


@torch.no_grad()
def cache_teacher(teacher: nn.Module, plan: PruningPlan, batches: list[dict],
                  on_batch: Callable[[int], None] | None = None,
                  option_ids: tuple[int, ...] = ()) -> TeacherCache:
    """Run the frozen teacher once per batch, keeping only the layers alignment compares.

    Only the emulator layers run (the adapter layers are skipped), so the cache does not
    depend on the adapter LoRA and stays valid across rounds. ``on_batch(done)`` is told
    how many batches are done.
    """
    layout = Layout.of(plan)
    wanted = sorted({t for t, _ in layout.pairs} | {layout.final[0]})
    emulator = keep_layers(teacher, list(range(plan.emulator_layers)), share=True)
    hidden = []
    with capture_layer_outputs(emulator, wanted) as out:
        for done, batch in enumerate(batches, 1):
            emulator.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False)
            hidden.append({w: out[w].detach().clone() for w in wanted})
            if on_batch is not None:
                on_batch(done)
    return TeacherCache(batches=tuple(batches), hidden=tuple(hidden), option_ids=tuple(option_ids))


def _real(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.bool)


def decision_rows(batch: dict) -> torch.Tensor:
    """Index, among the batch's real tokens (right-padded rows, flattened), of each example's
    decision position: the token before its first answer token."""
    lengths = batch["attention_mask"].sum(dim=1)
    return lengths.cumsum(0) - lengths + first_answer_positions(batch["labels"]) - 1


def teacher_logits(teacher: nn.Module, plan: PruningPlan, batch: dict,
                   hidden: dict[int, torch.Tensor]) -> torch.Tensor:
    """Teacher logits at real tokens, from the cached emulator output through the adapter."""
    layout = Layout.of(plan)
    tail = keep_layers(teacher, list(layout.full_adapter), share=True)
    with torch.no_grad():
        out = tail.model(inputs_embeds=hidden[layout.final[0]],
                         attention_mask=batch["attention_mask"], use_cache=False)
        return tail.lm_head(out.last_hidden_state[_real(batch["attention_mask"])])


def student_losses(student: nn.Module, plan: PruningPlan, batch: dict,
                   hidden: dict[int, torch.Tensor],
                   target_logits: torch.Tensor,
                   rep_loss: str = AlignSettings.rep_loss,
                   option_ids: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """``inter``, ``final`` and ``kl`` of the student on one batch (with autograd), and
    ``options`` (the option KL) when ``option_ids`` are given for a batch of task examples."""
    layout = Layout.of(plan)
    distance = REPRESENTATION_LOSSES[rep_loss]
    base = unwrap(student)
    mask = batch["attention_mask"]
    wanted = [s for _, s in layout.pairs] + [layout.final[1]]
    with capture_layer_outputs(student, wanted) as out:
        result = base.model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
        logits = base.lm_head(result.last_hidden_state[_real(mask)])
        inter = sum((distance(hidden[t], out[s], mask) for t, s in layout.pairs),
                    start=torch.zeros(()))
        final = distance(hidden[layout.final[0]], out[layout.final[1]], mask)
    parts = {"inter": inter, "final": final, "kl": kl_divergence(target_logits, logits)}
    if option_ids:
        parts["options"] = option_kl(target_logits, logits, decision_rows(batch), list(option_ids))
    return parts


@torch.no_grad()
def measure(teacher: nn.Module, student: nn.Module, plan: PruningPlan,
            cache: TeacherCache, rep_loss: str = AlignSettings.rep_loss) -> dict[str, float]:
    """Mean ``kl`` (full || sub) and ``rep`` (L_inter + L_final) over the cached batches, and
    ``options`` (the option KL) on task examples."""
    totals = {"kl": 0.0, "rep": 0.0} | ({"options": 0.0} if cache.option_ids else {})
    for batch, hidden in zip(cache.batches, cache.hidden, strict=True):
        parts = student_losses(student, plan, batch, hidden,
                               teacher_logits(teacher, plan, batch, hidden), rep_loss,
                               cache.option_ids)
        totals["kl"] += parts["kl"].item()
        totals["rep"] += (parts["inter"] + parts["final"]).item()
        if "options" in totals:
            totals["options"] += parts["options"].item()
    return {key: value / len(cache.batches) for key, value in totals.items()}


def align(teacher: nn.Module, student: nn.Module, plan: PruningPlan, cache: TeacherCache,
          settings: AlignSettings, epochs: int, batch_indices: list[int] | None = None,
          on_step: Callable[[int, int, dict[str, float]], None] | None = None,
          lora_layers: list[int] | None = None) -> dict:
    """Train only the emulator LoRA of ``student`` towards ``teacher`` for ``epochs``.

    ``lora_layers`` are the sub-LLM layers whose LoRA trains (default: the window starts).
    Pre-alignment uses every cached batch; realignment passes a random subset of indices.
    Returns the loss history and the time taken.
    """
    layout = Layout.of(plan)
    params = set_trainable(student, list(layout.emulator_lora_layers if lora_layers is None
                                         else lora_layers))
    if not params:
        raise ValueError("the student has no emulator LoRA to train (p = 0?)")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    indices = list(range(len(cache.batches))) if batch_indices is None else list(batch_indices)
    rng = random.Random(settings.seed)
    began, history, step = time.perf_counter(), [], 0
    student.train()
    for _ in range(epochs):
        rng.shuffle(indices)
        for index in indices:
            batch, hidden = cache.batches[index], cache.hidden[index]
            parts = student_losses(student, plan, batch, hidden,
                                   teacher_logits(teacher, plan, batch, hidden),
                                   settings.rep_loss, cache.option_ids)
            loss = alignment_loss(parts["inter"], parts["final"], parts["kl"],
                                  settings.alpha, settings.beta, parts.get("options"),
                                  settings.option_weight)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"alignment loss is {loss.item()} at step {step}; "
                                         "lower the alignment lr or alpha")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            record = {key: value.item() for key, value in parts.items()} | {"loss": loss.item()}
            history.append(record)
            if on_step is not None:
                on_step(step, epochs * len(indices), record)
    student.eval()
    set_trainable(student, [])
    return {"steps": step, "history": history, "seconds": time.perf_counter() - began}


def public_caches(teacher: nn.Module, plan: PruningPlan, tokenizer, settings: AlignSettings,
                  data_dir: str | None) -> tuple[TeacherCache, TeacherCache]:
    """Teacher caches of the alignment paragraphs (WikiText-2 validation) and of the
    held-out paragraphs (WikiText-2 test) on which alignment quality is measured."""
    public, _ = public_batches(tokenizer, "validation", settings.samples, settings.seq_len,
                               settings.batch_size, data_dir, settings.seed)
    held, _ = public_batches(tokenizer, "test", settings.heldout, settings.seq_len,
                             settings.batch_size, data_dir, settings.seed)
    with phase("teacher cache", len(public) + len(held), "batches") as advance:
        first = cache_teacher(teacher, plan, public, on_batch=advance)
        return first, cache_teacher(teacher, plan, held, lambda done: advance(len(public) + done))


def task_caches(teacher: nn.Module, plan: PruningPlan, tokenizer, task: Task, rows: list[dict],
                settings: AlignSettings,
                option_ids: tuple[int, ...] = ()) -> tuple[TeacherCache, TeacherCache]:
    """Teacher caches of task examples (prompt and answer, as clients train on them) instead
    of WikiText-2: the first ``samples`` of ``rows`` to align on, the next ``heldout`` to
    measure on (the FedSODA paper's section 6.3.2: public data from the task's own
    distribution). ``rows`` must be examples no client holds."""
    if len(rows) < settings.samples + settings.heldout:
        raise ValueError(f"task alignment needs {settings.samples + settings.heldout} rows "
                         f"(align.samples + align.heldout), got {len(rows)}")
    encoded = EncodedExamples(task, rows[: settings.samples + settings.heldout], tokenizer,
                              settings.seq_len)
    size, pad = settings.batch_size, pad_id(tokenizer)
    batches = [collate([encoded[i] for i in range(start, min(start + size, stop))], pad)
               for first, stop in ((0, settings.samples), (settings.samples, len(encoded)))
               for start in range(first, stop, size)]
    public = -(-settings.samples // size)
    with phase("teacher cache", len(batches), "batches") as advance:
        first = cache_teacher(teacher, plan, batches[:public], advance, option_ids)
        return first, cache_teacher(teacher, plan, batches[public:],
                                    lambda done: advance(public + done), option_ids)


def pre_align(teacher: nn.Module, student: nn.Module, plan: PruningPlan, public: TeacherCache,
              heldout: TeacherCache, settings: AlignSettings,
              on_step: Callable[[int, int, dict[str, float]], None] | None = None,
              lora_layers: list[int] | None = None) -> dict:
    """Pre-alignment (``E_p`` epochs), with KL and representation loss measured on the
    held-out cache before and after."""
    before = measure(teacher, student, plan, heldout, settings.rep_loss)
    with phase("pre-alignment", settings.epochs * len(public.batches), "steps") as advance:
        def step(done: int, total: int, record: dict[str, float]) -> None:
            advance(done)
            if on_step is not None:
                on_step(done, total, record)

        result = align(teacher, student, plan, public, settings, settings.epochs, on_step=step,
                       lora_layers=lora_layers)
    after = measure(teacher, student, plan, heldout, settings.rep_loss)
    options = {f"options_{when}": figures["options"] for when, figures in
               (("before", before), ("after", after)) if "options" in figures}
    return options | {"kl_before": before["kl"], "kl_after": after["kl"],
            "rep_before": before["rep"], "rep_after": after["rep"],
            "kl_reduction": 1 - after["kl"] / before["kl"] if before["kl"] else 0.0,
            "align_steps": result["steps"], "align_seconds": result["seconds"]}


def realign_indices(cache: TeacherCache, settings: AlignSettings, round_number: int) -> list[int]:
    """A random subset of cached batches covering about ``realign_samples`` samples."""
    count = max(1, min(len(cache.batches), math.ceil(settings.realign_samples / settings.batch_size)))
    return random.Random(settings.seed * 100_003 + round_number).sample(
        range(len(cache.batches)), count)


def realign(teacher: nn.Module, student: nn.Module, plan: PruningPlan, public: TeacherCache,
            settings: AlignSettings, round_number: int,
            lora_layers: list[int] | None = None) -> tuple[TeacherCache, dict]:
    """Realignment after round ``round_number``: ``E_r`` epochs on a random public subset
    (``realign_indices``). Returns the teacher cache to use from now on (renewed when trained
    bottom layers feed the emulator, whose cached activations are then stale) and ``align``'s
    result."""
    if plan.first_adapter_layers:
        public = cache_teacher(teacher, plan, list(public.batches), option_ids=public.option_ids)
    result = align(teacher, student, plan, public, settings, settings.realign_epochs,
                   batch_indices=realign_indices(public, settings, round_number),
                   lora_layers=lora_layers)
    return public, result
