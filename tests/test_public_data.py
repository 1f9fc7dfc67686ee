"""Public data and local data errors."""

import pytest

from fedsoda.data.public import is_paragraph, tokenize_batches, wikitext_paragraphs
from fedsoda.data.sources import DataNotFoundError, MalformedDataError, read_jsonl, split_file


def test_missing_data_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDSODA_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match="--data-dir.*stanfordnlp/sst2"):
        split_file("sst2", "train")
    with pytest.raises(DataNotFoundError, match="FEDSODA_DATA_DIR.*google/boolq"):
        split_file("boolq", "train", tmp_path)


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence": "ok", "label": 1}\n{"sentence": "no label"}\n')
    with pytest.raises(MalformedDataError, match=r"bad.jsonl:2: missing field 'label'"):
        read_jsonl(path, {"sentence": str, "label": int})
    path.write_text('{"sentence": "x", "label": true}\n')
    with pytest.raises(MalformedDataError, match=r":1: field 'label' is bool"):
        read_jsonl(path, {"sentence": str, "label": int})


def test_paragraph_filter():
    assert not is_paragraph(" = Robert Boulter = ", 10)
    assert not is_paragraph(" short line ", 200)
    assert is_paragraph(" " + "word " * 60, 200)


def test_wikitext_paragraphs_from_shared_data(shared_data):
    paragraphs = wikitext_paragraphs("validation", shared_data)
    assert len(paragraphs) > 500
    assert all(len(p) >= 200 and not p.startswith("=") for p in paragraphs)


def test_tokenize_batches_right_padded():
    class Tokenizer:
        def __call__(self, texts, max_length, truncation, padding_side, padding, return_tensors):
            import torch
            ids = [[1] * min(len(t), max_length) for t in texts]
            width = max(map(len, ids))
            return {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in ids]),
                    "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])}
    batches = tokenize_batches(Tokenizer(), ["aaaa", "bb", "ccccccc"], seq_len=5, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
