"""Training the adapter from cached emulator activations equals training through the emulator.

The reference loss is computed from the whole model's logits (``model(...).logits``), not
from the split or the cache under test.
"""

import pytest
import torch
from torch.nn import functional as F

from conftest import tiny_model
from fedsoda.activation_cache import ActivationCache, frozen_fingerprint, frozen_split
from fedsoda.data.task import IGNORE_INDEX
from fedsoda.surgery.build import make_sub_llm
from fedsoda.surgery.lora import LoraSpec, attach_lora, layer_of, load_lora_state, lora_state
from fedsoda.surgery.plan import uniform_plan
from fedsoda.training import LocalTrainer, collate, local_train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU each op's barrier waits for
    a descheduled thread (these tests take 4 s on one thread, 60 s on two busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EMULATOR_LORA, ADAPTER = [2, 4], [7, 8, 9]  # 10-layer model: adapter = the last three layers
PAD = 1


def examples(count: int = 10, seed: int = 3) -> list[dict[str, list[int]]]:
    """Prompts of different lengths with a two-token answer (loss on the answer only)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = torch.randint(3, 96, (6 + (5 * i) % 11,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - 2) + ids[-2:]})
    return out


def random_lora(model, layers, seed: int) -> None:
    """Non-zero LoRA (B = 0 at init would make the emulator LoRA invisible)."""
    generator = torch.Generator().manual_seed(seed)
    state = lora_state(model, layers)
    load_lora_state(model, {k: 0.2 * torch.randn(v.shape, generator=generator) for k, v in state.items()})


def fp32_client():
    model = attach_lora(tiny_model(layers=10), EMULATOR_LORA + ADAPTER, LoraSpec())
    random_lora(model, EMULATOR_LORA + ADAPTER, seed=5)
    return model, ADAPTER


def nf4_client(tmp_path):
    """The NF4 sub-LLM as FedSODA clients hold it (uniform windows: no public data needed)."""
    plan = uniform_plan("tiny", 10, adapter_layers=3, n=2, p=2)
    sub = make_sub_llm(tiny_model(layers=10), plan, tmp_path / "sub", quantization="nf4",
                       emulator_lora="starts")
    random_lora(sub.model, sub.emulator_layers + sub.adapter_layers, seed=5)
    return sub.model, sub.adapter_layers


def reference_loss_and_grads(model, layers, batch):
    """Loss from the whole model's logits, and the gradient of every adapter LoRA tensor."""
    trainer = LocalTrainer(model, layers, lr=1e-3, mu=0.0, pad_id=PAD)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
    return loss.detach(), grads_of(trainer, loss)


def grads_of(trainer, loss):
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in trainer.named.items()}


def cached_loss_and_grads(model, layers, batch, picks, cache):
    trainer = LocalTrainer(model, layers, lr=1e-3, mu=0.0, pad_id=PAD, cache=cache)
    loss = trainer.loss(batch, picks)
    return loss.detach(), grads_of(trainer, loss)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# NF4 layers compute in bf16 on CPU, and there an example's emulator output already depends
# on the padded width of its batch, cache or not (measured: 2 bf16 ulps between widths 15
# and 16). So NF4 clients agree to bf16 precision, fp32 ones to fp32 precision.
TOLERANCE = {"fp32": {"loss": 1e-5, "grad": 1e-4}, "nf4": {"loss": 1e-3, "grad": 0.1}}


def client_and_reference(kind: str, tmp_path):
    """A client of ``kind``, its examples, an empty cache, one batch and the uncached
    loss and gradients on it."""
    model, layers = fp32_client() if kind == "fp32" else nf4_client(tmp_path)
    data, picks = examples(), [4, 0, 7, 2]
    batch = collate([data[i] for i in picks], PAD)
    return model, layers, data, ActivationCache(), picks, batch, *reference_loss_and_grads(
        model, layers, batch)


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_cached_loss_and_every_adapter_gradient_equal_the_uncached_path(kind, tmp_path):
    model, layers, data, cache, picks, batch, expected_loss, expected = client_and_reference(
        kind, tmp_path)

    # First draw fills the cache from a different batch (other widths, other neighbours).
    cached_loss_and_grads(model, layers, collate([data[i] for i in [7, 9, 4]], PAD), [7, 9, 4], cache)
    assert (cache.hits, cache.misses) == (0, 3)
    loss, grads = cached_loss_and_grads(model, layers, batch, picks, cache)

    assert (cache.hits, cache.misses) == (2, 5)  # 4 and 7 came from the cache
    assert loss.item() == pytest.approx(expected_loss.item(), rel=TOLERANCE[kind]["loss"])
    assert sorted(grads) == sorted(expected) and {layer_of(k) for k in grads} == set(layers)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0 and expected[name].abs().sum() > 0, name  # the bnb trap
        assert relative_error(grad, expected[name]) < TOLERANCE[kind]["grad"], name


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_the_cached_loss_does_not_depend_on_what_the_cache_held(kind, tmp_path):
    # Reproducibility: in simulation a client's cache lives in whichever actor served it
    # before, so one batch must give bitwise the same loss and gradients from a cold cache,
    # from a cache warmed by other batches (other widths, other neighbours), and fully cached.
    model, layers, data, _, picks, batch, *_ = client_and_reference(kind, tmp_path)
    cold_loss, cold = cached_loss_and_grads(model, layers, batch, picks, ActivationCache())
    warm = ActivationCache()
    cached_loss_and_grads(model, layers, collate([data[i] for i in [7, 9, 4]], PAD), [7, 9, 4], warm)
    runs = [cached_loss_and_grads(model, layers, batch, picks, warm) for _ in range(2)]
    assert (warm.hits, warm.misses) == (2 + 4, 3 + 2)
    for loss, grads in runs:
        assert torch.equal(loss, cold_loss)
        assert all(torch.equal(grads[name], cold[name]) for name in cold)


