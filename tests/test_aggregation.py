"""FedAvg and layer-wise FedAvg against hand-computed averages."""

import pytest
import torch

from fedsoda.aggregation import fedavg, layerwise_fedavg


def test_fedavg_by_hand():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, 8.0])}]
    # weights 1 and 3: (1*1 + 3*4)/4 = 3.25, (1*2 + 3*8)/4 = 6.5
    assert fedavg(states, [1, 3])["w"].tolist() == [3.25, 6.5]
    with pytest.raises(ValueError):
        fedavg(states, [0, 0])


def test_layerwise_fedavg_by_hand():
    # Three clients holding different layers' tensors; weights are example counts 2, 1, 1.
    global_state = {"l0": torch.tensor([10.0]), "l1": torch.tensor([20.0]),
                    "l2": torch.tensor([30.0]), "l3": torch.tensor([40.0, 41.0])}
    states = [{"l0": torch.tensor([1.0]), "l1": torch.tensor([3.0])},
              {"l1": torch.tensor([7.0]), "l3": torch.tensor([2.0, 4.0])},
              {"l0": torch.tensor([5.0])}]
    merged = layerwise_fedavg(global_state, states, [2, 1, 1])
    f32 = lambda *values: torch.tensor(values, dtype=torch.float32)  # noqa: E731
    assert torch.equal(merged["l0"], f32((2 * 1 + 1 * 5) / 3))  # clients 0 and 2: 7/3
    assert torch.equal(merged["l1"], f32((2 * 3 + 1 * 7) / 3))  # clients 0 and 1: 13/3
    assert merged["l2"].tolist() == [30.0]  # nobody trained it: the global value
    assert merged["l3"].tolist() == [2.0, 4.0]  # one client: its own value
    assert merged["l0"].dtype == torch.float32
    assert merged["l2"] is not global_state["l2"]  # a copy, not the caller's tensor


def test_layerwise_fedavg_equals_fedavg_when_every_reply_holds_every_tensor():
    generator = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(3, 5, generator=generator) for k in "abc"} for _ in range(4)]
    weights = [3.0, 17.0, 5.0, 11.0]
    plain, layerwise = fedavg(states, weights), layerwise_fedavg(states[0], states, weights)
    assert all(torch.equal(plain[k], layerwise[k]) for k in "abc")  # bit for bit


def test_layerwise_fedavg_refuses_unknown_tensors_and_bad_weights():
    with pytest.raises(KeyError, match="not in the global state"):
        layerwise_fedavg({"a": torch.zeros(1)}, [{"b": torch.zeros(1)}], [1])
    with pytest.raises(ValueError):
        layerwise_fedavg({"a": torch.zeros(1)}, [{"a": torch.zeros(1)}], [0])
    assert torch.equal(layerwise_fedavg({"a": torch.ones(1)}, [], [])["a"], torch.ones(1))
