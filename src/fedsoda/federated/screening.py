"""Screen every client reply before aggregation: a bad reply is rejected, never averaged in.

Plain functions, no runtime. Each reply is checked against what *that client* was assigned:
its trainable layers' LoRA tensors of the global state (keys, shapes, float32), finite values,
a finite training loss and a whole example count within what the client declared at the
handshake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, MetricRecord

from fedsoda.federated.messages import MessageError, from_record, read_lora_record, record_bytes
from fedsoda.methods.assignment import Assignment
from fedsoda.surgery.lora import layer_of
from fedsoda.wire import WireSettings, encoded_bytes

HEADER_SLACK = 64  # bytes a .npy header may take beyond the 128 counted, per array


def too_large(record: ArrayRecord, sizes: list[int], fmt: str = "fp32", block: int = 64) -> str:
    """Why ``record`` is larger than arrays of ``sizes`` values in ``fmt`` can be ("" if it
    is not): checked before anything in it is decoded."""
    limit = sum(encoded_bytes(n, fmt, block) + HEADER_SLACK for n in sizes)
    size = record_bytes(record)
    return f"{size} bytes, over the {limit} its arrays can take; not decoded" if size > limit else ""


def client_error(reason: str) -> str:
    """A client's error as one line: Flower's simulation wraps the client's exception in the
    Ray actor's traceback, of which only the closing ``Message: ...`` says what went wrong."""
    message = reason.rsplit("Message: ", 1)[-1].strip().removesuffix("'>").strip()
    return "client error: " + " ".join(message.split())[-300:]


@dataclass(frozen=True)
class Reply:
    """An accepted reply: the client's LoRA update (full-model names) and what it reported."""

    client: int
    update: dict[str, torch.Tensor]
    num_examples: int
    loss: float


def expected_update(global_state: dict[str, torch.Tensor], trainable,
                    assignment: Assignment | None = None) -> dict[str, torch.Tensor]:
    """The tensors a client trained on ``trainable`` (full-model layers) must send back; with
    an ``assignment`` that drops blocks, only those of the blocks it keeps."""
    wanted = set(trainable)
    return {k: v for k, v in global_state.items() if layer_of(k) in wanted
            and (assignment is None or assignment.holds(layer_of(k), block_of(k)))}


def block_of(name: str) -> str:
    """``"attn"`` or ``"mlp"``: the block a LoRA tensor's projection belongs to."""
    return "attn" if ".self_attn." in name else "mlp"


def screen_update(update: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  num_examples: float, max_examples: int) -> str | None:
    """Why the update must be rejected, or None if it is sound.

    Checks: exactly the expected keys, each with the expected shape and a float32 dtype,
    only finite values, and an example count that is a whole number in ``1..max_examples``
    (a client that inflates its count would otherwise dominate FedAvg).
    """
    missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
    if missing or extra:
        return f"keys differ (missing {missing[:2]}, unexpected {extra[:2]})"
    for key, reference in expected.items():
        tensor = update[key]
        if tuple(tensor.shape) != tuple(reference.shape):
            return f"{key}: shape {tuple(tensor.shape)} != {tuple(reference.shape)}"
        if tensor.dtype != torch.float32:
            return f"{key}: dtype {tensor.dtype} != torch.float32"
        if not torch.isfinite(tensor).all():
            return f"{key}: non-finite values"
    return count_reason(num_examples, max_examples)


