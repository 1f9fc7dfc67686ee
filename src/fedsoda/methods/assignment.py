"""What the server asks of one sampled client in one round: a plain frozen dataclass.

Methods build assignments; the federated runtime wraps each one, with the run's settings,
into the train message (``fedsoda.federated.messages.TrainConfig``). Layers are always named
by their index in the *full* model; a client model made of ``layers`` holds full-model layer
``layers[j]`` at position ``j``.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("folder", "layers")
BLOCKS = ("attn+mlp", "attn", "mlp")


@dataclass(frozen=True)
class Assignment:
    """One client's part of a round.

    ``kind`` says how the client builds its model from ``files`` (name -> content hash):
    ``folder`` is a saved model folder (the offsite methods' sub-LLM, NF4 or bf16), ``layers``
    is assembled from a base file and one file per full-model layer (FedRA and the methods
    after it), so a client whose layer set changes fetches only the new layers.
    """

    layers: tuple[int, ...]  # full-model layers the client holds, in order
    trainable: tuple[int, ...]  # full-model layers whose LoRA the client trains
    files: tuple[tuple[str, str], ...]  # (file name, sha256) the client model is made of
    kind: str = "folder"
    quantization: str = "bf16"  # how the client holds the weights: "nf4" or "bf16"
    frozen_lora: tuple[int, ...] = ()  # full-model layers with server-trained LoRA (emulator)
    blocks: tuple[str, ...] = ()  # per held layer, which blocks it keeps; () = all of them
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 1e-4
    mu: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"assignment kind must be one of {KINDS}, got {self.kind!r}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"an assignment holds distinct layers, got {self.layers}")
        if not self.trainable or not set(self.trainable) <= set(self.layers):
            raise ValueError(f"trainable layers {self.trainable} must be held ({self.layers})")
        if not set(self.frozen_lora) <= set(self.layers) or set(self.frozen_lora) & set(self.trainable):
            raise ValueError("frozen LoRA layers must be held and not trainable")
        if self.blocks and (len(self.blocks) != len(self.layers)
                            or not set(self.blocks) <= set(BLOCKS)):
            raise ValueError(f"blocks must name one of {BLOCKS} per held layer")
        if min(self.local_steps, self.batch_size) < 1 or self.lr <= 0 or self.mu < 0:
            raise ValueError("an assignment needs local_steps, batch_size >= 1, lr > 0, mu >= 0")

    @property
    def lora_layers(self) -> tuple[int, ...]:
        """Full-model layers carrying LoRA on the client (trained or server-trained)."""
        return tuple(sorted(set(self.trainable) | set(self.frozen_lora)))

    def position(self, layer: int) -> int:
        """Where full-model layer ``layer`` sits in the client model."""
        return self.layers.index(layer)

    def holds(self, layer: int, block: str) -> bool:
        """Whether the client keeps ``block`` ("attn" or "mlp") of full-model ``layer``."""
        if layer not in self.layers:
            return False
        kept = self.blocks[self.position(layer)] if self.blocks else "attn+mlp"
        return block in kept.split("+")


@dataclass(frozen=True)
class ProbeRequest:
    """What a method asks of sampled clients before it assigns (FedPruner): run the global
    model one layer at a time on ``samples`` of their own examples and report every layer
    pair's CKA and every layer's block influence; with ``units`` (FedPruner+) also those of
    the attention and MLP blocks."""

    files: tuple[tuple[str, str], ...]  # the layered model (every layer): what a client needs
    num_layers: int
    samples: int = 16
    skip_first: bool = True
    max_tokens: int = 2048
    units: bool = False
    dtype: str = "float32"  # how the kept rows are stored until CKA (fedpruner.probe_dtype)


BY_BUDGETS = "budgets"  # client_layers: each client's layers from its memory budget


def capacities(spec: str, clients: int, num_layers: int) -> list[int]:
    """Layers each client can hold, from ``"KxCOUNT,..."`` (in client order) or ``""`` (all).
    ``"budgets"`` (FedRA sized by ``[fedpruner] budgets``) is resolved by the method, after
    calibration; here it passes the format check."""
    if spec.strip() in ("", BY_BUDGETS):
        return [num_layers] * clients
    out = []
    for part in spec.split(","):
        layers, _, count = part.strip().partition("x")
        try:
            out += [int(layers)] * (int(count) if count else 1)
        except ValueError:
            raise ValueError(f"client_layers: {part.strip()!r} is not LAYERSxCOUNT (e.g. 6x4)") from None
    if len(out) != clients:
        raise ValueError(f"client_layers lists {len(out)} clients, the run has clients={clients}")
    if not all(1 <= k <= num_layers for k in out):
        raise ValueError(f"client_layers: every capacity must be in 1..{num_layers} (the model's "
                         f"layers), got {sorted(set(out))}")
    return out
