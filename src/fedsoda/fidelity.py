"""Gradient fidelity: does the client model push the adapter where the full LLM would?

FedSODA's claim is mechanistic: similarity group pruning keeps the layers that matter and
orchestrated distillation alignment "reduces gradient divergence between the sub-LLM and the
full LLM". This measures exactly that, as plain functions with no runtime. For a client model
and the full LLM holding the *same* adapter LoRA, on the same task batches:

- ``cosine``: between the gradient of the task loss w.r.t. the adapter LoRA computed through
  the client model and through the full LLM (every adapter tensor flattened, summed over the
  batches); 1 when the client model is the full model, the direction clients train in;
- ``norm_ratio``: ``|g_client| / |g_full|`` (how much larger a step the client takes);
- ``layers``: both figures per adapter layer (full-model index);
- ``input_error``: per adapter layer, ``|h_client - h_full| / |h_full|`` of the hidden state
  entering it; ``emulator_error`` is this at the first adapter layer fed by the emulator.

With the task's option tokens (two-answer tasks, one token each), ``options`` repeats the
cosine and norm ratio (overall and per layer) for the loss over the options alone at the first
answer token (``option_loss``): the cross-entropy over the whole vocabulary also pushes every
option up against the other 49k tokens (the "answer format"), a direction both models share
and that says nothing of which option wins; the option loss is what ranks examples.
Its gradient still carries a calibration part (push every margin one way), so ``ranking``
repeats the figures once more for the pairwise ranking loss (``ranking_loss``), which
has none: the part of the signal AUC measures.

Hidden-state errors leave out each row's first token: its massive activations (the attention
sink) would decide the norm and say nothing about the rest (the same choice as FedPruner's
CKA, see ``fedsoda.surgery.cka``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from fedsoda.data.task import EncodedExamples, Task, first_answer_positions, load_rows, pad_id
from fedsoda.models import unwrap
from fedsoda.models.layers import decoder_layers
from fedsoda.surgery.lora import layer_of, plain_name, rename_layers, set_trainable
from fedsoda.training import answer_loss, collate


def task_batches(encoded: Sequence[dict[str, list[int]]], pad_id: int, batches: int,
                 size: int) -> list[dict[str, torch.Tensor]]:
    """The probe's batches: the first ``batches * size`` encoded examples, in order."""
    picked = [encoded[i] for i in range(min(len(encoded), batches * size))]
    if not picked:
        raise ValueError("the fidelity probe needs at least one task example")
    return [collate(picked[start: start + size], pad_id) for start in range(0, len(picked), size)]


def probe_rows(task: Task, data_dir: str | None, count: int = 32) -> list[dict]:
    """The first ``count`` rows of the task's training split under the probe's fixed draw."""
    rows = load_rows(task, task.train_split, data_dir)
    random.Random(0).shuffle(rows)
    return rows[:count]


def probe_batches(task: Task, data_dir: str | None, tokenizer, max_tokens: int, batches: int,
                  size: int) -> list[dict[str, torch.Tensor]]:
    """``batches`` batches of ``size`` examples of the task's training split, drawn with one
    fixed seed, so every run and method is probed on the same examples.

    A measurement only: nothing trains on them. In a simulation they are some clients'
    examples; a deployment's server without the training split would point ``data_dir`` at a
    sample of its own.
    """
    encoded = EncodedExamples(task, probe_rows(task, data_dir, batches * size), tokenizer, max_tokens)
    return task_batches(encoded, pad_id(tokenizer), batches, size)


def option_token_ids(tokenizer, options: Sequence[str]) -> list[int] | None:
    """Each option's token, or None when an option takes more than one token (or two share
    one): the option loss needs one position that decides."""
    ids = [tokenizer(option, add_special_tokens=False)["input_ids"] for option in options]
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
        return None
    return [i[0] for i in ids]