def test_local_train_with_the_cache_ends_where_it_ends_without(tmp_path):
    data = examples(count=6)
    runs = []
    for cache in (None, ActivationCache()):
        model, layers = fp32_client()
        runs.append(local_train(model, layers, data, steps=5, batch_size=3, lr=1e-2, mu=0.1,
                                seed=11, pad_id=PAD, cache=cache))
        if cache is not None:
            assert cache.hits > 0 and cache.misses == 6  # 15 draws of 6 examples
    assert runs[1]["loss"] == pytest.approx(runs[0]["loss"], rel=1e-5)
    # Not bit for bit: a cache miss is computed alone (batch of 1), the uncached path in
    # batches of 3, so sums differ in the last bits, and five AdamW steps (which divide by
    # the gradient's own scale) carry that into LoRA entries near zero: 1.8e-6 seen on one.
    for name, tensor in runs[0]["state"].items():
        torch.testing.assert_close(runs[1]["state"][name], tensor, rtol=1e-4, atol=1e-5)


def test_a_new_emulator_lora_invalidates_the_cache():
    model, layers = fp32_client()
    data, cache = examples(), ActivationCache()
    picks = [1, 3, 5]
    batch = collate([data[i] for i in picks], PAD)
    cached_loss_and_grads(model, layers, batch, picks, cache)
    assert len(cache) == 3 and cache.invalidations == 0
    stale = cache.fingerprint

    # Same emulator LoRA: the cache is kept and hit.
    cached_loss_and_grads(model, layers, batch, picks, cache)
    assert (cache.hits, len(cache), cache.fingerprint) == (3, 3, stale)

    # A realignment changes the emulator LoRA: nothing stale may be used.
    random_lora(model, EMULATOR_LORA, seed=99)
    expected_loss, _ = reference_loss_and_grads(model, layers, batch)
    loss, _ = cached_loss_and_grads(model, layers, batch, picks, cache)
    assert cache.invalidations == 1 and cache.fingerprint != stale
    assert cache.hits == 3 and len(cache) == 3  # refilled by three misses
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)

    # Changing only the adapter LoRA does not touch the frozen layers' fingerprint.
    random_lora(model, ADAPTER, seed=7)
    assert frozen_fingerprint(frozen_split(model, layers)) == cache.fingerprint


def test_memory_budget_spills_to_disk_then_stops_caching(tmp_path):
    hidden = torch.ones(4, 8)  # 128 bytes
    spilled = ActivationCache(max_bytes=200, spill_dir=tmp_path / "spill", max_disk_bytes=200)
    assert [spilled.put(i, hidden * i) for i in range(3)] == [True, True, False]
    assert (spilled.memory_bytes, spilled.disk_bytes) == (128, 128)
    assert torch.equal(spilled.get(1), hidden) and len(list((tmp_path / "spill").iterdir())) == 1
    spilled.invalidate()
    assert len(spilled) == 0 and not (tmp_path / "spill").exists()

    bounded = ActivationCache(max_bytes=200)
    assert [bounded.put(i, hidden) for i in range(2)] == [True, False] and bounded.get(1) is None


def test_models_without_a_frozen_prefix_train_without_the_cache():
    model = attach_lora(tiny_model(layers=4), [0, 1, 2, 3], LoraSpec())
    trainer = LocalTrainer(model, [0, 1, 2, 3], lr=1e-3, mu=0.0, pad_id=PAD, cache=ActivationCache())
    assert trainer.split.prefix is None and trainer.cache is None


