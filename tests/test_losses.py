"""Alignment losses against hand-computed values."""

import math

import pytest
import torch

from fedsoda.align.losses import (
    REPRESENTATION_LOSSES,
    alignment_loss,
    kl_divergence,
    masked_mse,
    option_kl,
    relative_mse,
)
from fedsoda.align.settings import REP_LOSS_NAMES, AlignSettings


def test_masked_mse_by_hand():
    teacher = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    student = torch.tensor([[[0.0, 0.0], [3.0, 3.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the padded third token must not count
    # token 0: (1 + 4) / 2 = 2.5; token 1: (0 + 1) / 2 = 0.5; mean over 2 tokens = 1.5
    assert masked_mse(teacher, student, mask).item() == 1.5


def test_relative_mse_by_hand():
    teacher = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [9.0, 9.0]]])
    student = torch.tensor([[[0.0, 4.0], [1.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: 9 / 25 = 0.36; token 1: 1 / 1 = 1; the padded token does not count
    assert math.isclose(relative_mse(teacher, student, mask).item(), (0.36 + 1.0) / 2, rel_tol=1e-6)


def test_relative_mse_ignores_the_scale_of_a_token():
    # A 1000x larger token with the same relative error weighs the same as a small one.
    teacher = torch.tensor([[[1.0, 0.0], [1000.0, 0.0]]])
    student = torch.tensor([[[0.5, 0.0], [500.0, 0.0]]])
    assert math.isclose(relative_mse(teacher, student, torch.ones(1, 2)).item(), 0.25,
                        rel_tol=1e-6)


def test_kl_by_hand():
    teacher = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    student = torch.tensor([[0.0, math.log(3.0)]])  # q = (1/4, 3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.5 ln(4/3)
    assert math.isclose(kl_divergence(teacher, student).item(), expected, rel_tol=1e-6)
    assert kl_divergence(student, student).item() == 0.0


def test_kl_is_mean_over_rows():
    teacher = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    assert math.isclose(kl_divergence(teacher, student).item(), 0.25 * math.log(4 / 3), rel_tol=1e-6)


def test_alignment_loss_weights():
    loss = alignment_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0), 0.5, 2.0)
    assert loss.item() == 0.5 * 3.0 + 2.0 * 4.0
    with_options = alignment_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0), 0.5,
                                  2.0, torch.tensor(3.0), 0.25)
    assert with_options.item() == 0.5 * 3.0 + 2.0 * 4.0 + 0.25 * 3.0


def test_option_kl_by_hand():
    # Three logit rows over a 4-token vocabulary; options are tokens 1 and 3; row 1 decides.
    teacher = torch.tensor([[9.0, 9.0, 9.0, 9.0], [5.0, 0.0, -7.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-3.0, 0.0, 8.0, math.log(3.0)], [0.0] * 4])
    # Over the options alone: teacher (1/2, 1/2), student (1/4, 3/4); the other tokens and
    # rows do not count.
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    got = option_kl(teacher, student, torch.tensor([1]), [1, 3])
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_the_settings_know_every_representation_loss_and_no_other():
    # AlignSettings lives apart from the losses (reading a config must not import torch).
    assert sorted(REP_LOSS_NAMES) == sorted(REPRESENTATION_LOSSES) == ["mse", "relative"]
    with pytest.raises(ValueError, match="rep_loss must be one of"):
        AlignSettings(rep_loss="cosine")