def option_logits(model: nn.Module, batch: dict[str, torch.Tensor],
                  option_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's logits over the options at its decision position (the token before its
    first answer token), and the index of the right option."""
    base = unwrap(model)
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).last_hidden_state
    labels = batch["labels"]
    first = first_answer_positions(labels)
    rows = torch.arange(labels.shape[0])
    answers = labels[rows, first]
    choices = torch.tensor(option_ids)
    if not bool((answers[:, None] == choices).any(dim=1).all()):
        raise ValueError("an example's first answer token is none of the option tokens")
    targets = (answers[:, None] == choices).int().argmax(dim=1)
    return base.lm_head(hidden[rows, first - 1]).float()[:, choices], targets


def option_loss(model: nn.Module, batch: dict[str, torch.Tensor], option_ids: list[int]) -> torch.Tensor:
    """Mean cross-entropy over the options alone, at each row's first answer token."""
    logits, targets = option_logits(model, batch, option_ids)
    return F.cross_entropy(logits, targets)


def ranking_loss(model: nn.Module, batch: dict[str, torch.Tensor], option_ids: list[int]) -> torch.Tensor:
    """Pairwise logistic loss of the two-option margin: mean over (second-option row i,
    first-option row j) of ``softplus(m_j - m_i)``, ``m`` = logit(second) - logit(first).

    Adding one number to every margin leaves it unchanged, so its gradient has no
    calibration part (pushing every answer one way), only the ranking AUC measures.
    A batch with one answer only has no pair and a zero loss (and gradient).
    """
    logits, targets = option_logits(model, batch, option_ids)
    margins = logits[:, 1] - logits[:, 0]
    second, first = margins[targets == 1], margins[targets == 0]
    if not len(second) or not len(first):
        return margins.sum() * 0.0
    return F.softplus(first[None, :] - second[:, None]).mean()


