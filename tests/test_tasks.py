"""Task formatting, loss masks, truncation and the GSM8K answer extractor."""

import pytest
from transformers import AutoTokenizer

from conftest import save_tiny_model_dir
from fedsoda.data import boolq, gsm8k, sst2
from fedsoda.data.task import IGNORE_INDEX, encode_for_training, encode_prompt, load_rows
from fedsoda.data.tasks import get_task


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(save_tiny_model_dir(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", "42"),
    ("so 1,234 apples\n#### 1,234", "1234"),
    ("She pays $5.50 each, total $16.50", "16.5"),
    ("It dropped to -3 degrees", "-3"),
    ("#### -$7", "-7"),
    ("#### $-7", "-7"),
    ("#### 18.00", "18"),
    ("#### 0.5", "0.5"),
    ("3 + 4 = 7. The answer is 7.\nQuestion: what is 9 + 9? 18", "7"),
    ("no digits at all", None),
])
def test_gsm8k_answer_extractor(text, expected):
    assert gsm8k.extract_answer(text) == expected


def test_gsm8k_reference_answers_and_buckets():
    row = {"question": "q", "answer": "Step one <<2*3=6>>6\nStep two\nStep three\n#### 1,080"}
    assert gsm8k.final_answer(row["answer"]) == "1080"
    assert gsm8k.reasoning_steps(row["answer"]) == 3
    assert gsm8k.difficulty_bucket(row) == 1


def test_loss_mask_covers_only_answer_tokens(tokenizer):
    example = sst2.to_example({"sentence": "the of and in to a", "label": 1})
    encoded = encode_for_training(tokenizer, example, max_tokens=64)
    answer = tokenizer(" positive", add_special_tokens=False)["input_ids"]
    labels, ids = encoded["labels"], encoded["input_ids"]
    assert len(labels) == len(ids)
    assert labels[-len(answer):] == answer == ids[-len(answer):]
    assert all(label == IGNORE_INDEX for label in labels[: -len(answer)])


def test_boolq_truncates_only_the_passage(tokenizer):
    row = {"question": "is it the one", "passage": " ".join(["the of and"] * 200), "label": True}
    example = boolq.to_example(row)
    ids = encode_prompt(tokenizer, example, max_tokens=40)
    assert len(ids) == 40
    tail = tokenizer(example.suffix, add_special_tokens=False)["input_ids"]
    head = tokenizer(example.prefix, add_special_tokens=False)["input_ids"]
    assert ids[-len(tail):] == tail and ids[: len(head)] == head  # question kept whole
    encoded = encode_for_training(tokenizer, example, max_tokens=40)
    assert len(encoded["input_ids"]) == 40 and encoded["labels"][-1] != IGNORE_INDEX
    with pytest.raises(ValueError, match="cannot hold"):
        encode_prompt(tokenizer, example, max_tokens=3)


def test_prompts_read_as_documented():
    assert sst2.to_example({"sentence": "great film ", "label": 1}).prompt == (
        "Review: great film\nSentiment:")
    example = boolq.to_example({"question": "is water wet", "passage": "P.", "label": False})
    assert example.prompt == "Passage: P.\nQuestion: Is water wet?\nAnswer:"
    assert example.answer == " no" and example.label == 0


def test_local_rows_and_unknown_task(shared_data):
    rows = load_rows(get_task("boolq"), "validation", shared_data)
    assert len(rows) == 3270 and isinstance(rows[0]["label"], bool)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("mnli")


def test_encoded_examples_are_lazy_and_equal_eager_encoding(tokenizer):
    from fedsoda.data.task import EncodedExamples

    rows = [{"sentence": "the of and", "label": i % 2} for i in range(5)]
    lazy = EncodedExamples(sst2.TASK, rows, tokenizer, max_tokens=32)
    assert len(lazy) == 5 and not lazy._cache
    assert lazy[3] == encode_for_training(tokenizer, sst2.to_example(rows[3]), 32)
    assert set(lazy._cache) == {3}


def test_widest_examples_are_the_longest_rows_then_the_longest_answers(tokenizer):
    from fedsoda.data.task import widest_examples

    # Sentences of 1, 4, 2, 4 and 3 words (the tiny tokenizer gives these words one token
    # each): the widest two are rows 1 and 3 (4 words), in row order at equal size.
    words = [1, 4, 2, 4, 3]
    rows = [{"sentence": " ".join(["the"] * n), "label": 0} for n in words]
    lengths = [len(encode_for_training(tokenizer, sst2.to_example(row), 32)["input_ids"])
               for row in rows]
    assert lengths[1] == lengths[3] > lengths[4] > lengths[2] > lengths[0]
    widest = widest_examples(sst2.TASK, rows, tokenizer, 32, 2)
    assert widest.rows == [rows[1], rows[3]]
    assert [row["sentence"].count("the") for row in widest_examples(sst2.TASK, rows, tokenizer, 32, 3).rows] \
        == [4, 4, 3]
    # GSM8K: at equal length, the row with more answer (labelled) tokens comes first.
    short, long = ({"question": "the the the the", "answer": "the #### 1"},
                   {"question": "the the", "answer": "the the the #### 1"})
    sizes = [encode_for_training(tokenizer, gsm8k.to_example(row), 64, with_eos=True)
             for row in (short, long)]
    assert [len(size["input_ids"]) for size in sizes] == [12, 12]
    assert [sum(label != IGNORE_INDEX for label in size["labels"]) for size in sizes] == [4, 6]
    assert widest_examples(gsm8k.TASK, [short, long], tokenizer, 64, 1).rows == [long]
