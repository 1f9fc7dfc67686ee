"""Differential privacy of client updates (fedsoda.federated.dp): clipping, noise, epsilon."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from ray import cloudpickle
from safetensors.torch import load_file

from fedsoda.dp_settings import DPSettings
from fedsoda.federated.config import RunConfig
from fedsoda.federated.dp import epsilon, merged_releases, privatize, save_releases
from fedsoda.federated.messages import MessageError, TrainConfig
from fedsoda.federated.simulation import simulate
from fedsoda.surgery.lora import to_full
from test_federated_sim import tiny_config
from test_messages import train_config

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def update_norm(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a))


def test_settings_refuse_what_cannot_work_in_one_line():
    with pytest.raises(ValueError, match="dp.noise needs dp.clip > 0"):
        DPSettings(noise=1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        DPSettings(clip=-1.0)
    with pytest.raises(ValueError, match=r"dp.delta must be in \(0, 1\)"):
        DPSettings(clip=1.0, delta=1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be finite"):
            DPSettings(clip=1.0, noise=bad)
    with pytest.raises(ValueError, match="similarity matrices"):
        RunConfig(method="fedpruner", dp=DPSettings(clip=1.0))
    assert not DPSettings().enabled and DPSettings(clip=0.5).enabled


def test_the_clipped_update_never_exceeds_the_bound_and_a_small_one_is_untouched():
    rng = np.random.default_rng(0)
    for case in range(300):  # a property test over random shapes, scales and bounds
        shapes = [tuple(rng.integers(1, 9, size=2)) for _ in range(rng.integers(1, 5))]
        start = {f"t{i}": torch.from_numpy(rng.normal(size=s).astype(np.float32))
                 for i, s in enumerate(shapes)}
        scale = 10.0 ** rng.uniform(-4, 3)
        trained = {k: v + scale * torch.from_numpy(rng.normal(size=v.shape).astype(np.float32))
                   for k, v in start.items()}
        clip = 10.0 ** rng.uniform(-3, 2)
        out, norm = privatize(trained, start, DPSettings(clip=clip), seed=case)
        assert norm == pytest.approx(update_norm(trained, start), rel=1e-5)
        assert update_norm(out, start) <= clip * (1 + 1e-5) + 1e-6
        if norm < clip:  # nothing to clip: the update arrives as trained (float32 rounding)
            assert all(torch.allclose(out[k], trained[k], atol=1e-6) for k in out)


def test_noise_has_the_stated_spread_and_nobody_can_draw_it_again():
    start = {"a": torch.zeros(300, 300), "b": torch.zeros(100)}
    trained = {"a": torch.zeros(300, 300), "b": torch.zeros(100)}  # a zero update
    settings = DPSettings(clip=0.2, noise=1.5)
    out, norm = privatize(trained, start, settings, seed=7)
    values = torch.cat([out["a"].flatten(), out["b"]])
    assert norm == 0.0
    assert abs(values.mean().item()) < 0.01 * 0.3  # std 0.3 = 1.5 x 0.2, 90,100 draws
    assert values.std().item() == pytest.approx(0.3, rel=0.02)
    # A run passes no seed: its noise comes from the OS, so the server (which knows every
    # run setting, round and client id) cannot draw it again and subtract it.
    first, _ = privatize(trained, start, settings)
    second, _ = privatize(trained, start, settings)
    assert not torch.equal(first["a"], second["a"])
    assert torch.cat([first["a"].flatten(), first["b"]]).std().item() == pytest.approx(0.3, rel=0.02)
    with pytest.raises(MessageError, match="no LoRA was sent"):
        privatize({"c": torch.zeros(1)}, start, settings)


def rdp_epsilon(sigma: float, steps: int, delta: float, alpha: float, improved: bool) -> float:
    """Epsilon of ``steps`` Gaussian mechanisms (RDP ``steps * alpha / (2 sigma^2)`` at order
    alpha, Mironov 2017), converted to (epsilon, delta): the classic conversion, or the
    tighter one of Balle et al. 2020."""
    rdp = steps * alpha / (2 * sigma**2)
    if not improved:
        return rdp + math.log(1 / delta) / (alpha - 1)
    return rdp + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)


@pytest.mark.parametrize("sigma, steps", [(1.0, 10), (4.0, 20), (0.8, 1)])
def test_epsilon_lies_between_the_two_hand_conversions(sigma, steps):
    delta = 1e-5
    alphas = np.linspace(1.01, 400, 200_000)
    classic = min(rdp_epsilon(sigma, steps, delta, a, False) for a in alphas[::50])
    best = min(rdp_epsilon(sigma, steps, delta, a, True) for a in alphas)
    # Replace-one neighbours: clipped updates up to 2C apart, so the multiplier is sigma / 2.
    value = epsilon(DPSettings(clip=1.0, noise=2 * sigma, delta=delta), steps)
    # Opacus scans a grid of orders with the tighter conversion: at or just above its minimum.
    assert best <= value <= best * 1.02 and value < classic
    assert value == pytest.approx(epsilon(DPSettings(clip=5.0, noise=2 * sigma), steps))
    assert epsilon(DPSettings(clip=1.0, noise=sigma), 0) == 0.0
    assert epsilon(DPSettings(clip=1.0), steps) == math.inf


def test_the_train_message_carries_the_settings_and_refuses_bad_ones():
    config = train_config(dp=DPSettings(clip=0.5, noise=2.0))
    record = config.to_record()
    assert TrainConfig.from_record(record).dp == DPSettings(clip=0.5, noise=2.0)
    record["dp.noise"] = -1.0
    with pytest.raises(MessageError, match="dp.clip and dp.noise must be >= 0"):
        TrainConfig.from_record(record)


def test_a_run_with_clipping_moves_the_adapter_at_most_the_bound_per_round(
        tiny_model_dir, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    clip = 1e-3
    summary = simulate(tiny_config(tiny_model_dir, shared_data, out, rounds=2, realign_every=0,
                                   eval_every=0, dp=DPSettings(clip=clip)))
    start = to_full(load_file(str(out / "subllm" / "adapter_lora.safetensors")),
                    json.loads((out / "plan.json").read_text())["kept_layers"])
    final = load_file(str(out / "checkpoint" / "adapter.safetensors"))
    # FedAvg of updates each within the bound stays within it; two rounds, twice.
    moved = update_norm(final, start)
    assert 0 < moved <= 2 * clip * (1 + 1e-4)
    assert summary["dp"] == {"clip": clip, "noise": 0.0, "delta": 1e-5, "max_releases": 2,
                             "epsilon": None}


def test_spent_privacy_survives_a_round_that_never_reached_its_checkpoint(tmp_path):
    save_releases(tmp_path, {"0": 3, "1": 2})  # written as the replies of round 3 came in
    # The checkpoint holds round 2; a resume keeps the larger count of each client.
    assert merged_releases({"0": 2, "1": 2, "2": 1}, tmp_path) == {"0": 3, "1": 2, "2": 1}
    assert merged_releases({"0": 2}, tmp_path / "nothing-saved") == {"0": 2}
