"""Alignment settings, apart from the alignment code so that reading a config (and
``fedsoda --help``) does not import torch."""

from __future__ import annotations

from dataclasses import dataclass

# The names of ``fedsoda.align.losses.REPRESENTATION_LOSSES`` (a test keeps the two equal).
REP_LOSS_NAMES = ("mse", "relative")
# What the server aligns on: WikiText-2 paragraphs, or task examples it keeps back from the
# clients' partitions (the FedSODA paper's section 6.3.2).
ALIGN_DATA = ("wikitext", "task")
# The gradient ``match_epochs`` matches (``fedsoda.align.gradmatch``): the option loss, or the
# pairwise ranking loss (no calibration part, so no sign flips between groups of examples).
MATCH_LOSSES = ("options", "ranking")


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
    # "task": align on ``samples`` + ``heldout`` training examples of the run's task that no
    # client holds (``fedsoda.data.partition.reserved_indices``), not on WikiText-2.
    data: str = "wikitext"
    # After pre-alignment and each realignment, this many epochs of gradient matching over the
    # aligning batches (``fedsoda.align.gradmatch``; needs data = "task"). bench/
    # fidelity_sweep.py, SST-2: ranking, 8 epochs, lr 1e-3 gave the highest AUC (0.889) and
    # ranking-gradient cosine (0.46 against 0.15) of the client-model variants.
    match_epochs: int = 0
    match_lr: float = 1e-3
    match_loss: str = "ranking"
    # At every evaluation, cut the full LLM's option margin at the threshold that is right most
    # often on the kept-back rows (``fedsoda.evaluate.tasks.fit_cut``; needs data = "task" and
    # two answer options) and report ``calibrated_accuracy`` beside the accuracy at 0. Local
    # steps on the sub-LLM leave the full model's threshold where they happen to leave it; the
    # server, holding labelled rows no client trains on, puts it back. ~30 s per evaluation.
    calibrate: bool = False
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
        if self.data not in ALIGN_DATA or self.match_loss not in MATCH_LOSSES:
            raise ValueError(f"align.data must be one of {list(ALIGN_DATA)} and align.match_loss "
                             f"one of {list(MATCH_LOSSES)}, got {self.data!r} and "
                             f"{self.match_loss!r}")
        if self.match_epochs < 0 or self.match_lr <= 0:
            raise ValueError(f"align.match_epochs must be >= 0 and align.match_lr > 0, got "
                             f"{self.match_epochs} and {self.match_lr}")
        if (self.option_weight or self.match_epochs or self.calibrate) and self.data != "task":
            raise ValueError("align.option_weight, align.match_epochs and align.calibrate need "
                             "labelled task examples the server keeps back: set align.data = "
                             "\"task\"")
        if self.rep_loss not in REP_LOSS_NAMES:
            raise ValueError(f"align.rep_loss must be one of {sorted(REP_LOSS_NAMES)}, "
                             f"got {self.rep_loss!r}")

    @property
    def reserved(self) -> int:
        """Training examples kept back from the clients for the server (0 on WikiText-2)."""
        return self.samples + self.heldout if self.data == "task" else 0
