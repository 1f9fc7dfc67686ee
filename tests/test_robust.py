"""Robust aggregation and the norm bound (``fedsoda.federated.robust``): hand-computed small
cases for each rule, units held by some replies only, and one attacker among five."""

import pytest
import torch

from fedsoda.federated.robust import aggregate, bound_replies, rms_distance
from fedsoda.federated.robust_settings import RobustSettings
from fedsoda.federated.screening import Reply

ATTN = "model.layers.0.self_attn.q_proj.lora_A.weight"
MLP = "model.layers.0.mlp.up_proj.lora_A.weight"
OTHER = "model.layers.1.self_attn.q_proj.lora_A.weight"


def scalars(*values: float) -> list[dict]:
    return [{ATTN: torch.tensor([v])} for v in values]


@pytest.mark.parametrize("rule, values, expected", [
    ("median", (1, 2, 10), 2.0),
    ("median", (1, 2, 4, 10), 3.0),  # the mean of the middle two
    ("trimmed_mean", (1, 2, 3, 4, 100), 3.0),  # 0.2 of 5: one cut at each end, mean of 2, 3, 4
    # Krum, f = 1 of 5: each reply scores the squared distances to its n - f - 2 = 2 nearest:
    # 0 -> 1 + 6.25, 1 -> 1 + 2.25, 2.5 -> 2.25 + 4, 4.5 -> 4 + 12.25, 100 -> far; 1 wins.
    ("krum", (0, 1, 2.5, 4.5, 100), 1.0),
    # Multi-Krum keeps the n - f = 4 best scores (all but 100) and averages them.
    ("multikrum", (0, 1, 2.5, 4.5, 100), 2.0),
])
def test_each_rule_against_a_hand_computed_case(rule, values, expected):
    base = {ATTN: torch.zeros(1)}
    merged = aggregate(base, scalars(*values), [1.0] * len(values), RobustSettings(rule=rule))
    assert merged[ATTN].item() == pytest.approx(expected)
    assert merged[ATTN].dtype == torch.float32


def test_multikrum_keeps_as_many_as_asked_and_weights_them_by_examples():
    settings = RobustSettings(rule="multikrum", keep=2)
    merged = aggregate({ATTN: torch.zeros(1)}, scalars(0, 1, 2.5, 4.5, 100), [1, 3, 1, 1, 1], settings)
    assert merged[ATTN].item() == pytest.approx((3 * 1 + 2.5) / 4)  # the two best: 1 and 2.5


def test_units_are_aggregated_over_the_replies_that_hold_them():
    base = {ATTN: torch.zeros(1), MLP: torch.zeros(1), OTHER: torch.full((1,), 7.0)}
    updates = [{ATTN: torch.tensor([1.0]), MLP: torch.tensor([5.0])},
               {ATTN: torch.tensor([2.0])},  # holds layer 0's attention, not its MLP
               {ATTN: torch.tensor([9.0]), MLP: torch.tensor([6.0])}]
    merged = aggregate(base, updates, [1.0] * 3, RobustSettings(rule="median"))
    assert merged[ATTN].item() == 2.0
    assert merged[MLP].item() == 5.5  # median of the two replies that hold it
    assert merged[OTHER].item() == 7.0  # nobody trained it: it keeps its value


def test_fedavg_is_the_layerwise_fedavg_it_always_was():
    base = {ATTN: torch.zeros(1)}
    merged = aggregate(base, scalars(1, 4), [1.0, 3.0], RobustSettings())
    assert merged[ATTN].item() == pytest.approx(3.25)


def replies(*distances: float) -> tuple[list[Reply], dict]:
    """Replies whose update moves every one of 4 values by ``d`` (RMS distance ``d``)."""
    out = [Reply(client=i, update={ATTN: torch.full((4,), float(d))}, num_examples=5, loss=0.5)
           for i, d in enumerate(distances)]
    return out, {i: {ATTN: torch.zeros(4)} for i in range(len(distances))}


def test_the_norm_bound_rejects_or_clips_what_is_far_beyond_the_rounds_median():
    group, bases = replies(1.0, 1.1, 0.9, -1e6)
    assert rms_distance(group[3].update, bases[3]) == 1e6
    kept, rejected = bound_replies(group, bases, RobustSettings(norm_bound=3.0))
    # The lower median of 0.9, 1.0, 1.1 and 1e6 is 1.0: the bar is 3.0.
    assert [r.client for r in kept] == [0, 1, 2]
    assert rejected == {3: "update RMS distance 1e+06 is over 3 x the round's median 1"}
    kept, rejected = bound_replies(group, bases, RobustSettings(norm_bound=3.0, norm_action="clip"))
    assert not rejected and torch.allclose(kept[3].update[ATTN], torch.full((4,), -3.0))
    # Two replies: the lower median is the sound one, so the wild one still goes.
    _, rejected = bound_replies(*replies(1.0, 1e6), RobustSettings(norm_bound=3.0))
    assert list(rejected) == [1]


def test_the_issues_attack_one_update_of_minus_a_million_among_three_honest():
    group, bases = replies(0.01, 0.02, 0.03, -1e6)
    kept, _ = bound_replies(group, bases, RobustSettings(norm_bound=3.0))
    merged = aggregate({ATTN: torch.zeros(4)}, [r.update for r in kept], [5.0] * len(kept),
                       RobustSettings())
    assert torch.allclose(merged[ATTN], torch.full((4,), 0.02))  # FedAvg alone: about -250,000


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multikrum"])
@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
def test_one_attacker_in_five_stays_within_the_honest_spread(rule, attack):
    """Four honest updates scattered around a common direction and one attacker (100 times
    an honest update, or minus 10 times the honest mean). Stated bound: the robust result
    is no farther from the all-honest FedAvg than the farthest honest update is."""
    g = torch.Generator().manual_seed(7)
    direction = torch.randn(64, generator=g)
    honest = [{ATTN: direction + 0.3 * torch.randn(64, generator=g)} for _ in range(4)]
    mean = torch.stack([h[ATTN] for h in honest]).mean(0)
    bad = 100 * honest[0][ATTN] if attack == "scaled" else -10 * mean
    base = {ATTN: torch.zeros(64)}
    settings = RobustSettings(rule=rule, trim=0.2, malicious=1)
    merged = aggregate(base, [*honest, {ATTN: bad}], [1.0] * 5, settings)[ATTN]
    spread = max(float((h[ATTN] - mean).norm()) for h in honest)
    assert float((merged - mean).norm()) <= spread
    fedavg = aggregate(base, [*honest, {ATTN: bad}], [1.0] * 5, RobustSettings())[ATTN]
    assert float((fedavg - mean).norm()) > 5 * spread  # what the rules defend against


def test_settings_refuse_impossible_values():
    for changes, message in (({"rule": "mean"}, "robust.rule must be one of"),
                             ({"trim": 0.5}, r"robust.trim must be in \[0, 0.5\)"),
                             ({"norm_bound": 0.5}, "0 \\(off\\) or >= 1"),
                             ({"norm_action": "drop"}, "reject or clip"),
                             ({"malicious": -1}, ">= 0")):
        with pytest.raises(ValueError, match=message):
            RobustSettings(**changes)


def test_the_config_takes_a_robust_table_and_checks_it():
    from fedsoda.federated.config import load_config

    cfg = load_config(overrides=["robust.rule=krum", "robust.norm_bound=3", "wire.format=int8"])
    assert cfg.robust == RobustSettings(rule="krum", norm_bound=3.0)
    assert cfg.wire.format == "int8"
    with pytest.raises(ValueError, match="robust.rule must be one of"):
        load_config(overrides=["robust.rule=average"])
