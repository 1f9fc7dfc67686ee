"""Alignment settings, apart from the alignment code so that reading a config (and
``fedsoda --help``) does not import torch."""

from __future__ import annotations

from dataclasses import dataclass

# The names of ``fedsoda.align.losses.REPRESENTATION_LOSSES`` (a test keeps the two equal).
REP_LOSS_NAMES = ("mse", "relative")


@dataclass(frozen=True)
class AlignSettings:
    """Knobs that decide alignment quality (DESIGN section 2, "ODA")."""

    samples: int = 256  # public WikiText-2 validation paragraphs for pre-alignment
    heldout: int = 64  # WikiText-2 test paragraphs on which before/after are measured
    seq_len: int = 128
    batch_size: int = 8
    epochs: int = 1  # E_p, pre-alignment epochs
    realign_epochs: int = 1  # E_r
    realign_samples: int = 64  # random public subset used by each realignment
    lr: float = 3e-3  # bench/align_sweep.py: 3e-3 beat 1e-3 (KL -71% vs -64%)
    # The representation loss leads; the KL only nudges. Measured by how well an adapter trained
    # on the aligned sub-LLM transfers to the full LLM (bench/transfer_sweep.py, SST-2, 872
    # examples, zero-shot 0.795): paper MSE with alpha 1e-4 and beta 1 (the KL leads) 0.718,
    # below no alignment at all (0.769); the relative loss at alpha 1 with beta 0.1 0.810,
    # beta 0 0.815, beta 1 0.787. The raw MSE is ~3e4 on SmolLM2 (a few massive activations)
    # and barely moves, so it cannot lead; the relative one is scale-free.
    alpha: float = 1.0
    beta: float = 0.1  # weight of KL(full || sub)
    # "relative" divides each token's squared error by the teacher state's squared norm (see
    # ``relative_mse``); "mse" is the paper's plain L_inter/L_final.
    rep_loss: str = "relative"
    # Weight of the option KL (``fedsoda.align.losses.option_kl``) at each task example's
    # decision position; used only when the alignment data are task examples with labels
    # (``fedsoda.align.oda.task_caches``), never on WikiText.
    option_weight: float = 0.0
    seed: int = 0
    # Task batches (of ``batch_size`` training examples) on which the gradient-fidelity probe
    # (fedsoda.fidelity) runs before round 1 and at every evaluation; 0 turns it off.
    fidelity_batches: int = 4

    def __post_init__(self) -> None:
        if min(self.samples, self.heldout, self.batch_size, self.seq_len) < 1:
            raise ValueError("alignment samples, heldout, batch_size and seq_len must be >= 1")
        if self.fidelity_batches < 0:
            raise ValueError(f"align.fidelity_batches must be >= 0 (0: no probe), got "
                             f"{self.fidelity_batches}")
        if self.epochs < 0 or self.realign_epochs < 0 or self.lr <= 0:
            raise ValueError("alignment epochs must be >= 0 and lr > 0")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0 or self.option_weight < 0:
            raise ValueError("alpha, beta and option_weight must be >= 0, alpha and beta not both 0")
        if self.rep_loss not in REP_LOSS_NAMES:
            raise ValueError(f"align.rep_loss must be one of {sorted(REP_LOSS_NAMES)}, "
                             f"got {self.rep_loss!r}")
