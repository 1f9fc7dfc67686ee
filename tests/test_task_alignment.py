"""A server that aligns on task rows it keeps back from the clients (``align.data = "task"``)
and matches gradients after pre-alignment and each realignment (``align.match_epochs``)."""

import json

import torch

from conftest import save_tiny_model_dir
from fedsoda.align.oda import AlignSettings
from fedsoda.data.partition import reserved_rows
from fedsoda.data.task import EncodedExamples, pad_id
from fedsoda.data.tasks import get_task
from fedsoda.methods import RECIPES, offsite, server_models
from fedsoda.surgery.plan import PruneSettings
from fedsoda.training import collate

SETTINGS = AlignSettings(samples=16, heldout=8, seq_len=32, batch_size=8, realign_samples=8,
                         data="task", match_epochs=2)


def prepared(model_dir, data_dir, out, settings=SETTINGS, method="fedsoda"):
    out.mkdir()
    return server_models.prepare(RECIPES[method], str(model_dir),
                                 PruneSettings(n=2, p=2, adapter_layers=2, samples=8, seq_len=32),
                                 settings, str(data_dir), out, task_name="sst2")


def test_the_server_aligns_on_the_kept_back_rows_and_matches_gradients(tmp_path, shared_data):
    model_dir = save_tiny_model_dir(tmp_path / "tiny", extra_words=("negative", "positive"))
    settings, out = SETTINGS, tmp_path / "run"
    models = prepared(model_dir, shared_data, out)
    # The aligning batches are the first 16 kept-back rows, the held-out ones the next 8, as
    # the clients would encode them; the options are the answers' own tokens.
    rows = reserved_rows("sst2", settings.reserved, shared_data)
    encoded = EncodedExamples(get_task("sst2"), rows[:24], models.tokenizer, 32)
    first = collate([encoded[i] for i in range(8)], pad_id(models.tokenizer))
    assert torch.equal(models.public.batches[0]["input_ids"], first["input_ids"])
    assert len(models.public.batches) == 2 and len(models.heldout.batches) == 1
    vocab = models.tokenizer.get_vocab()
    assert models.public.option_ids == (vocab["negative"], vocab["positive"])
    # Two batches make one group of four: one matching step an epoch, two epochs.
    report = json.loads((out / "align.json").read_text())
    assert report["gradmatch"]["steps"] == 2 and -1 <= report["gradmatch"]["cosine_last"] <= 1
    before = models.sub.emulator_lora()
    realigned = server_models.realign(models, settings, round_number=1)
    assert realigned["gradmatch"]["steps"] == 2
    # A run keeps each realignment's matching beside pre-alignment's, by round.
    offsite.record_rematch(out / "align.json", 5, realigned["gradmatch"])
    kept = json.loads((out / "align.json").read_text())
    assert kept["gradmatch"] == report["gradmatch"] and kept["kl_after"] == report["kl_after"]
    assert kept["gradmatch_by_round"] == {"5": realigned["gradmatch"]}
    assert any(not torch.equal(realigned["emulator"][k], v) for k, v in before.items())
    # Bit for bit again from the same settings (issue 17: every setting reproducible).
    again = prepared(model_dir, shared_data, tmp_path / "again")
    timeless = lambda d: {k: timeless(v) if isinstance(v, dict) else v  # noqa: E731
                          for k, v in d.items() if "seconds" not in k}
    assert timeless(json.loads((tmp_path / "again" / "align.json").read_text())) == timeless(report)
    assert all(torch.equal(again.sub.emulator_lora()[k], v) for k, v in before.items())


def test_the_server_fits_the_threshold_on_the_kept_back_rows(tmp_path, shared_data):
    from dataclasses import replace

    from fedsoda.evaluate.tasks import evaluate, fit_cut

    model_dir = save_tiny_model_dir(tmp_path / "tiny", extra_words=("negative", "positive"))
    settings = replace(SETTINGS, match_epochs=0, calibrate=True)
    # FedPETuning aligns nothing, but its server still holds the rows no client holds.
    models = prepared(model_dir, shared_data, tmp_path / "run", settings, method="fedpetuning")
    kept = reserved_rows("sst2", 24, shared_data)
    assert models.cut_rows == kept and models.public is None
    task = get_task("sst2")
    rows = [{"sentence": "a fine film", "label": 1}, {"sentence": "dull and long", "label": 0}]
    scored = server_models.evaluate_full(models, task, rows, str(shared_data))
    fitted = fit_cut(models.teacher, models.tokenizer, task, kept)
    assert scored["calibration"] == fitted and fitted["n"] == 24
    assert scored["calibrated_accuracy"] == evaluate(models.teacher, models.tokenizer, task, rows,
                                                     cut=fitted["cut"])["calibrated_accuracy"]
    # Without align.calibrate the server keeps no rows and reports no threshold.
    plain = prepared(model_dir, shared_data, tmp_path / "plain", replace(settings, calibrate=False),
                     method="fedpetuning")
    assert plain.cut_rows is None
    assert "calibration" not in server_models.evaluate_full(plain, task, rows, str(shared_data))