@pytest.fixture
def client_in_storage(tiny_model_dir, shared_data, tmp_path):
    """A client holding a tiny NF4 sub-LLM's files, and a ``train(round, run, emulator)`` that
    sends it a train message as the server would (LoRA named by full-model layer)."""
    from flwr.app import Context, Message, RecordDict

    from fedsoda.federated import client_app
    from fedsoda.federated.messages import DataSpec, TrainConfig, blobs_record, to_record
    from fedsoda.methods.assignment import Assignment
    from fedsoda.methods.offsite import folder_files
    from fedsoda.models import load
    from fedsoda.surgery.build import save_sub_llm
    from fedsoda.surgery.lora import to_full

    full, tokenizer = load(str(tiny_model_dir))
    plan = uniform_plan("tiny", 10, adapter_layers=3, n=2, p=2)
    sub = make_sub_llm(full, plan, tmp_path / "sub", tokenizer, quantization="nf4",
                       emulator_lora="starts")
    save_sub_llm(sub, tmp_path / "sub")
    files = folder_files(tmp_path / "sub" / "model")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    client_app.deliver(Message(RecordDict({"files": blobs_record(
        {digest: path for digest, path in files.values()})}), metadata=metadata(0, "query.deliver")),
        context)
    kept = tuple(plan.kept_layers)
    assignment = Assignment(layers=kept, trainable=tuple(plan.full_adapter_layers),
                            files=tuple((n, d) for n, (d, _) in files.items()), quantization="nf4",
                            frozen_lora=tuple(kept[i] for i in sub.emulator_layers),
                            local_steps=6, batch_size=8, lr=1e-3, mu=0.0)
    # 2,000 partitions of SST-2: ~34 examples drawn 48 times per round, so examples repeat.
    data = DataSpec(task="sst2", data_dir=str(shared_data), clients=2000, partition="iid",
                    seed=0, max_tokens=48)

    def train(round_number: int, run: str = "000000000000000a", emulator=None) -> dict:
        config = TrainConfig(run=run, round=round_number, assignment=assignment, data=data,
                             lora=sub.spec)
        content = {"adapter": to_record(to_full(sub.adapter_lora(), kept)),
                   "config": config.to_record()}
        if emulator is not None:
            content["emulator"] = to_record(to_full(emulator, kept))
        reply = client_app.train(Message(RecordDict(content),
                                         metadata=metadata(round_number, "train")), context)
        return dict(reply.content["metrics"])

    return sub, client_app.node_storage(0), train


def metadata(number: int, kind: str):
    from flwr.app import Metadata

    return Metadata(run_id=1, message_id=f"m{number}", src_node_id=0, dst_node_id=1,
                    reply_to_message_id="", group_id="", created_at=0.0, ttl=3600.0,
                    message_type=kind)


def test_the_client_app_trains_from_the_cache_and_empties_it_on_a_new_emulator(
        client_in_storage, monkeypatch):
    sub, _, train = client_in_storage
    first = train(1, emulator=sub.emulator_lora())  # a run's first round carries the emulator
    assert first["cache_hits"] > 0 and first["cache_hits"] + first["cache_misses"] == 48
    second = train(2)
    assert second["cache_hits"] > first["cache_hits"]  # round 1's examples are still valid

    # After two rounds (96 draws) nearly every example is cached; a realignment empties the
    # cache, so the ~26 distinct examples of 48 draws are all computed again.
    third = train(3, emulator={k: v + 0.01 for k, v in sub.emulator_lora().items()})
    assert third["cache_misses"] >= 10 and third["cache_misses"] > 2 * second["cache_misses"]

    monkeypatch.setenv("FEDSODA_ACTIVATION_CACHE", "0")
    off = train(4)
    assert (off["cache_hits"], off["cache_misses"]) == (0, 0)


def test_two_runs_sharing_a_sub_llm_keep_their_own_emulator_lora(client_in_storage):
    from fedsoda.federated import client_app
    from fedsoda.surgery.lora import read_lora

    sub, storage, train = client_in_storage
    a, b, c = "000000000000000a", "000000000000000b", "000000000000000c"
    mine = {k: v + 0.01 for k, v in sub.emulator_lora().items()}
    theirs = {k: v - 0.02 for k, v in sub.emulator_lora().items()}
    train(1, run=a, emulator=mine)
    train(1, run=b, emulator=theirs)  # another run on the same machine realigned
    # No emulator in the message: run A's own copy must be used, so its loss equals that of a
    # fresh run sent run A's emulator, and differs from run B's.
    loss_a, loss_b = train(2, run=a)["train_loss"], train(2, run=b)["train_loss"]
    assert loss_a == train(2, run=c, emulator=mine)["train_loss"] != loss_b
    stored = read_lora(client_app.emulator_path(storage, b))
    assert sorted(stored) == sorted(to_full_names(theirs, sub))
    with pytest.raises(FileNotFoundError, match="emulator LoRA of run 000000000000000d"):
        train(1, run="000000000000000d")  # a run that never sent its emulator to this client


def to_full_names(state, sub):
    from fedsoda.surgery.lora import to_full

    return to_full(state, sub.plan.kept_layers)
