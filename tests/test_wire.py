"""The wire codec (``fedsoda.wire``): round-trip error against hand-computed bounds, sizes
against hand-counted bytes, error feedback's running sums, and malformed bytes refused."""

import pytest
import torch

from fedsoda.wire import WireError, WireSettings, decode_tensor, encode, encode_tensor, encoded_bytes

# The 16 NormalFloat levels, as printed in the QLoRA paper (Dettmers et al. 2023, appendix E).
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
INT8 = torch.arange(-127, 128) / 127  # symmetric int8: k / 127 for k in -127..127


def roundtrip(x: torch.Tensor, fmt: str, block: int = 64) -> torch.Tensor:
    return decode_tensor(encode_tensor(x, fmt, block), tuple(x.shape), fmt, block)


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Each value's block's largest magnitude, computed here from the definition."""
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), block):
        out[start:start + block] = flat[start:start + block].abs().max()
    return out


@pytest.mark.parametrize("fmt,levels", [("nf4", NF4), ("int8", INT8)])
@pytest.mark.parametrize("block", [32, 64, 256])
def test_blockwise_formats_round_to_the_nearest_level_of_each_block(fmt, levels, block):
    x = torch.randn(37, 19, generator=torch.Generator().manual_seed(block)) * 0.02
    decoded = roundtrip(x, fmt, block).reshape(-1)
    absmax = block_absmax(x, block)
    # The nearest level of x / absmax, found here by brute force over the level table.
    scaled = (x.reshape(-1) / absmax).unsqueeze(1)
    nearest = levels[(scaled - levels).abs().argmin(dim=1)]
    distance = (scaled.squeeze(1) - nearest).abs()
    chosen = (decoded / absmax - scaled.squeeze(1)).abs()
    # The nearest level, up to values within 1e-4 of a midpoint, which bitsandbytes' CPU
    # kernel may send either way (seen for int8: under 0.1% of values).
    assert torch.all(chosen <= distance + 1e-4)
    # The hand bound: half the widest gap between neighbouring levels, times the block's absmax
    # (NF4: (1 - 0.6962) / 2 = 0.1519; int8: (1 / 127) / 2 = 1 / 254).
    half_gap = {"nf4": (1.0 - 0.6961928) / 2, "int8": 1.0 / 254}[fmt]
    assert torch.all((decoded - x.reshape(-1)).abs() <= (half_gap + 1e-4) * absmax)


def test_bf16_rounds_to_nearest_with_unit_roundoff_two_to_minus_eight():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    error = (roundtrip(x, "bf16") - x).abs()
    assert torch.all(error <= 2.0**-8 * x.abs())
    assert roundtrip(torch.tensor([1.0 + 2.0**-8]), "bf16").item() == 1.0  # tie to even
    assert roundtrip(torch.tensor([1.0 + 3 * 2.0**-8]), "bf16").item() == 1.0 + 2.0**-6


@pytest.mark.parametrize("fmt", ["bf16", "int8", "nf4"])
def test_sizes_are_the_hand_counted_bytes(fmt):
    # A LoRA A of SmolLM2's q_proj at r=8: 8 x 576 = 4608 values, 72 blocks of 64.
    expected = {"bf16": 2 * 4608, "int8": 4608 + 72 * 4, "nf4": 2304 + 72 * 4}[fmt]
    assert encoded_bytes(4608, fmt, 64) == expected
    assert len(encode_tensor(torch.randn(8, 576), fmt, 64)) == expected
    # 7 values: one partial block; nf4 packs two to a byte, the odd one in a byte of its own.
    odd = {"bf16": 14, "int8": 7 + 4, "nf4": 4 + 4}[fmt]
    x = torch.tensor([0.5, -1.0, 0.25, 0.0, 0.125, -0.75, 1.0])
    assert len(encode_tensor(x, fmt, 64)) == odd == encoded_bytes(7, fmt, 64)
    assert torch.allclose(roundtrip(x, fmt), x, atol=0.16)
    assert encoded_bytes(4608, "fp32") == 128 + 4 * 4608  # the .npy buffer: header + values


@pytest.mark.parametrize("fmt", ["bf16", "int8", "nf4"])
def test_zeros_stay_zeros(fmt):
    # LoRA B starts at zero: its blocks' absmax is 0, and nothing may become NaN.
    assert torch.equal(roundtrip(torch.zeros(3, 130), fmt), torch.zeros(3, 130))


def test_decode_refuses_bytes_the_codec_cannot_have_written():
    data = encode_tensor(torch.randn(128), "nf4", 64)
    with pytest.raises(WireError, match="cannot hold 129 values"):
        decode_tensor(data, (129,), "nf4", 64)
    scales = bytearray(data)
    scales[-4:] = torch.tensor([float("nan")]).numpy().tobytes()
    with pytest.raises(WireError, match="finite"):
        decode_tensor(bytes(scales), (128,), "nf4", 64)
    scales[-4:] = torch.tensor([-1.0]).numpy().tobytes()
    with pytest.raises(WireError, match=">= 0"):
        decode_tensor(bytes(scales), (128,), "nf4", 64)


def test_settings_refuse_impossible_values():
    with pytest.raises(ValueError, match="wire.format must be one of fp32, bf16, int8, nf4"):
        WireSettings(format="fp8")
    with pytest.raises(ValueError, match="power of two in 32..4096"):
        WireSettings(block=100)
    with pytest.raises(ValueError, match="error_feedback"):
        WireSettings(error_feedback="sometimes")
    assert not WireSettings().feedback_up  # fp32 has nothing to feed back
    assert WireSettings("nf4", error_feedback="up").feedback_up
    assert not WireSettings("nf4", error_feedback="up").feedback_down


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("seed", range(4))
def test_error_feedback_keeps_the_running_sum_within_one_rounding(fmt, seed):
    """Property, over random update streams: with feedback, sum(sent) + residual equals
    sum(true) at every step, and the residual never exceeds one rounding of the value
    encoded; without it, a small steady update drifts by a rounding every step."""
    g = torch.Generator().manual_seed(seed)
    settings = WireSettings(fmt, block=32)
    half_gap = {"nf4": 0.152, "int8": 1 / 254}[fmt]
    bias = torch.randn(2, 48, generator=g) * 0.003  # a steady part that rounding would lose
    residual: dict = {}
    true_sum = sent_sum = plain_sum = torch.zeros(2, 48, dtype=torch.float64)
    for _ in range(40):
        update = {"w": bias + torch.randn(2, 48, generator=g) * 0.01 * torch.rand(1, generator=g)}
        value = update["w"] + residual.get("w", 0)
        encoded = encode(update, settings, residual)
        residual = encoded.residual
        true_sum = true_sum + update["w"].double()
        sent_sum = sent_sum + encoded.view["w"].double()
        plain_sum = plain_sum + encode(update, settings).view["w"].double()
        assert torch.allclose(sent_sum + residual["w"].double(), true_sum, atol=1e-5)
        bound = (half_gap + 1e-4) * block_absmax(value, 32).reshape(2, 48)
        assert torch.all(residual["w"].abs() <= bound)
    drift_fed = (sent_sum - true_sum).abs().max()
    drift_plain = (plain_sum - true_sum).abs().max()
    assert drift_plain > 3 * drift_fed


def test_error_feedback_carries_a_residual_the_tensors_do_not_name():
    settings = WireSettings("nf4")
    kept = {"other": torch.ones(4)}
    encoded = encode({"w": torch.randn(64)}, settings, dict(kept))
    assert torch.equal(encoded.residual["other"], kept["other"])  # a layer not trained now
    assert encode({"w": torch.randn(64)}, settings).residual == {}  # no feedback: none kept