def count_reason(num_examples, max_examples: int) -> str | None:
    """Why a reported example count is unsound (not a whole number in ``1..max_examples``,
    what the client declared), or None."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)) \
            or not math.isfinite(num_examples):
        return f"example count {num_examples!r} is not a number"
    if num_examples != int(num_examples) or not 1 <= num_examples <= max_examples:
        return f"example count {num_examples} outside 1..{max_examples} (what the client declared)"
    return None


def screen_reply(content, client: int, expected: dict[str, torch.Tensor],
                 max_examples: int, wire: WireSettings = WireSettings()) -> Reply | str:
    """The accepted reply, or why the reply of ``client`` is rejected (a one-line reason).

    ``content`` is the reply's RecordDict; nothing in it is trusted: a missing or mistyped
    record, undecodable arrays, a missing or non-finite metric are all reasons. With a
    quantized ``wire`` the reply is an update: it is decoded, screened as the tensors it
    decodes to, and added to ``expected`` (the exact LoRA the client was sent).
    """
    for name, kind in (("adapter", ArrayRecord), ("metrics", MetricRecord)):
        if name not in content:
            return f"no {name!r} record"
        if not isinstance(content[name], kind):
            return f"the {name!r} record is a {type(content[name]).__name__}, not a {kind.__name__}"
    keys = set(content["adapter"].keys())
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        return f"keys differ (missing {missing[:2]}, unexpected {extra[:2]})"
    oversized = too_large(content["adapter"], [t.numel() for t in expected.values()], wire.format,
                          wire.block)
    if oversized:
        return f"adapter record of {oversized}"
    try:
        update = read_lora_record(content["adapter"], wire)
    except MessageError as error:
        return f"undecodable adapter arrays ({str(error)[:160]})"
    except Exception as error:  # noqa: BLE001 - any decoding failure is the client's fault
        return f"undecodable adapter arrays ({type(error).__name__}: {str(error)[:120]})"
    metrics = content["metrics"]
    for key in ("num_examples", "train_loss"):
        if key not in metrics:
            return f"no {key!r} metric"
    loss = metrics["train_loss"]
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return f"train_loss {loss!r} is not a finite number"
    reason = screen_update(update, expected, metrics["num_examples"], max_examples)
    if reason:
        return reason
    if wire.quantized:
        update = {key: expected[key] + delta for key, delta in update.items()}
        if not all(torch.isfinite(t).all() for t in update.values()):
            return "the update overflows the LoRA it was added to"
    return Reply(client=client, update=update, num_examples=int(metrics["num_examples"]),
                 loss=float(loss))


def screen_probe(content, client: int, num_layers: int, max_examples: int, units: bool = False):
    """``(client, similarity, influence, examples)`` of a sound probe reply (FedPruner), or why
    it is rejected: a ``[L, L]`` symmetric CKA matrix with values in [0, 1] (a little float
    slack), ``[L]`` finite non-negative influences, a declared example count. With ``units``
    (FedPruner+) the attention and MLP blocks' matrices and influences must be there and sound
    too, and come back stacked: similarity ``[3, L, L]`` and influence ``[3, L]``, in the order
    layers, attention, MLP (stacked, the server's example-count average needs no change)."""
    for name, kind in (("probe", ArrayRecord), ("metrics", MetricRecord)):
        if name not in content or not isinstance(content[name], kind):
            return f"probe reply without a {kind.__name__} {name!r} record"
    # At most layers, attention and MLP blocks: a CKA matrix and influences each.
    oversized = too_large(content["probe"], [num_layers * num_layers, num_layers] * 3)
    if oversized:
        return f"probe record of {oversized}"
    try:
        arrays = from_record(content["probe"])
    except Exception as error:  # noqa: BLE001 - any decoding failure is the client's fault
        return f"undecodable probe arrays ({type(error).__name__})"
    pairs = [("similarity", "influence")]
    if units:
        pairs += [("similarity_attn", "influence_attn"), ("similarity_mlp", "influence_mlp")]
    for names in pairs:
        reason = _probe_pair_reason(arrays.get(names[0]), arrays.get(names[1]), names, num_layers)
        if reason:
            return reason
    similarity, influence = arrays["similarity"], arrays["influence"]
    if units:
        similarity = torch.stack([arrays[s] for s, _ in pairs])
        influence = torch.stack([arrays[i] for _, i in pairs])
    count = content["metrics"].get("num_examples") if "num_examples" in content["metrics"] else None
    reason = count_reason(count, max_examples)
    if reason:
        return reason
    return client, similarity, influence, int(count)


def _probe_pair_reason(similarity, influence, names: tuple[str, str], num_layers: int) -> str:
    """Why a CKA matrix and its influences cannot be what a probe measured ("" if sound)."""
    if similarity is None or influence is None:
        return f"probe reply without {names[0]!r} and {names[1]!r}"
    if tuple(similarity.shape) != (num_layers, num_layers) or tuple(influence.shape) != (num_layers,):
        return (f"probe shapes {tuple(similarity.shape)}, {tuple(influence.shape)} for a model of "
                f"{num_layers} layers")
    if not (torch.isfinite(similarity).all() and torch.isfinite(influence).all()):
        return "non-finite probe values"
    if similarity.min() < -1e-4 or similarity.max() > 1 + 1e-4 or influence.min() < 0 \
            or not torch.allclose(similarity, similarity.T, atol=1e-5):
        return "probe values outside what CKA and influence can be"
    return ""