def _layer_inputs(model: nn.Module, layers: list[int], captured: dict[int, list[torch.Tensor]]):
    """Forward pre-hooks that keep (detached) the hidden state entering each of ``layers``."""
    stack = decoder_layers(model)

    def hook_for(index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured.setdefault(index, []).append(hidden.detach().float())
        return hook

    return [stack[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in layers]


def adapter_gradients(model: nn.Module, layers: list[int], batches: list[dict],
                      loss_of: Callable[[nn.Module, dict], torch.Tensor] = answer_loss) -> dict:
    """The task-loss gradient w.r.t. the LoRA of ``layers``, summed over ``batches`` (the
    model's own names), the mean loss, and the hidden states entering those layers.

    The model is left as it was found: frozen, in its train/eval mode, no ``.grad`` touched.
    """
    set_trainable(model, layers)
    named = {plain_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError(f"no LoRA on layers {layers} of this model to take gradients of")
    was_training = model.training
    model.eval()  # no dropout: both models see the same function of their weights
    totals = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
    captured: dict[int, list[torch.Tensor]] = {}
    handles = _layer_inputs(model, layers, captured)
    losses = []
    try:
        for batch in batches:
            loss = loss_of(model, batch)
            for name, grad in zip(named, torch.autograd.grad(loss, list(named.values())),
                                  strict=True):
                totals[name] += grad.float()
            losses.append(loss.item())
    finally:
        for handle in handles:
            handle.remove()
        set_trainable(model, [])
        model.train(was_training)
    return {"grads": totals, "loss": sum(losses) / len(losses), "inputs": captured}


def cosine_and_ratio(client: list[torch.Tensor], full: list[torch.Tensor]) -> tuple:
    a = torch.cat([t.flatten() for t in client]).double()
    b = torch.cat([t.flatten() for t in full]).double()
    na, nb = a.norm().item(), b.norm().item()
    cosine = (a @ b).item() / (na * nb) if na > 0 and nb > 0 else math.nan
    return cosine, (na / nb if nb > 0 else math.nan)


def relative_error(client: list[torch.Tensor], full: list[torch.Tensor],
                   masks: list[torch.Tensor]) -> float:
    """``|h_client - h_full| / |h_full|`` over every real token but each row's first."""
    num = den = 0.0
    for a, b, mask in zip(client, full, masks, strict=True):
        keep = mask.bool().clone()
        keep[:, 0] = False
        num += (a - b)[keep].double().pow(2).sum().item()
        den += b[keep].double().pow(2).sum().item()
    return math.sqrt(num / den) if den > 0 else math.nan


@contextmanager
def one_thread():
    """Run on one intra-op thread, then restore: a reduction split over another number of
    threads rounds differently, and the probe's figures go into metrics.jsonl, which must be
    the same bit for bit however loaded the machine (and so ``client_threads``) was."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gradient_fidelity(client: nn.Module, client_layers: list[int], full: nn.Module,
                      full_layers: list[int], batches: list[dict],
                      option_ids: list[int] | None = None) -> dict:
    """The figures of the module docstring. ``client_layers[i]`` of the client model is
    ``full_layers[i]`` of the full LLM; both must hold the same adapter LoRA. With
    ``option_ids``, also ``options``: the cosines under the option loss."""
    if len(client_layers) != len(full_layers):
        raise ValueError(f"{len(client_layers)} client adapter layers against {len(full_layers)}")
    with one_thread():  # every sum below, the cosines' too
        figures = _figures(client, list(client_layers), full, list(full_layers), batches)
        if option_ids:
            figures["options"] = _option_figures(client, list(client_layers), full,
                                                 list(full_layers), batches, option_ids)
        if option_ids and len(option_ids) == 2:
            figures["ranking"] = _option_figures(client, list(client_layers), full,
                                                 list(full_layers), batches, option_ids,
                                                 ranking_loss)
        return figures


def _option_figures(client: nn.Module, client_layers: list[int], full: nn.Module,
                    full_layers: list[int], batches: list[dict], option_ids: list[int],
                    loss_of: Callable = option_loss) -> dict:
    def loss(model, batch):
        return loss_of(model, batch, option_ids)

    ours = adapter_gradients(client, client_layers, batches, loss)["grads"]
    theirs = adapter_gradients(full, full_layers, batches, loss)
    mapped = rename_layers(ours, dict(zip(client_layers, full_layers, strict=True)))
    names = sorted(mapped)
    cosine, ratio = cosine_and_ratio([mapped[n] for n in names], [theirs["grads"][n] for n in names])
    per_layer = {}
    for layer in full_layers:
        keys = [n for n in names if layer_of(n) == layer]
        c, r = cosine_and_ratio([mapped[n] for n in keys], [theirs["grads"][n] for n in keys])
        per_layer[str(layer)] = {"cosine": c, "norm_ratio": r}
    return {"cosine": cosine, "norm_ratio": ratio, "loss_full": theirs["loss"], "layers": per_layer}


def _figures(client: nn.Module, client_layers: list[int], full: nn.Module,
             full_layers: list[int], batches: list[dict]) -> dict:
    ours = adapter_gradients(client, client_layers, batches)
    theirs = adapter_gradients(full, full_layers, batches)
    mapped = rename_layers(ours["grads"], dict(zip(client_layers, full_layers, strict=True)))
    if set(mapped) != set(theirs["grads"]):
        raise ValueError("the client model's adapter LoRA and the full LLM's differ in names")
    names = sorted(mapped)
    cosine, ratio = cosine_and_ratio([mapped[n] for n in names], [theirs["grads"][n] for n in names])
    masks = [batch["attention_mask"] for batch in batches]
    per_layer, inputs = {}, {}
    for mine, layer in zip(client_layers, full_layers, strict=True):
        keys = [n for n in names if layer_of(n) == layer]
        c, r = cosine_and_ratio([mapped[n] for n in keys], [theirs["grads"][n] for n in keys])
        per_layer[str(layer)] = {"cosine": c, "norm_ratio": r}
        inputs[str(layer)] = relative_error(ours["inputs"][mine], theirs["inputs"][layer], masks)
    # The emulator feeds the first adapter layer whose client-model predecessor is no adapter.
    fed = [layer for mine, layer in zip(client_layers, full_layers, strict=True)
           if mine > 0 and mine - 1 not in set(client_layers)]
    return {"cosine": cosine, "norm_ratio": ratio, "loss_client": ours["loss"],
            "loss_full": theirs["loss"], "layers": per_layer, "input_error": inputs,
            "emulator_error": inputs[str(fed[0])] if fed else None,
            "examples": sum(int(b["input_ids"].shape[0]) for b in batches)}
