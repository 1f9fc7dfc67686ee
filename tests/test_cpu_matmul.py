"""Float32 matmuls for bf16 weights on CPUs without native bf16 (fedsoda.surgery.cpu_matmul):
the same outputs and input gradients as exact arithmetic, hand-computed, chunked or not; the
stored weights untouched; a no-op where bf16 is native."""

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from fedsoda.surgery import cpu_matmul

# Every value is exact in bf16, so the expected numbers are exact too.
W = [[1.0, 0.0], [0.5, 1.0], [2.0, -1.0]]  # out 3, in 2
X = [[1.0, 2.0], [-2.0, 0.5]]
B = [0.25, 0.0, -1.0]
# x @ W.T + b by hand: row 1 = [1, 0.5 + 2, 2 - 2] + b; row 2 = [-2, -1 + 0.5, -4 - 0.5] + b
OUT = [[1.25, 2.5, -1.0], [-1.75, -0.5, -5.5]]
# grad @ W for grad = [[1, 1, 1], [1, 0, -1]]: [1 + 0.5 + 2, 0 + 1 - 1], [1 - 2, 0 + 1]
GRAD = [[1.0, 1.0, 1.0], [1.0, 0.0, -1.0]]
GRAD_X = [[3.5, 0.0], [-1.0, 1.0]]


def linear(bias: bool = True) -> nn.Linear:
    layer = nn.Linear(2, 3, bias=bias).to(torch.bfloat16)
    layer.weight.data = torch.tensor(W, dtype=torch.bfloat16)
    if bias:
        layer.bias.data = torch.tensor(B, dtype=torch.bfloat16)
    layer.requires_grad_(False)
    return layer


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "native_bf16_matmul", lambda device="cpu": False)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3])
def test_the_float32_linear_gives_the_hand_computed_output_and_input_gradient(
        no_native_bf16, monkeypatch, chunk_rows):
    monkeypatch.setattr(cpu_matmul, "CHUNK_BYTES", 4 * 2 * chunk_rows)  # rows of 2 float32s
    layer = cpu_matmul.use_fp32_matmuls(linear())
    assert "forward" in vars(layer)
    x = torch.tensor(X, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    out.backward(torch.tensor(GRAD, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert out.tolist() == OUT
    assert x.grad.tolist() == GRAD_X
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.grad is None


def test_the_row_chunks_cover_every_row_once(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "CHUNK_BYTES", 4 * 10 * 3)  # 3 rows of 10
    rows = cpu_matmul._row_chunks(torch.zeros(8, 10, dtype=torch.bfloat16))
    covered = [i for s in rows for i in range(8)[s]]
    assert covered == list(range(8)) and len(rows) == 3


def test_a_trainable_bf16_weight_still_gets_its_gradient(no_native_bf16):
    layer = cpu_matmul.use_fp32_matmuls(linear(bias=False))
    layer.weight.requires_grad_(True)
    layer(torch.tensor(X, dtype=torch.bfloat16)).backward(torch.tensor(GRAD, dtype=torch.bfloat16))
    # dL/dW = GRAD.T @ X: row i = sum_n GRAD[n][i] * X[n]
    expected = [[sum(GRAD[n][i] * X[n][j] for n in range(2)) for j in range(2)] for i in range(3)]
    assert layer.weight.grad.tolist() == expected


def test_4bit_layers_dequantize_to_float32_and_float32_layers_are_left_alone(no_native_bf16):
    model = nn.Sequential(bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16,
                                            quant_type="nf4"), nn.Linear(64, 3))
    plain_forward = model[1].forward
    cpu_matmul.use_fp32_matmuls(model)
    assert model[0].compute_dtype == torch.float32
    assert model[1].forward == plain_forward  # a float32 (e.g. LoRA) layer is not touched


def test_nothing_changes_where_bf16_matmuls_are_native(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "native_bf16_matmul", lambda device="cpu": True)
    layer = linear()
    cpu_matmul.use_fp32_matmuls(layer)
    assert "forward" not in vars(layer)


def test_gpus_count_as_native():
    assert cpu_matmul.native_bf16_matmul("cuda")


def test_the_environment_can_turn_it_off_to_compare(no_native_bf16, monkeypatch):
    monkeypatch.setenv("FEDSODA_FP32_MATMULS", "0")
    layer = cpu_matmul.use_fp32_matmuls(linear())
    assert "forward" not in vars(layer)


def test_the_float32_attention_gives_the_hand_computed_causal_attention():
    """softmax(q k^T / sqrt(d) + causal mask) v, by hand in float64 from bf16-exact inputs,
    against the float32 attention's bf16 output (one bf16 rounding apart at most)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randint(-4, 5, (1, 2, 5, 4), generator=gen).to(torch.bfloat16) / 4
               for _ in range(3))
    module = nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 1, False
    out, _ = cpu_matmul._fp32_sdpa(module, q, k, v, None, scaling=0.5)
    scores = q.double() @ k.double().transpose(-1, -2) * 0.5  # d = 4: 1 / sqrt(d)
    scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    expected = (scores.softmax(-1) @ v.double()).transpose(1, 2)  # [batch, seq, heads, dim]
    assert out.dtype == torch.bfloat16 and out.shape == (1, 5, 2, 4)
    assert torch.allclose(out.double(), expected, rtol=2**-8, atol=2**-9)


def test_models_switch_to_the_float32_attention_only_without_native_bf16(
        tiny_model_dir, monkeypatch):
    from fedsoda.models import load

    for native, expected in ((True, "sdpa"), (False, cpu_matmul.ATTENTION)):
        monkeypatch.setattr(cpu_matmul, "native_bf16_matmul", lambda device="cpu", native=native: native)
        model, tokenizer = load(str(tiny_model_dir), dtype=torch.bfloat16)
        model.config._attn_implementation_internal = "sdpa"
        cpu_matmul.use_fp32_matmuls(model)
        assert model.config._attn_implementation == expected
        model.get_input_embeddings().weight.requires_grad_(True)
        batch = tokenizer(["a b c", "a"], return_tensors="pt", padding=True)
        model(**batch).logits.float().sum().backward()  # padded batch: the mask path too
        assert model.get_input_embeddings().weight.grad.abs().sum() > 0
